"""The config of one sweep run: its sections' defaults, validation, dotted overrides and snapshots.

Besides the trainer's sections (``seed``, ``model``, ``data``, ``mesh``, ``train``, ``target_workdir``,
``medusa``; see ``training/train_config.py``) a run config may hold:

    eval     a decoding evaluation (``eval_defaults()``): which model, which methods, which prompts
    stages   ``train`` / ``eval`` switches (both default True; a stage runs only when its section exists)
    plots    sweep level, read from the base config: extra plots over result columns (``plots.py``)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxspec import config as config_lib
from jaxspec.config import ConfigError, is_int, require
from jaxspec.decoding import methods
from jaxspec.decoding.method import Method
from jaxspec.training.train_config import TOP_LEVEL_KEYS

SWEEP_KEYS = frozenset({"eval", "stages", "plots"})


def eval_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        target_workdir="",  # "": this run's own workdir; "run:NAME": an earlier run's; or a path
        methods={},  # name -> {method: a registered name, its fields}; the autoregressive baseline always runs
        num_prompts=4,  # held-out prompts from the target's validation split
        prompt_len=64,  # tokens per prompt
        max_new_tokens=64,
        temperature=0.0,
        stop_at_eos=False,  # False: every row generates max_new_tokens (like-for-like timing)
        repeats=1,  # timed calls per method after a compile call; the best counts
        seed=0,
    ))


def stages_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(train=True, eval=True))


def method_spec(name: str, spec: Mapping, run_dir: str = "") -> Method:
    """The validated spec of `eval.methods.<name>`: "method" names a registered method, the other keys are its
    fields; an empty draft_workdir is this run's own workdir. Raises ConfigError naming the entry."""
    where = f"eval.methods.{name}"
    require(isinstance(spec, Mapping) and "method" in spec, where, spec,
             "a mapping with 'method' (a registered name) and that method's fields")
    require(name != "ar" and spec["method"] != "ar", where, dict(spec),
             "a speculative method (the autoregressive baseline always runs)")
    fields = {k: v for k, v in spec.items() if k != "method"}
    try:
        if "draft_workdir" in methods.field_names(spec["method"]) and not fields.get("draft_workdir"):
            fields["draft_workdir"] = run_dir
        return methods.make(spec["method"], **fields)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err


def validate_eval_config(eval_cfg) -> None:
    allowed = sorted(eval_defaults())
    for key in eval_cfg:
        if key not in allowed:
            raise ConfigError(f"unknown config key eval.{key}; allowed: {allowed}")
    ev = {**eval_defaults().to_dict(), **eval_cfg.to_dict()}
    for key in ("num_prompts", "prompt_len", "max_new_tokens", "repeats"):
        require(is_int(ev[key]) and ev[key] > 0, f"eval.{key}", ev[key], "a positive integer")
    require(isinstance(ev["temperature"], int | float) and ev["temperature"] >= 0, "eval.temperature",
             ev["temperature"], "a non-negative number")
    require(isinstance(ev["stop_at_eos"], bool), "eval.stop_at_eos", ev["stop_at_eos"], "True or False")
    require(isinstance(ev["target_workdir"], str), "eval.target_workdir", ev["target_workdir"],
             "a string: '' (this run), 'run:NAME' or a workdir path")
    require(isinstance(ev["methods"], Mapping), "eval.methods", ev["methods"],
             "a mapping name -> method spec")
    for name, spec in ev["methods"].items():
        method_spec(name, spec)


def validate_run_config(config) -> None:
    """Checks the sweep's own sections (the trainer checks its sections when the run trains)."""
    allowed = sorted(TOP_LEVEL_KEYS | SWEEP_KEYS)
    for key in config:
        if key not in allowed:
            raise ConfigError(f"unknown top-level config key {key!r}; allowed: {allowed}")
    stages = config.get("stages", stages_defaults())
    config_lib.check_keys(stages, stages_defaults(), "stages")
    for key, value in stages.items():
        require(isinstance(value, bool), f"stages.{key}", value, "True or False")
    if "eval" in config:
        validate_eval_config(config.eval)
    if not (will_train(config) or will_evaluate(config)):
        raise ConfigError("the run does nothing: it needs a `train` section with stages.train=True or an "
                          "`eval` section with stages.eval=True")


def _stage(config, name: str) -> bool:
    return name in config and bool(config.get("stages", stages_defaults()).get(name, True))


def will_train(config) -> bool:
    return _stage(config, "train")


def will_evaluate(config) -> bool:
    return _stage(config, "eval")


def unlocked_copy(config) -> ml_collections.ConfigDict:
    """A deep copy that may change shape (configs from the command line come locked)."""
    config = copy.deepcopy(config)
    config.unlock()
    return config


def active_config(config) -> ml_collections.ConfigDict:
    """The sections the run's stages read: an evaluation-only run drops the trainer's sections, a
    training-only run its `eval` (so their references and changes do not concern it)."""
    config = unlocked_copy(config)
    unused = set() if will_evaluate(config) else {"eval"}
    if not will_train(config):
        unused |= TOP_LEVEL_KEYS
    for key in unused & set(config.keys()):
        del config[key]
    return config


def apply_overrides(config, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with each dotted key set; unknown keys and values of the wrong type raise."""
    config = unlocked_copy(config)
    for key, value in overrides.items():
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                section = ".".join(parts[:depth]) or "<root>"
                allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ConfigError(f"override {key!r}: {section} has no key {part!r}; allowed: {allowed}")
            if depth < len(parts) - 1:
                node = node[part]
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError) as err:
            raise ConfigError(f"override {key}={value!r} does not fit the config: {err}") from err
    return config


def config_snapshot(config) -> dict:
    """The config as plain JSON data (tuples become lists), for storing and comparing."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out
