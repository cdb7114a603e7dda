"""The `config.train` section (defaults) and the checks a training config passes before any compute.

Top-level keys a training config may carry besides `seed`, `model`, `data`, `mesh` and `train`:
`target_workdir` (the checkpoint that Medusa or Hydra heads or an EAGLE drafter sit on, or that a draft model
distils from), `medusa` (the heads' shape), `eagle` (the feature drafter's shape and objective) and `hydra` (Hydra
heads' shape and objective).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections

from jaxspec import config as config_lib
from jaxspec.config import ConfigError, is_int, is_number, require
from jaxspec.parallel import mesh as mesh_lib
from jaxspec.training import data as data_lib

LOSSES = ("lm", "matformer", "medusa", "distill", "eagle", "hydra")
TOP_LEVEL_KEYS = frozenset({"seed", "model", "data", "mesh", "train", "target_workdir", "medusa", "eagle", "hydra"})
ON_TARGET = ("medusa", "eagle", "hydra")  # losses of drafters that sit on the frozen target (its model section)
SELFDISTILL_ONLY = ("eagle", "hydra")  # losses that train on a self-distillation set's stored features only
POSITIONWISE = ("medusa", "hydra")  # heads that read each position's feature on its own (no attention over context)


def train_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            loss="lm",  # one of LOSSES
            steps=1000,
            learning_rate=3e-3,  # peak, after warmup
            warmup_steps=100,
            decay_steps=0,  # cosine horizon; 0: `steps` (set it to keep the schedule fixed when extending a run)
            min_lr_ratio=0.1,  # final learning rate / peak
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            grad_clip=1.0,  # global-norm clipping; 0 disables it
            log_every=10,
            eval_every=200,  # 0: evaluate only at the end
            eval_batches=8,
            save_every=500,
            keep_checkpoints=3,
            progress_bar=True,
            matformer_weights=(),  # one weight per granularity (smallest first); empty: all 1
            medusa_decay=0.8,  # head k's loss weight is medusa_decay ** k
            distill_alpha=0.0,  # loss = (1 - alpha) * CE + alpha * T^2 * KL(target || draft)
            distill_temperature=1.0,
            early_exit_layers=(),  # layer indices whose residual stream also trains the LM head (layer skip)
            early_exit_weight=0.0,  # weight of each early-exit cross-entropy
        )
    )


def medusa_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_heads=4,  # head k guesses the token k + 2 ahead
        num_layers=1,  # residual SiLU blocks per head
        share_lm_head=False,  # project through the target's LM head instead of each head's own
        # the heads score the N most frequent reply tokens of a self-distillation set (as eagle.draft_vocab); 0: all
        draft_vocab=0,
    ))


def drafter_schedule(train_cfg, loss: str, steps: int, warmup_cap: int, learning_rate: float = 1e-3) -> None:
    """The train section of a drafter run on a frozen target (heads, feature drafters): `loss`, `steps` with a
    warmup of a tenth of them (at most `warmup_cap`), the peak learning rate, one checkpoint at the end."""
    train_cfg.loss = loss
    train_cfg.steps, train_cfg.warmup_steps = steps, min(warmup_cap, steps // 10)
    train_cfg.learning_rate = learning_rate
    train_cfg.save_every = steps


def eagle_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_layers=1,  # decoder layers of the target's shape
        draft_vocab=0,  # the head scores the N most frequent reply tokens of the data (VocabTrim); 0: all
        unroll=2,  # draft depths trained at once, each on the drafter's own guesses (training-time test)
        token_weight=1.0,  # cross-entropy of the guessed feature's next token
        feature_weight=1.0,  # smooth-L1 of the guessed feature to the target's (mean over the feature axis)
        feature_noise=0.0,  # uniform noise on the input features (EAGLE-1's augmentation)
        # EAGLE-3: the target layers whose residual streams the drafter fuses (the set must store them, see
        # configs/selfdistill.py); (): the target's final feature (EAGLE)
        feature_layers=(),
    ))


def hydra_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_heads=4,  # head k guesses the token k + 2 ahead, reading the k + 1 tokens drafted before it
        num_layers=1,  # residual SiLU blocks per head, after its input projection
        draft_vocab=0,  # the LM head scores the N most frequent reply tokens of the data (as eagle.draft_vocab); 0: all
        decay=0.8,  # head k's loss weight is decay ** k
        # Weight of the target's own distribution (KL over the draft vocabulary, Hydra's teacher distillation)
        # against its greedy token in each head's loss: 0 trains on the tokens alone, 1 on the distribution alone.
        teacher=0.0,
    ))


def validate_train_config(train_cfg, model_cfg) -> None:
    """Raise ConfigError naming the `train.*` key, its value and what is allowed."""
    config_lib.check_keys(train_cfg, train_defaults(), "train")
    t = train_defaults()
    t.update(train_cfg)
    require(t.loss in LOSSES, "train.loss", t.loss, f"one of {LOSSES}")
    for key in ("steps", "log_every", "eval_batches", "save_every", "keep_checkpoints"):
        require(is_int(t[key]) and t[key] > 0, f"train.{key}", t[key], "a positive integer")
    for key in ("warmup_steps", "decay_steps", "eval_every"):
        require(is_int(t[key]) and t[key] >= 0, f"train.{key}", t[key], "a non-negative integer")
    horizon = t.decay_steps or t.steps
    require(t.warmup_steps < horizon, "train.warmup_steps", t.warmup_steps,
             f"fewer than the decay horizon (train.decay_steps or train.steps = {horizon})")
    require(is_number(t.learning_rate) and t.learning_rate > 0, "train.learning_rate", t.learning_rate,
             "a positive number")
    require(is_number(t.min_lr_ratio) and 0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio,
             "a number in [0, 1]")
    for key in ("b1", "b2"):
        require(is_number(t[key]) and 0 <= t[key] < 1, f"train.{key}", t[key], "a number in [0, 1)")
    for key in ("eps", "distill_temperature"):
        require(is_number(t[key]) and t[key] > 0, f"train.{key}", t[key], "a positive number")
    for key in ("weight_decay", "grad_clip", "early_exit_weight"):
        require(is_number(t[key]) and t[key] >= 0, f"train.{key}", t[key], "a non-negative number")
    require(is_number(t.medusa_decay) and 0 < t.medusa_decay <= 1, "train.medusa_decay", t.medusa_decay,
             "a number in (0, 1]")
    require(is_number(t.distill_alpha) and 0 <= t.distill_alpha <= 1, "train.distill_alpha", t.distill_alpha,
             "a number in [0, 1]")
    require(isinstance(t.progress_bar, bool), "train.progress_bar", t.progress_bar, "True or False")

    n_granularities = len(model_cfg.matformer_fractions)
    weights = tuple(t.matformer_weights)
    require(not weights or (len(weights) == n_granularities and all(is_number(w) and w >= 0 for w in weights)
                             and sum(weights) > 0),
             "train.matformer_weights", weights,
             f"empty (all 1) or {n_granularities} non-negative numbers, not all 0, one per granularity of "
             f"model.matformer_fractions={tuple(model_cfg.matformer_fractions)}")
    if t.loss == "matformer":
        require(n_granularities > 1, "model.matformer_fractions", tuple(model_cfg.matformer_fractions),
                 "at least two granularities for train.loss='matformer'")

    exits = tuple(t.early_exit_layers)
    last = model_cfg.n_layers - 1
    require(all(is_int(i) and 0 <= i < last for i in exits) and len(set(exits)) == len(exits),
             "train.early_exit_layers", exits,
             f"distinct layer indices in 0..{last - 1} (the last layer {last} is the model's own output)")
    if t.loss in ON_TARGET:
        require(not exits, "train.early_exit_layers", exits, f"empty for train.loss={t.loss!r} (frozen target)")


def validate_medusa_config(medusa_cfg) -> None:
    config_lib.check_keys(medusa_cfg, medusa_defaults(), "medusa")
    for key in ("num_heads", "num_layers"):
        require(is_int(medusa_cfg[key]) and medusa_cfg[key] > 0, f"medusa.{key}", medusa_cfg[key],
                 "a positive integer")
    require(isinstance(medusa_cfg.share_lm_head, bool), "medusa.share_lm_head", medusa_cfg.share_lm_head,
             "True or False")
    require(is_int(medusa_cfg.draft_vocab) and medusa_cfg.draft_vocab >= 0, "medusa.draft_vocab",
            medusa_cfg.draft_vocab, "a non-negative integer (0: the whole vocabulary)")


def validate_eagle_config(eagle_cfg) -> None:
    config_lib.check_keys(eagle_cfg, eagle_defaults(), "eagle")
    for key in ("num_layers", "unroll"):
        require(is_int(eagle_cfg[key]) and eagle_cfg[key] > 0, f"eagle.{key}", eagle_cfg[key], "a positive integer")
    require(is_int(eagle_cfg.draft_vocab) and eagle_cfg.draft_vocab >= 0, "eagle.draft_vocab",
             eagle_cfg.draft_vocab, "a non-negative integer (0: the whole vocabulary)")
    for key in ("token_weight", "feature_weight", "feature_noise"):
        require(is_number(eagle_cfg[key]) and eagle_cfg[key] >= 0, f"eagle.{key}", eagle_cfg[key],
                 "a non-negative number")
    layers = eagle_cfg.feature_layers
    require(isinstance(layers, (tuple, list)) and all(is_int(i) and i >= 0 for i in layers)
            and len(set(layers)) == len(layers), "eagle.feature_layers", layers,
            "distinct layer indices (empty: the target's final feature)")


def validate_hydra_config(hydra_cfg) -> None:
    config_lib.check_keys(hydra_cfg, hydra_defaults(), "hydra")
    for key in ("num_heads", "num_layers"):
        require(is_int(hydra_cfg[key]) and hydra_cfg[key] > 0, f"hydra.{key}", hydra_cfg[key], "a positive integer")
    require(is_int(hydra_cfg.draft_vocab) and hydra_cfg.draft_vocab >= 0, "hydra.draft_vocab", hydra_cfg.draft_vocab,
            "a non-negative integer (0: the whole vocabulary)")
    require(is_number(hydra_cfg.decay) and 0 < hydra_cfg.decay <= 1, "hydra.decay", hydra_cfg.decay,
            "a number in (0, 1]")
    teacher = hydra_cfg.get("teacher", 0.0)
    require(is_number(teacher) and 0 <= teacher <= 1, "hydra.teacher", teacher, "a number in [0, 1]")


def _heads_seq_len(section: str, heads_cfg) -> tuple[int, str]:
    """The data.seq_len rule of heads (Medusa, Hydra) in `section`: head k is scored k+1 tokens ahead."""
    return heads_cfg.num_heads, f"{section}.num_heads={heads_cfg.num_heads} (head k is scored k+1 tokens ahead)"


def _eagle_seq_len(eagle_cfg) -> tuple[int, str]:
    depth = eagle_cfg.unroll + 1
    return depth, f"eagle.unroll + 1 = {depth} (depth s guesses s + 1 tokens ahead)"


def _medusa_against_run(config) -> None:
    n = config.medusa.draft_vocab
    require(n <= config.model.vocab_size, "medusa.draft_vocab", n,
            f"at most the target's model.vocab_size={config.model.vocab_size}")
    # The draft vocabulary is the target's most frequent reply tokens; corpus text holds no replies.
    require(not n or reads_selfdistill(config), "medusa.draft_vocab", n,
            f"0 when the heads train on corpus text (data.source={config.data.source!r}): a draft vocabulary is the "
            "most frequent tokens of the target's own replies, so it needs a self-distillation set (`python -m "
            "launch.selfdistill`) as data.source")


def _eagle_against_run(config) -> None:
    require(all(i < config.model.n_layers for i in config.eagle.feature_layers), "eagle.feature_layers",
            config.eagle.feature_layers, f"layer indices of the target, below n_layers={config.model.n_layers}")


class DrafterSection(NamedTuple):
    """How `validate_config` checks the section of a drafter trained on the frozen target (its `train.loss`)."""

    validate: Callable[[Any], None]  # the section's own keys and values
    seq_len_rule: Callable[[Any], tuple[int, str]]  # section -> (data.seq_len must exceed it, what sets it and why)
    defined_in: str  # the config file that builds such a section
    against_run: Callable[[Any], None] | None = None  # checks of the section against the rest of the config


DRAFTER_SECTIONS = {
    "medusa": DrafterSection(validate_medusa_config, functools.partial(_heads_seq_len, "medusa"),
                             "configs/medusa.py", _medusa_against_run),
    "hydra": DrafterSection(validate_hydra_config, functools.partial(_heads_seq_len, "hydra"), "configs/hydra.py"),
    "eagle": DrafterSection(validate_eagle_config, _eagle_seq_len, "configs/eagle.py", _eagle_against_run),
}


def _validate_drafter_section(config, loss: str, drafter: DrafterSection) -> None:
    """The `loss` section of a drafter run: present, valid, and fitting data.seq_len and the rest of the run."""
    if loss not in config:
        article = "an" if loss[0] in "aeiou" else "a"
        raise ConfigError(f"train.loss={loss!r} needs {article} `{loss}` section (see {drafter.defined_in})")
    drafter.validate(config[loss])
    reach, why = drafter.seq_len_rule(config[loss])
    require(config.data.seq_len > reach, "data.seq_len", config.data.seq_len, f"more than {why}")
    if drafter.against_run is not None:
        drafter.against_run(config)


def reads_selfdistill(config) -> bool:
    """Whether the run trains on a self-distillation set's stored features (EAGLE and Hydra always, Medusa heads
    when `data.source` is such a set) rather than running a model over corpus text."""
    loss = (config.get("train") or {}).get("loss")
    source = config.data.get("source")
    return loss in SELFDISTILL_ONLY or (loss == "medusa" and isinstance(source, str)
                                        and data_lib.is_selfdistill_set(source))


def needs_target(config) -> bool:
    """Whether the run reads a target checkpoint: heads and feature drafters always, a draft model when it
    distils."""
    train = config.get("train") or {}
    loss = train.get("loss")
    return loss in ON_TARGET or (loss == "distill" and train.get("distill_alpha", 0) > 0)


def validate_config(config) -> None:
    """Every section a training run reads, checked before any compute; raises ConfigError / InputError."""
    for key in config:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown top-level config key {key!r}{config_lib.nearest_keys(key, TOP_LEVEL_KEYS)}; "
                              f"allowed: {sorted(TOP_LEVEL_KEYS)}")
    for key in ("model", "data", "mesh", "train"):
        if key not in config:
            raise ConfigError(f"the config has no `{key}` section (configs build on "
                              "jaxspec.config.base_config() and add `train = train_defaults()`)")
    require(is_int(config.get("seed", 0)), "seed", config.get("seed"), "an integer")
    config_lib.validate_model_config(config.model)
    config_lib.check_keys(config.data, config_lib.data_defaults(), "data")
    config_lib.check_keys(config.mesh, config_lib.mesh_defaults(), "mesh")
    validate_train_config(config.train, config.model)
    if needs_target(config):
        target = config.get("target_workdir", "")
        why = (f"train.loss={config.train.loss!r}" if config.train.loss in ON_TARGET
               else f"train.distill_alpha={config.train.distill_alpha}")
        require(isinstance(target, str) and bool(target), "target_workdir", target,
                 f"a training workdir holding the target checkpoint ({why} reads it)")
    drafter = DRAFTER_SECTIONS.get(config.train.loss)
    if drafter is not None:
        _validate_drafter_section(config, config.train.loss, drafter)
    if config.train.loss in SELFDISTILL_ONLY:
        require(data_lib.is_selfdistill_set(config.data.source), "data.source", config.data.source,
                "a self-distillation set (a directory made by `python -m launch.selfdistill`) for "
                f"train.loss={config.train.loss!r}, which reads the target's stored features")
    spec = data_lib.parse_data_config(config.data)
    # A window from the reply cuts the prompt off: only drafters that read each position on its own may use it.
    require(spec.window == "start" or config.train.loss in POSITIONWISE, "data.window", spec.window,
            f"'start' for train.loss={config.train.loss!r}, which reads the context before each position "
            f"('reply' suits {' and '.join(POSITIONWISE)} heads)")
    if config.train.loss not in ON_TARGET:  # those train heads over the target, whose context it is
        require(config.data.seq_len <= config.model.max_len, "data.seq_len", config.data.seq_len,
                f"at most model.max_len={config.model.max_len} (positions past it are never decoded; raise "
                "model.max_len to train longer sequences)")
    sizes = dict(zip(mesh_lib.MESH_AXES, mesh_lib.resolve_axis_sizes(config.mesh, jax.device_count())))
    batch_shards = sizes["data"] * sizes["fsdp"]
    require(config.data.batch_size % batch_shards == 0, "data.batch_size", config.data.batch_size,
             f"a multiple of the mesh's data x fsdp size ({batch_shards}), which splits the batch")
    seq = sizes["sequence"]
    require(config.data.seq_len % seq == 0, "data.seq_len", config.data.seq_len,
             f"a multiple of mesh.sequence={seq} (each device holds one equal chunk of the sequence)")
    if seq > 1 and "M" in config.model.layer_pattern:
        require(config.data.seq_len // seq >= config.model.mamba.d_conv - 1, "mesh.sequence", seq,
                 f"at most data.seq_len / (mamba.d_conv - 1) = {config.data.seq_len // (config.model.mamba.d_conv - 1)}"
                 " (each chunk must hold a whole Mamba conv window)")
