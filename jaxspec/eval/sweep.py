"""Config-driven sweeps: each run trains and/or evaluates in its own sub-workdir; results become tables and
plots.

A config module may define ``sweep(add, arg)`` (the big_vision convention). Each ``add(**overrides)`` is one
run of ``get_config(arg)`` with ``overrides`` keyed by dotted config paths; ``add(name=..., **overrides)``
names it (otherwise the name is made from the overrides). A mapping value replaces a whole section::

    def sweep(add, arg=None):
        for k in (2, 4, 8):
            add(**{"eval.methods.draft.tree": f"chain:{k}"})

Besides the trainer's sections (``seed``, ``model``, ``data``, ``mesh``, ``train``, ``target_workdir``,
``medusa``; see ``training/train_config.py``) a run config may hold:

    eval     a decoding evaluation (``eval_defaults()``): which model, which methods, which prompts
    stages   ``train`` / ``eval`` switches (both default True; a stage runs only when its section exists)
    plots    sweep level, read from the base config: extra plots over result columns (``plots.py``)

A string ``"run:NAME"`` anywhere in a run config is the workdir of run NAME, which must come earlier in the
sweep and have finished: a sweep can train a target, then heads and a draft model for it, then compare.

Every run leaves ``result.json`` (status, config, metrics, error) in its directory. A re-run of the sweep
skips a run whose result says it finished with the same config (and whose referenced runs did not run
again since); any other run runs again: its training resumes from its checkpoint, and a finished training
is not repeated. A failing run is recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import os
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from tqdm import tqdm

from jaxspec import config as config_lib
from jaxspec.config import ConfigError, is_int, require
from jaxspec.decoding import loading, methods
from jaxspec.decoding.method import Method
from jaxspec.errors import InputError
from jaxspec.eval import compare, plots
from jaxspec.models.matformer import submodel_param_count
from jaxspec.training import checkpoint, trainer
from jaxspec.training.data import heldout_prompts
from jaxspec.training.train_config import TOP_LEVEL_KEYS

RESULT_FILE = "result.json"
TRAIN_METRICS_FILE = "train_metrics.json"
TRAIN_LOG_FILE = "train.log"
ERROR_FILE = "error.txt"
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
RUN_REFERENCE = "run:"
SWEEP_KEYS = frozenset({"eval", "stages", "plots"})
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=,+-]*$")
# Keys of a trained workdir's config that may differ from a re-run's: run length and bookkeeping.
_RESUMABLE_KEYS = frozenset({"train.steps", "train.progress_bar", "train.log_every", "train.eval_every",
                             "train.eval_batches", "train.save_every", "train.keep_checkpoints",
                             "target_workdir"})


# ------------------------------------------------------------------------------------------------ config


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


def _unlocked_copy(config) -> ml_collections.ConfigDict:
    """A deep copy that may change shape (configs from the command line come locked)."""
    config = copy.deepcopy(config)
    config.unlock()
    return config


def active_config(config) -> ml_collections.ConfigDict:
    """The sections the run's stages read: an evaluation-only run drops the trainer's sections, a
    training-only run its `eval` (so their references and changes do not concern it)."""
    config = _unlocked_copy(config)
    unused = set() if will_evaluate(config) else {"eval"}
    if not will_train(config):
        unused |= TOP_LEVEL_KEYS
    for key in unused & set(config.keys()):
        del config[key]
    return config


def apply_overrides(config, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with each dotted key set; unknown keys and values of the wrong type raise."""
    config = _unlocked_copy(config)
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


def _jsonable(value):
    """Plain JSON data of an override value (a ConfigDict section becomes a dict, tuples lists)."""
    return json.loads(json.dumps(value, default=lambda v: v.to_dict() if hasattr(v, "to_dict") else str(v)))


