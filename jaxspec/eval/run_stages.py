"""The stages of one sweep run, in its own directory: train (resuming its checkpoint) and evaluate (decode
held-out prompts with the autoregressive baseline and every configured method)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping

import ml_collections
from tqdm import tqdm

from jaxspec.decoding import loading
from jaxspec.errors import InputError
from jaxspec.eval import compare
from jaxspec.eval.run_config import config_snapshot, eval_defaults, flatten, method_spec, will_evaluate, will_train
from jaxspec.eval.sweep_runs import write_json
from jaxspec.models.matformer import submodel_param_count
from jaxspec.training import checkpoint, trainer
from jaxspec.training.data import heldout_prompts
from jaxspec.training.train_config import TOP_LEVEL_KEYS

TRAIN_METRICS_FILE = "train_metrics.json"
TRAIN_LOG_FILE = "train.log"
# Keys of a trained workdir's config that may differ from a re-run's: run length and bookkeeping.
_RESUMABLE_KEYS = frozenset({"train.steps", "train.progress_bar", "train.log_every", "train.eval_every",
                             "train.eval_batches", "train.save_every", "train.keep_checkpoints",
                             "target_workdir"})


def _latest_step(workdir: str) -> int | None:
    if not os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
        return None
    with checkpoint.CheckpointManager(workdir, read_only=True) as manager:
        return manager.latest_step()


def _check_same_training(prepared, workdir: str) -> None:
    """A workdir's checkpoint is resumed only by the config it was trained with (up to the run length)."""
    saved = flatten(config_snapshot(checkpoint.load_config(workdir)))
    wanted = flatten(config_snapshot(prepared))
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
        write_json(os.path.join(run_dir, TRAIN_METRICS_FILE), metrics)
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
