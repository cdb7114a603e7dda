"""The runs of a sweep: how a config declares them, their names, their references to each other and the
result file each leaves.

A config module may define ``sweep(add, arg)`` (the big_vision convention). Each ``add(**overrides)`` is one
run of ``get_config(arg)`` with ``overrides`` keyed by dotted config paths; ``add(name=..., **overrides)``
names it (otherwise the name is made from the overrides). A mapping value replaces a whole section::

    def sweep(add, arg=None):
        for k in (2, 4, 8):
            add(**{"eval.methods.draft.tree": f"chain:{k}"})

A string ``"run:NAME"`` anywhere in a run config is the workdir of run NAME, which must come earlier in the
sweep and have finished: a sweep can train a target, then heads and a draft model for it, then compare.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from jaxspec.config import ConfigError
from jaxspec.errors import InputError
from jaxspec.eval.run_config import flatten

RESULT_FILE = "result.json"
RUN_REFERENCE = "run:"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=,+-]*$")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    overrides: dict[str, Any]


def _short_value(value) -> str:
    if isinstance(value, Mapping):
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        return digest[:8]
    if isinstance(value, list | tuple):
        return "-".join(_short_value(v) for v in value) or "none"
    return str(value)


def run_name(overrides: Mapping[str, Any]) -> str:
    """A directory name from the overrides: ``n_layers=2,temperature=0.5`` (full dotted keys where the last
    parts clash), characters outside ``[A-Za-z0-9._=,+-]`` replaced by ``_``, long names shortened by a
    hash."""
    if not overrides:
        return "base"
    last = [key.rsplit(".", 1)[-1] for key in overrides]
    keys = last if len(set(last)) == len(last) else list(overrides)
    name = ",".join(f"{k}={_short_value(v)}" for k, v in zip(keys, overrides.values(), strict=True))
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 100:
        name = f"{name[:90]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


def collect_runs(sweep_fn: Callable, arg: str | None = None) -> list[Run]:
    """The runs `sweep_fn(add, arg)` declares, in order; names are checked to be usable and distinct."""
    runs: list[Run] = []

    def add(name: str | None = None, **overrides):
        runs.append(Run(run_name(overrides) if name is None else name, dict(overrides)))

    sweep_fn(add, arg)
    if not runs:
        raise InputError(f"sweep(add, arg={arg!r}) declared no runs (call add(**overrides) once per run)")
    seen = set()
    for run in runs:
        if not isinstance(run.name, str) or not _NAME_PATTERN.match(run.name) or run.name in (".", ".."):
            raise InputError(f"run name {run.name!r} is not a usable directory name: use letters, digits and "
                             "._=,+- (not starting with '.' or '-')")
        if run.name in seen:
            raise InputError(f"two runs are named {run.name!r}; pass distinct name=... to add()")
        seen.add(run.name)
    return runs


def references(snapshot: Mapping) -> list[str]:
    """Names of the runs a config refers to with "run:NAME" strings."""
    return sorted({v[len(RUN_REFERENCE):] for v in flatten(snapshot).values()
                   if isinstance(v, str) and v.startswith(RUN_REFERENCE)})


def resolve_references(config, finished: Mapping[str, str], order: Sequence[str], current: str):
    """A copy with every "run:NAME" string replaced by that finished run's workdir."""
    config = copy.deepcopy(config)

    def visit(node, path):
        for key in list(node.keys()):
            value, where = node[key], f"{path}{key}"
            if isinstance(value, ml_collections.ConfigDict):
                visit(value, f"{where}.")
            elif isinstance(value, str) and value.startswith(RUN_REFERENCE):
                name = value[len(RUN_REFERENCE):]
                if name in finished:
                    node[key] = finished[name]
                    continue
                if name not in order:
                    why = f"is not a run of this sweep (runs: {list(order)})"
                elif order.index(name) >= order.index(current):
                    why = "comes later in the sweep (runs execute in order)"
                else:
                    why = "did not finish (see its result.json)"
                raise ConfigError(f"config.{where}={value!r}: run {name!r} {why}")

    visit(config, "")
    return config


def write_json(path: str, data) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def read_result(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)
