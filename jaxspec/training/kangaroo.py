"""Training a Kangaroo adapter (jaxspec/models/kangaroo.py) over a frozen target, on a self-distillation set.

The set holds the target's own greedy replies, so at every reply position t the target's next token is the
set's token t + 1: the adapter is trained by cross-entropy of the draft's logits against those tokens (prompt
positions carry no loss). The draft's shallow part is the target's own layers 0..k-1, run on the fly in every
step; only the adapter (attention sub-block and its norm) gets gradients, so nothing is back-propagated through
the shallow layers. Batches are drawn by a generator seeded with (seed, step), so a resumed run sees the batches
an uninterrupted one would; AdamW with warmup and cosine decay (`optim.make_optimizer`).

A run lives in a workdir (`checkpoint.CheckpointManager`): the adapter and optimizer state at every `save_every`
steps and at the last, and config.json with the run's config and the target it was trained for (a fingerprint
of the target parameters the draft shares). A workdir that holds a checkpoint resumes from it, refused if its
config differs; `load_adapter` refuses the adapter for another target, naming the config file.

    python -m launch.train_kangaroo --config=configs/kangaroo.py --workdir=/tmp/kangaroo --config.data=/tmp/sd
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxspec import zoo
from jaxspec.config import check_same_keys, is_int, is_number, require
from jaxspec.errors import InputError
from jaxspec.models import kangaroo
from jaxspec.training import checkpoint, optim, selfdistill
from jaxspec.training.train_config import train_defaults

METRICS_FILE = "kangaroo_metrics.json"
# Keys that change when or how often a run reports, never what it computes: a resumed run may differ in them.
_REPORTING_KEYS = ("eval_every", "save_every")


def config_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        target="smollm2-135m-instruct",  # a zoo name or a jaxspec workdir
        data="",  # a self-distillation set of the target (launch.selfdistill); required to train
        exit_layer=2,  # the draft runs the target's layers 0..exit_layer-1, then the adapter
        steps=600,
        batch_size=8,  # sequences per step
        learning_rate=1e-3,  # peak, after warmup
        warmup_steps=50,
        min_lr_ratio=0.1,  # final learning rate / peak (cosine)
        weight_decay=0.0,
        grad_clip=1.0,  # global-norm clipping; 0 disables it
        val_fraction=0.1,  # replies held out to score the adapter
        eval_every=100,  # held-out evaluation every so many steps (0: at the end only)
        save_every=100,
        seed=0,  # adapter initialisation, held-out split, batches
    ))


def validate_config(config) -> None:
    """Raise ConfigError naming the key, the value and what is allowed (exit_layer is checked against the target
    by `check_exit_layer` once it is loaded)."""
    check_same_keys(config, config_defaults())
    require(isinstance(config.target, str) and bool(config.target), "target", config.target,
            "a zoo model name or a jaxspec workdir")
    require(isinstance(config.data, str), "data", config.data, "a self-distillation set's directory")
    for key in ("exit_layer", "steps", "batch_size", "save_every"):
        require(is_int(config[key]) and config[key] > 0, key, config[key], "a positive integer")
    for key in ("warmup_steps", "eval_every", "seed"):
        require(is_int(config[key]) and config[key] >= 0, key, config[key], "a non-negative integer")
    require(config.warmup_steps < config.steps, "warmup_steps", config.warmup_steps,
            f"fewer than steps={config.steps}")
    require(is_number(config.learning_rate) and config.learning_rate > 0, "learning_rate", config.learning_rate,
            "a positive number")
    require(is_number(config.min_lr_ratio) and 0 <= config.min_lr_ratio <= 1, "min_lr_ratio", config.min_lr_ratio,
            "a number in [0, 1]")
    for key in ("weight_decay", "grad_clip"):
        require(is_number(config[key]) and config[key] >= 0, key, config[key], "a non-negative number")
    require(is_number(config.val_fraction) and 0 < config.val_fraction < 1, "val_fraction", config.val_fraction,
            "a number in (0, 1)")


def check_exit_layer(config, model_cfg) -> None:
    require(config.exit_layer < model_cfg.n_layers, "exit_layer", config.exit_layer,
            f"a layer index in [1, {model_cfg.n_layers - 1}] (the target has n_layers={model_cfg.n_layers})")


# ------------------------------------------------------------------------------------------ the target


def target_fingerprint(target_params, exit_layer: int) -> str:
    """A hash of the target parameters the draft shares (embedding, layers 0..k-1, LM head): names, dtypes,
    shapes and bytes, so an adapter is only ever used over the very layers it was trained on."""
    digest = hashlib.blake2b(digest_size=16)
    shared = kangaroo.shared_params(target_params, exit_layer)
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(shared)[0], key=lambda x: jax.tree_util.keystr(x[0])):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def read_set(config, model_cfg, target_workdir: str) -> dict:
    """The arrays of the self-distillation set `config.data`, refused when another target wrote its replies (when
    both name their workdir): the adapter learns the target's own next tokens."""
    require(bool(config.data), "data", config.data, "a self-distillation set of the target (python -m "
            "launch.selfdistill ... --out=DIR; then --config.data=DIR)")
    manifest, arrays = selfdistill.read(config.data)
    for key in ("d_model", "vocab_size"):
        if manifest[key] != model_cfg[key]:
            raise InputError(f"{config.data}: the self-distillation set was made by a target with {key}="
                             f"{manifest[key]}; this target has {key}={model_cfg[key]}")
    made_by = manifest.get("target_workdir", "")
    if made_by and target_workdir and not zoo.same_target(made_by, target_workdir):
        raise InputError(f"{config.data}: the self-distillation set holds the replies of the target {made_by!r}, "
                         f"not {target_workdir!r}")
    return arrays