def config_snapshot(config) -> dict:
    """The config as plain JSON data (tuples become lists), for storing and comparing."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


# ------------------------------------------------------------------------------------------------- runs


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
    return sorted({v[len(RUN_REFERENCE):] for v in _flatten(snapshot).values()
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


def _write_json(path: str, data) -> None:
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


# ------------------------------------------------------------------------------------------------ stages


def _latest_step(workdir: str) -> int | None:
    if not os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
        return None
    with checkpoint.CheckpointManager(workdir, read_only=True) as manager:
        return manager.latest_step()


def _check_same_training(prepared, workdir: str) -> None:
    """A workdir's checkpoint is resumed only by the config it was trained with (up to the run length)."""
    saved = _flatten(config_snapshot(checkpoint.load_config(workdir)))
    wanted = _flatten(config_snapshot(prepared))
    differ = sorted(k for k in saved.keys() | wanted.keys()
                    if k not in _RESUMABLE_KEYS and saved.get(k) != wanted.get(k))
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in differ[:4])
        raise InputError(f"workdir {workdir!r} was trained with another config ({shown}); remove it or give "
                         "the run another name")


def _finished_training_metrics(workdir: str) -> dict:
    path = os.path.join(workdir, TRAIN_METRICS_FILE)
    if os.path.isfile(path):
        with open(path) as fh:
            return json.load(fh)
    merged: dict = {}  # trained outside a sweep: the last value of every figure in its log
    for record in trainer.read_metrics(workdir):
        merged.update(record)
    return merged


def granularity_results(model_cfg, metrics: Mapping) -> list[dict]:
    """Per MatFormer granularity: fraction, sub-model parameters and held-out loss (MatFormer runs only)."""
    fractions = tuple(model_cfg.matformer_fractions)
    if len(fractions) < 2 or "val_g0_loss" not in metrics:
        return []
    return [dict(granularity=g, fraction=f, params=submodel_param_count(model_cfg, g),
                 val_loss=metrics[f"val_g{g}_loss"], val_bpb=metrics.get(f"val_g{g}_bpb"))
            for g, f in enumerate(fractions)]


def train_stage(config, run_dir: str, progress: bool = True) -> dict:
    """Train the run (resuming a checkpoint; a finished training is not repeated); its final metrics."""
    train_config = ml_collections.ConfigDict({k: config[k] for k in config if k in TOP_LEVEL_KEYS})
    prepared = trainer.prepare_config(train_config)
    prepared.train.progress_bar = bool(progress and prepared.train.progress_bar)
    latest = _latest_step(run_dir)
    if latest is None:  # a run stopped before its first checkpoint: the sweep owns the directory, start over
        for stale in (trainer.METRICS_FILE, checkpoint.CONFIG_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, stale))
    else:
        _check_same_training(prepared, run_dir)
    if latest is not None and latest >= prepared.train.steps:
        metrics = _finished_training_metrics(run_dir)
    else:
        with open(os.path.join(run_dir, TRAIN_LOG_FILE), "a") as log, contextlib.redirect_stdout(log):
            metrics = trainer.train(prepared, run_dir)
        _write_json(os.path.join(run_dir, TRAIN_METRICS_FILE), metrics)
    if prepared.train.loss == "matformer":
        metrics = {**metrics, "granularities": granularity_results(prepared.model, metrics)}
    return metrics


def eval_stage(config, run_dir: str, progress: bool = True) -> dict:
    """Decode held-out prompts with the autoregressive baseline and every method of `config.eval`.

    Each method is measured right after its own baseline call (paired timing: the ratio stays honest on
    a machine whose load changes during the sweep); the reported "ar" row is the first baseline.
    """
    ev = {**eval_defaults().to_dict(), **config.eval.to_dict()}
    specs = {name: method_spec(name, spec, run_dir) for name, spec in ev["methods"].items()}
    target_dir = ev["target_workdir"] or run_dir
    target = loading.load_lm(target_dir)
    texts = heldout_prompts(target.config.data, ev["num_prompts"], ev["prompt_len"])
    prompts = [target.tokenizer.encode_prompt(t) for t in texts]
    options = dict(max_new_tokens=ev["max_new_tokens"], temperature=float(ev["temperature"]),
                   eos_ids=target.tokenizer.eos_ids if ev["stop_at_eos"] else None, seed=ev["seed"],
                   repeats=ev["repeats"])
    start = time.perf_counter()
    rows = []
    bar = tqdm(total=len(specs) + 1, desc="decode", unit="method", leave=False, disable=not progress)
    for name, spec in {"ar": None, **specs}.items():
        bar.set_postfix_str(name)
        compared = {} if spec is None else {name: spec}
        measured = compare.compare_methods(target.model, target.params, prompts, compared,
                                           target_workdir=target.workdir, **options)
        row = measured[-1].row()
        row["tree"] = "" if spec is None else spec.tree_spec
        row["tree_nodes"] = 1 if spec is None else spec.num_nodes
        rows.append(row)
        bar.update(1)
    bar.close()
    settings = {k: v for k, v in ev.items() if k != "methods"}
    settings["target_workdir"] = target_dir
    return dict(settings=settings, methods=rows, seconds=time.perf_counter() - start)


