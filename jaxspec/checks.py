"""Preconditions on traced values, checked inside jit in a debug mode.

A value known only inside a compiled loop (a drafter's traced `parents`, a row's `num_new`, a cache length)
cannot raise a Python error, and the XLA ops that consume it clamp or drop out-of-range indices silently. Under
`enabled()` the model and the state code call `checkify.check` on such values, so that a function run through
`run_checked` raises an error naming the violated precondition; outside it, `expect` adds nothing to the
program. Host-side checks of concrete values (the common case) raise as usual in both modes.

    with checks.enabled():            # while tracing
        ...
    out = checks.run_checked(fn, *args)   # jit(checkify(fn)) under enabled(), raising the first failure
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.experimental import checkify

_ENABLED = contextvars.ContextVar("jaxspec_checks_enabled", default=False)


def is_enabled() -> bool:
    return _ENABLED.get()


@contextlib.contextmanager
def enabled(on: bool = True):
    """Turn the in-jit checks on (or off) for what is traced inside the block."""
    token = _ENABLED.set(bool(on))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def expect(predicate, message: str, *values) -> None:
    """checkify.check(all(predicate), message, *values) when the checks are enabled; nothing otherwise.
    `message` may hold `{}` fields, filled with `values` (arrays) when it fails."""
    if _ENABLED.get():
        checkify.check(jax.numpy.all(predicate), message, *values)


class InvariantError(ValueError):
    """A precondition that `expect` checked inside compiled code did not hold."""


def run_checked(fn, *args, **kwargs):
    """fn(*args, **kwargs) traced with the checks enabled and run under checkify: the result, or an
    InvariantError with the first failed check's message."""
    with enabled():
        error, out = jax.jit(checkify.checkify(fn))(*args, **kwargs)
    message = error.get()
    if message is not None:
        raise InvariantError(message)
    return out