# ------------------------------------------------------------------------------------------ data


class Replies(NamedTuple):
    """A self-distillation set as training rows: position first[n] + i (i < count[n]) predicts reply token i."""

    tokens: np.ndarray  # [N, T] int32, prompt then reply, cut to the longest example
    first: np.ndarray  # [N] int32: reply_start - 1
    count: np.ndarray  # [N] int32: reply tokens

    @property
    def width(self) -> int:
        """The longest reply: the positions a row's loss reads (one static shape)."""
        return int(self.count.max())

    def rows(self, index) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jnp.asarray(self.tokens[index]), jnp.asarray(self.first[index]), jnp.asarray(self.count[index])


def training_replies(arrays) -> Replies:
    """The `Replies` of a self-distillation set's arrays (`selfdistill.read`): the positions t with
    reply_start - 1 <= t < lengths - 1, those of `selfdistill.loss_mask`."""
    lengths, start = np.asarray(arrays["lengths"], np.int32), np.asarray(arrays["reply_start"], np.int32)
    count = lengths - start
    if not np.any(count > 0):
        raise InputError("the self-distillation set has no reply tokens to train the adapter on")
    tokens = np.asarray(arrays["tokens"], np.int32)[:, :int(lengths.max())]
    return Replies(tokens, start - 1, count)


def split_examples(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): a seeded permutation of n examples, whole replies on one side each."""
    if n < 2:
        raise InputError(f"the self-distillation set has {n} example(s); the adapter needs at least 2 (one held out)")
    order = np.random.default_rng(seed).permutation(n)
    held = min(n - 1, max(1, int(round(val_fraction * n))))
    return np.sort(order[held:]), np.sort(order[:held])


def batch_rows(seed: int, step: int, train_rows: np.ndarray, batch_size: int) -> np.ndarray:
    """The rows of step `step`'s batch: a function of (seed, step) only, so a resumed run draws the same ones."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(train_rows, batch_size, replace=len(train_rows) < batch_size)


# ------------------------------------------------------------------------------------------ the programs


