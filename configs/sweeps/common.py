"""What the quickstart and the ablation sweeps share: a MatFormer target LM on the built-in corpus, Medusa
heads and a draft model for it, at a few sizes, and the overrides that make each run of a sweep.

A sweep's base config is `target_config(size)`: the target's training sections plus `medusa`, `eval` and
`stages`. Its runs are then
    add(name="target", **TARGET_RUN)                        train the target
    add(name="medusa", **medusa_run(size))                  train heads on run:target
    add(name="draft", **draft_run(size))                    train a draft model
    add(name=..., **evaluation(**{"eval.x": ...}))          decode with run:target (no training)

Sizes: "tiny" (seconds per run: smoke tests and notebooks), "default" (the quickstart: minutes on a 2-core
CPU), "small" (a larger target for longer ablations).
"""

import ml_collections

from configs import draft, matformer, medusa
from jaxspec import config as config_lib
from jaxspec.eval.run_config import eval_defaults, stages_defaults
from jaxspec.training.train_config import medusa_defaults

SIZES = {
    # target (d_model, n_layers, n_heads, n_kv_heads, d_ff), its FFN fractions, data, train steps
    # (target, medusa, draft), draft model shape, and the prompts the evaluations decode.
    "tiny": dict(target=(32, 2, 2, 1, 64), fractions=(0.5, 1.0), seq_len=32, batch_size=4, max_bytes=150_000,
                 steps=(6, 4, 6), draft=(16, 1, 2, 1, 32), num_prompts=2, prompt_len=24, max_new_tokens=12),
    "default": dict(target=(128, 4, 4, 2, 384), fractions=(0.25, 0.5, 1.0), seq_len=128, batch_size=8,
                    max_bytes=2_000_000, steps=(500, 400, 800), draft=(64, 2, 2, 1, 192), num_prompts=2,
                    prompt_len=128, max_new_tokens=128),
    "small": dict(target=(256, 6, 4, 2, 768), fractions=(0.125, 0.25, 0.5, 1.0), seq_len=256, batch_size=8,
                  max_bytes=8_000_000, steps=(3000, 1000, 2000), draft=(64, 2, 2, 1, 192), num_prompts=8,
                  prompt_len=128, max_new_tokens=256),
}
MEDUSA_HEADS = 3  # the depth of the trees the sweeps use by default
TARGET_RUN = {"stages.eval": False}


def plus_list(value: str, kind, *, key: str, where: str, minimum, allowed: str) -> tuple:
    """A sweep arg's list, joined by '+' (commas separate args): "1+2+4" -> (1, 2, 4), every item >= minimum."""
    try:
        items = tuple(kind(v) for v in value.split("+"))
    except ValueError:
        items = ()
    if not items or min(items) < minimum:
        raise config_lib.ConfigError(f"{where}: {key}={value!r} is not allowed: {allowed} joined by '+'")
    return items


def tau_and_speedup_plots(x: str, group: str, label: str) -> list[dict]:
    """The two plots every decoding ablation declares: tau and speedup against the swept quantity."""
    return [dict(x=x, y=y, group=group, title=f"{label}{y} vs {x.replace('_', ' ')}") for y in ("tau", "speedup")]


def size_settings(size: str, where: str) -> dict:
    if size not in SIZES:
        raise config_lib.ConfigError(f"{where}: size={size!r} is not one of {sorted(SIZES)}")
    return SIZES[size]


def schedule(train_cfg, steps: int) -> None:
    """Warmup, logging and checkpointing scaled to a run of `steps` steps (evaluation only at the end)."""
    train_cfg.steps, train_cfg.warmup_steps = steps, min(30, steps // 10)
    train_cfg.log_every, train_cfg.eval_every, train_cfg.eval_batches = min(20, steps), 0, 8
    train_cfg.save_every = max(1, min(100, steps))


def _set_shape(model_cfg, shape) -> None:
    model_cfg.d_model, model_cfg.n_layers, model_cfg.n_heads, model_cfg.n_kv_heads, model_cfg.d_ff = shape


def target_config(size: str = "tiny", where: str = "configs/sweeps") -> ml_collections.ConfigDict:
    """The target's training config (a MatFormer trained on every granularity), with the `medusa`, `eval`
    and `stages` sections the other runs of a sweep override."""
    s = size_settings(size, where)
    config = matformer.get_config("tiny")
    _set_shape(config.model, s["target"])
    config.model.matformer_fractions = s["fractions"]
    config.model.max_len = max(1024, s["prompt_len"] + s["max_new_tokens"] + 64)
    config.train.loss = "matformer"
    d = config.data
    d.seq_len, d.batch_size, d.max_bytes = s["seq_len"], s["batch_size"], s["max_bytes"]
    d.val_fraction = 0.1  # enough held-out files for prompts of every size
    schedule(config.train, s["steps"][0])
    config.medusa = medusa_defaults()  # read by medusa runs only
    config.medusa.num_heads = MEDUSA_HEADS
    config.target_workdir = ""  # set by medusa runs (and by distilling draft runs)

    config.stages = stages_defaults()
    config.eval = eval_defaults()
    e = config.eval
    e.target_workdir = "run:target"
    e.num_prompts, e.prompt_len, e.max_new_tokens = s["num_prompts"], s["prompt_len"], s["max_new_tokens"]
    e.repeats = 5  # best of five timed calls: decoding a few prompts takes milliseconds on a busy machine
    return config


def medusa_run(size: str, heads: int = MEDUSA_HEADS, steps: int = 0, evaluate: bool = False) -> dict:
    """Overrides of a run that trains Medusa heads on run:target (and, with `evaluate`, decodes with them)."""
    s = size_settings(size, "medusa_run")
    train = medusa.get_config(f"heads={heads}").train
    schedule(train, steps or s["steps"][1])
    return {"train": train, "medusa.num_heads": heads, "target_workdir": "run:target",
            "stages.eval": evaluate}


def draft_run(size: str, steps: int = 0) -> dict:
    """Overrides of a run that trains a small LM with the target's vocabulary and data (no distillation)."""
    s = size_settings(size, "draft_run")
    small = draft.get_config("micro")
    _set_shape(small.model, s["draft"])
    small.model.max_len = target_config(size).model.max_len
    small.train.loss, small.train.distill_alpha = "lm", 0.0
    schedule(small.train, steps or s["steps"][2])
    return {"model": small.model, "train": small.train, "stages.eval": False}


def evaluation(**overrides) -> dict:
    """Overrides of a decoding-only run of run:target."""
    return {"stages.train": False, **overrides}