def execute_run(config, run_dir: str, progress: bool = True) -> dict:
    """The stages of one resolved run config, in `run_dir`: {"train": metrics, "eval": results}."""
    os.makedirs(run_dir, exist_ok=True)
    out = {}
    if will_train(config):
        out["train"] = train_stage(config, run_dir, progress)
    if will_evaluate(config):
        out["eval"] = eval_stage(config, run_dir, progress)
    return out


# ------------------------------------------------------------------------------------------------ sweeps


def run_one(base_config, run: Run, workdir: str, finished: Mapping[str, tuple[str, float]],
            order: Sequence[str], progress: bool = True) -> dict:
    """Run (or skip) one run; its result dict, also written to `<workdir>/<name>/result.json`."""
    run_dir = os.path.join(workdir, run.name)
    previous = read_result(run_dir)
    result = dict(name=run.name, overrides=_jsonable(run.overrides), status="failed")
    start = time.perf_counter()
    try:
        config = apply_overrides(base_config, run.overrides)
        validate_run_config(config)
        config = active_config(config)
        snapshot = config_snapshot(config)
        depends_on = {name: finished[name][1] for name in references(snapshot) if name in finished}
        result.update(config=snapshot, depends_on=depends_on)
        if (previous is not None and previous.get("status") == "ok" and previous.get("config") == snapshot
                and previous.get("depends_on") == depends_on):
            return {**previous, "skipped": True}
        resolved = resolve_references(config, {k: v[0] for k, v in finished.items()}, order, run.name)
        result.update(execute_run(resolved, run_dir, progress))
        result.update(status="ok", finished_at=time.time())
    except Exception as err:  # a failing run is recorded, and the sweep goes on
        result["error"] = f"{type(err).__name__}: {err}"
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, ERROR_FILE), "w") as fh:
            fh.write(traceback.format_exc())
    result["seconds"] = time.perf_counter() - start
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, RESULT_FILE), result)
    return result


def run_sweep(base_config, runs: Sequence[Run], workdir: str, *, progress: bool = True) -> list[dict]:
    """Run `runs` in order under `workdir`, then write results.csv, results.md and the plots there."""
    base_config = _unlocked_copy(base_config)
    plot_specs = base_config.get("plots", ())
    if "plots" in base_config:
        del base_config["plots"]  # sweep level: not part of any run's config
    plots.validate_plot_specs(plot_specs)  # a typo in a plot fails now, not after the runs
    os.makedirs(workdir, exist_ok=True)
    order = [run.name for run in runs]
    finished: dict[str, tuple[str, float]] = {}
    results = []
    bar = tqdm(runs, desc="sweep", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.name)
        result = run_one(base_config, run, workdir, finished, order, progress)
        if result["status"] == "ok":
            finished[run.name] = (os.path.join(workdir, run.name), result["finished_at"])
        else:
            tqdm.write(f"run {run.name} failed: {result['error']}")
        results.append(result)
    bar.close()
    rows = result_rows(results)
    write_tables(rows, workdir)
    plots.write_plots(results, rows, workdir, plot_specs)
    return results


# ----------------------------------------------------------------------------------------------- results


def _cell(value):
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return value