def reply_scores(model, params, tokens, first, count, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed cross-entropy, summed top-1 agreement, count) of the draft's next-token predictions at the reply
    positions first + i, i < count, of tokens [B, T]. The LM head runs on those `width` positions per row only
    (the full forward's logits are unused, so the compiled program leaves them out): most positions of an
    example are its prompt's."""
    hidden = model.apply({"params": params}, tokens, return_hidden=True).hidden  # [B, T, d]
    last = tokens.shape[1] - 1
    at = jnp.minimum(first[:, None] + jnp.arange(width)[None, :], last)  # [B, width]
    logits = model.model.apply({"params": params}, jnp.take_along_axis(hidden, at[..., None], axis=1),
                               method="project")
    labels = jnp.take_along_axis(tokens, jnp.minimum(at + 1, last), axis=1)
    weight = (jnp.arange(width)[None, :] < count[:, None]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    agree = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(ce * weight), jnp.sum(agree * weight), jnp.sum(weight)


def optimizer_settings(config) -> ml_collections.FrozenConfigDict:
    """The `optim.make_optimizer` train section of a Kangaroo config (frozen: a cache key)."""
    t = train_defaults()
    t.update(dict(steps=config.steps, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                  min_lr_ratio=config.min_lr_ratio, weight_decay=config.weight_decay, grad_clip=config.grad_clip))
    return ml_collections.FrozenConfigDict(t)


@functools.cache
def programs(model, settings: ml_collections.FrozenConfigDict, width: int):
    """(optimizer, jitted train step, jitted scores) for draft `model` and replies of `width`; cached, so runs of one
    shape compile once."""
    optimizer, _ = optim.make_optimizer(settings)

    def scores(adapter, shared, tokens, first, count):
        # The shared target layers are constants of the step: gradients reach the adapter only.
        params = {**jax.lax.stop_gradient(shared), **adapter}
        return reply_scores(model, params, tokens, first, count, width)

    def loss(adapter, shared, tokens, first, count):
        total, _, positions = scores(adapter, shared, tokens, first, count)
        return total / jnp.maximum(positions, 1.0)

    @jax.jit
    def step(adapter, opt_state, shared, tokens, first, count):
        value, grads = jax.value_and_grad(loss)(adapter, shared, tokens, first, count)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, value

    return optimizer, step, jax.jit(scores)


def evaluate(scores, adapter, shared, replies: Replies, rows_per_forward: int) -> dict:
    """{"loss", "agreement", "positions"}: mean next-token cross-entropy and top-1 agreement with the target's
    tokens over every reply position of `replies`, in forwards of `rows_per_forward` rows (one compiled shape)."""
    total, n = np.zeros(3), len(replies.tokens)
    for start in range(0, n, rows_per_forward):
        index = np.arange(start, start + rows_per_forward)
        real = index < n  # padding rows: row 0 again, with no positions
        tokens, first, count = replies.rows(np.where(real, index, 0))
        count = jnp.where(jnp.asarray(real), count, 0)
        total += np.asarray([float(x) for x in scores(adapter, shared, tokens, first, count)])
    positions = max(total[2], 1.0)
    return {"loss": total[0] / positions, "agreement": total[1] / positions, "positions": int(total[2])}


# ------------------------------------------------------------------------------------------ runs


def run_config(config, target_params) -> ml_collections.ConfigDict:
    """What a workdir's config.json records: the run's config and the target it trains for."""
    return ml_collections.ConfigDict({
        "kangaroo": config.to_dict(),
        "target_fingerprint": target_fingerprint(target_params, config.exit_layer),
        "train": {"steps": config.steps},  # what checkpoint.finished reads
    })


def _check_resumable(workdir: str, saved, wanted) -> None:
    path = os.path.join(workdir, checkpoint.CONFIG_FILE)
    if "kangaroo" not in saved:
        raise InputError(f"{path} is not a Kangaroo adapter run's config; use a fresh workdir")
    if saved.target_fingerprint != wanted.target_fingerprint:
        raise InputError(f"{path}: the run in {workdir} trains an adapter for another target (fingerprint "
                         f"{saved.target_fingerprint}, this target's {wanted.target_fingerprint}); use a fresh workdir")
    for key, value in wanted.kangaroo.items():
        old = saved.kangaroo.get(key)
        if key not in _REPORTING_KEYS and json.dumps(old) != json.dumps(value):
            raise InputError(f"{path}: the run in {workdir} has {key}={old!r}, this config {key}={value!r}; resume "
                             "with the same config or use a fresh workdir")


def train(config, model_cfg, target_params, arrays, workdir: str, stop_at: int | None = None,
          max_seconds: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) the adapter of `config` (validated here) for the target (`model_cfg`, `target_params`) on
    a self-distillation set's `arrays`, checkpointing in `workdir`. `stop_at` (a step) and `max_seconds` (of
    training steps, a shared machine's budget): end after that step, saving it, as an interrupted run would (a
    later call resumes; the schedule stays the one of config.steps). Returns {"losses": [(step, training loss)] of
    the steps this call ran, "unadapted", "adapted": held-out `evaluate` of the initial adapter (the plain shallow
    exit) and of the last one, "step"}; the metrics are also written to workdir/kangaroo_metrics.json."""
    validate_config(config)
    check_exit_layer(config, model_cfg)
    k = config.exit_layer
    replies = training_replies(arrays)
    train_rows, held_rows = split_examples(len(replies.tokens), config.val_fraction, config.seed)
    held_out = Replies(*(x[held_rows] for x in replies))
    model = kangaroo.draft_model(model_cfg, k)
    shared = kangaroo.shared_params(target_params, k)
    settings = optimizer_settings(config)
    optimizer, step_fn, scores = programs(model, settings, replies.width)
    initial = kangaroo.init_adapter(target_params, model_cfg, k, config.seed)
    state = {"params": initial, "opt_state": optimizer.init(initial)}
    saved_config = run_config(config, target_params)
    last = config.steps if stop_at is None else min(stop_at, config.steps)
    losses = []
    with checkpoint.CheckpointManager(workdir, save_every=config.save_every, keep=2) as manager:
        start = 0
        if manager.latest_step() is not None:
            _check_resumable(workdir, checkpoint.load_config(workdir), saved_config)
            state, _, start = manager.restore_train_state(jax.eval_shape(lambda: state))
            log(f"resumed from step {start} in {workdir}")

        def held(adapter) -> dict:
            return evaluate(scores, adapter, shared, held_out, config.batch_size)

        began, number = time.perf_counter(), start
        while number < last:
            number += 1
            rows = batch_rows(config.seed, number, train_rows, config.batch_size)
            adapter, opt_state, loss = step_fn(state["params"], state["opt_state"], shared, *replies.rows(rows))
            state = {"params": adapter, "opt_state": opt_state}
            losses.append((number, float(loss)))
            if config.eval_every and number % config.eval_every == 0 and number < config.steps:
                score = held(state["params"])
                log(f"step {number}: training loss {float(loss):.4f}, held-out loss {score['loss']:.4f}, agreement "
                    f"{score['agreement']:.4f} ({time.perf_counter() - began:.0f} s)")
            out_of_time = max_seconds is not None and time.perf_counter() - began > max_seconds
            manager.save(number, state, {"step": number}, saved_config, force=number == last or out_of_time)
            if out_of_time and number < last:
                log(f"stopped after step {number}: the {max_seconds:.0f} s budget is spent (run again to resume)")
                break
    metrics = {"unadapted": held(initial), "adapted": held(state["params"]), "step": number}
    with open(os.path.join(workdir, METRICS_FILE), "w") as fh:
        json.dump(metrics, fh, indent=1)
    return {"losses": losses, **metrics}


def load_adapter(workdir: str, target_params, model_cfg) -> dict:
    """The adapter saved in `workdir`, refused (naming its config file) unless it was trained for this target:
    the target parameters the draft shares must be those it was trained over."""
    params, config = checkpoint.restore_params(workdir)
    path = os.path.join(workdir, checkpoint.CONFIG_FILE)
    if "kangaroo" not in config or "target_fingerprint" not in config:
        raise InputError(f"{path} is not a Kangaroo adapter run's config (train one with python -m "
                         "launch.train_kangaroo)")
    exit_layer = config.kangaroo.exit_layer
    kangaroo.check_exit_layer(model_cfg, exit_layer)
    fingerprint = target_fingerprint(target_params, exit_layer)
    if fingerprint != config.target_fingerprint:
        raise InputError(f"{path}: the Kangaroo adapter in {workdir} was trained for another target (its target "
                         f"{config.kangaroo.target!r} has fingerprint {config.target_fingerprint}; this target's "
                         f"layers 0..{exit_layer - 1}, embedding and LM head give {fingerprint})")
    return params
