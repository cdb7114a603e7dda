"""The target's next-token distribution, defined once for every decoder and verification rule.

``warp_logits`` turns logits into probabilities: temperature first, then top-k, then top-p (nucleus), the
usual order. Temperature 0 means greedy: a one-hot at the argmax of the raw logits, whatever top-k/top-p
say (the argmax always survives both filters).

Static vs traced settings: ``temperature`` may be a Python number or a traced scalar. ``top_k`` and
``top_p`` may be Python numbers (then disabled filters cost nothing, and top-k uses ``lax.top_k``) or traced
scalars (then both filters always run, through a full sort of the vocabulary). Python values are
validated; traced values cannot be: a traced temperature <= 0 means greedy, a traced top_k <= 0 or a
traced top_p >= 1 disables that filter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import InputError


def _is_python_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_scalar(name: str, value) -> None:
    if _is_python_number(value):
        return
    if isinstance(value, bool) or jnp.ndim(value) != 0:
        raise InputError(f"{name} = {value!r} must be a scalar (a Python number or a 0-d array)")


def _top_k_filter(logits: jax.Array, top_k) -> jax.Array:
    """Sets every logit below the k-th largest to -inf (ties with the k-th largest are kept)."""
    vocab = logits.shape[-1]
    if _is_python_number(top_k):
        if top_k == 0 or top_k >= vocab:
            return logits
        kth_largest = jax.lax.top_k(logits, int(top_k))[0][..., -1:]
        return jnp.where(logits >= kth_largest, logits, -jnp.inf)
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, vocab)
    ascending = jnp.sort(logits, axis=-1)
    kth_largest = jnp.take(ascending, vocab - k, axis=-1)[..., None]
    filtered = jnp.where(logits >= kth_largest, logits, -jnp.inf)
    return jnp.where(top_k > 0, filtered, logits)


def _top_p_filter(probs: jax.Array, top_p) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p (ties at the edge are kept)."""
    if _is_python_number(top_p) and top_p >= 1.0:
        return probs
    descending = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(descending, axis=-1) - descending
    # The most likely token always has mass_before == 0 < top_p, so at least one token is kept.
    num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    smallest_kept = jnp.take_along_axis(descending, num_kept - 1, axis=-1)
    kept = jnp.where(probs >= smallest_kept, probs, 0.0)
    kept = kept / jnp.sum(kept, axis=-1, keepdims=True)
    if _is_python_number(top_p):
        return kept
    return jnp.where(top_p >= 1.0, probs, kept)


def warp_logits(logits: jax.Array, temperature=0.0, top_k=0, top_p=1.0) -> jax.Array:
    """Probabilities (float32, same shape as ``logits``) over the last axis after temperature/top-k/top-p.

    temperature: 0 for greedy (one-hot argmax), > 0 to sample. top_k: 0 disables, otherwise keep the k
    most likely tokens. top_p: 1.0 disables, otherwise keep the smallest top set with mass >= top_p.
    """
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        _check_scalar(name, value)
    if _is_python_number(temperature) and temperature < 0:
        raise InputError(f"temperature = {temperature} must be >= 0 (0 means greedy)")
    if _is_python_number(top_k) and (top_k < 0 or int(top_k) != top_k):
        raise InputError(f"top_k = {top_k} must be an int >= 0 (0 disables top-k)")
    if _is_python_number(top_p) and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p = {top_p} must be in (0, 1] (1.0 disables top-p)")
    logits = jnp.asarray(logits, jnp.float32)
    if _is_python_number(temperature) and temperature == 0:
        return jax.nn.one_hot(greedy(logits), logits.shape[-1], dtype=jnp.float32)
    # A traced temperature of 0 must not divide by zero in the branch that jnp.where discards.
    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    scaled = _top_k_filter(logits / safe_temperature, top_k)
    probs = _top_p_filter(jax.nn.softmax(scaled, axis=-1), top_p)
    if _is_python_number(temperature):
        return probs
    one_hot = jax.nn.one_hot(greedy(logits), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(temperature > 0, probs, one_hot)


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One int32 draw per row from ``probs [..., V]``; zero-probability tokens are never drawn.

    Rows need not be normalised. A row of all zeros (an impossible event upstream) yields token 0.
    """
    log_probs = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
    return jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)


def greedy(logits: jax.Array) -> jax.Array:
    """The argmax token (int32) over the last axis; ties go to the lowest index."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