def result_rows(results: Sequence[Mapping]) -> list[dict]:
    """One row per (run, method), or one per run without an evaluation: overrides, training and decoding
    figures, status and error."""
    rows = []
    for r in results:
        base = {"run": r["name"], "status": r["status"]}
        base.update({k: _cell(v) for k, v in r["overrides"].items()})
        train = r.get("train") or {}
        for key, column in (("num_params", "num_params"), ("loss", "train_loss"),
                            ("tokens_per_s", "train_tokens_per_s"), ("train_seconds", "train_seconds")):
            if key in train:
                base[column] = train[key]
        base.update({k: v for k, v in train.items() if k.startswith("val_")})
        evaluation = r.get("eval") or {}
        if "temperature" in evaluation.get("settings", {}):
            base["temperature"] = evaluation["settings"]["temperature"]
        if r.get("error"):
            base["error"] = r["error"]
        methods = evaluation.get("methods") or [None]
        for m in methods:
            row = dict(base)
            if m is not None:
                row.update(method=m["name"], decode=m["method"], tree=m["tree"], tree_nodes=m["tree_nodes"],
                           tau=m["tau"], tokens_per_s=m["tokens_per_s"], speedup=m["speedup"],
                           identical=m["identical"], lossless=m.get("lossless"))
            rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping]) -> list[str]:
    """Every key of the rows, in a fixed order: identity, overrides, decoding, training, errors."""
    first = ["run", "status"]
    decoding = ["method", "decode", "tree", "tree_nodes", "temperature", "tau", "tokens_per_s", "speedup",
                "identical", "lossless"]
    training = ["num_params", "train_loss", "val_loss", "val_bpb", "train_tokens_per_s", "train_seconds"]
    seen = list(dict.fromkeys(k for row in rows for k in row))
    fixed = set(first + decoding + training + ["error"])
    others = [k for k in seen if k not in fixed and not k.startswith("val_")]
    extra_val = [k for k in seen if k.startswith("val_") and k not in training]
    ordered = first + others + decoding + training + extra_val + ["error"]
    return [k for k in ordered if k in seen]


def write_csv(rows: Sequence[Mapping], path: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)


_FORMATS = {"tau": "{:.2f}", "tokens_per_s": "{:.1f}", "speedup": "{:.2f}x", "train_tokens_per_s": "{:.0f}",
            "train_seconds": "{:.0f}", "num_params": "{:,}"}
_ALIGN = {"run": "---", "status": "---", "category": "---", "method": "---", "tree": "---", "error": "---",
          "identical": ":---:", "lossless": ":---:"}
_HEADERS = {"tokens_per_s": "tokens/s", "identical": "identical to AR", "num_params": "params",
            "train_tokens_per_s": "train tok/s", "train_seconds": "train s"}


def _format(column: str, value, row: Mapping) -> str:
    if value is None or value == "":
        return ""
    if column == "identical":  # only greedy decoding is expected to reproduce the baseline
        return "yes" if value else ("no" if not row.get("temperature") else "- (sampled)")
    if column == "lossless":  # the method's claim, from its spec (typical acceptance, lossy modes: no)
        return "yes" if value else "no"
    if column in _FORMATS and isinstance(value, int | float) and not isinstance(value, bool):
        return _FORMATS[column].format(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of `rows` (default columns: all but the per-stream figures and the decode kind)."""
    if columns is None:
        # Left to the CSV: the decode kind and tree size (the method and tree say them), per-stream figures,
        # and whole sections set by an override (JSON objects).
        hidden = {"decode", "tree_nodes"} | {c for row in rows for c, v in row.items()
                                             if isinstance(v, str) and v.startswith("{")}
        columns = [c for c in _columns(rows) if c not in hidden and not (c.startswith("val_") and
                                                                         c not in ("val_loss", "val_bpb"))]
    lines = ["| " + " | ".join(_HEADERS.get(c, c) for c in columns) + " |",
             "|" + "|".join(_ALIGN.get(c, "---:") for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format(c, row.get(c), row) for c in columns) + " |")
    return "\n".join(lines)


def method_table(rows: Sequence[Mapping]) -> str:
    """The comparison of one run's decoding methods: method, tree, tau, tokens/s, speedup, identical."""
    return markdown_table([r for r in rows if r.get("method")],
                          ["method", "tree", "tau", "tokens_per_s", "speedup", "identical", "lossless"])


def write_tables(rows: Sequence[Mapping], workdir: str) -> tuple[str, str]:
    csv_path, md_path = os.path.join(workdir, RESULTS_CSV), os.path.join(workdir, RESULTS_MD)
    write_csv(rows, csv_path)
    with open(md_path, "w") as fh:
        fh.write(markdown_table(rows) + "\n")
    return csv_path, md_path
