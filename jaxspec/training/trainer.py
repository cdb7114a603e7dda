"""The training loop: a jitted, donated, data-parallel train step; evaluation; metrics; checkpoints; resume.

    metrics = train(config, workdir)     # what `python -m launch.train` runs

The train state is a dict pytree ``{"params", "opt_state", "step", "rng"}`` (``rng`` as uint32 key data,
advanced every step so that stochastic objectives resume exactly). Only trainable parameters live in it:
a Medusa run's ``params`` are the heads' (the frozen backbone is read from ``config.target_workdir``; on a
self-distillation set only its LM head, when shared, and with `medusa.draft_vocab` its draft vocabulary), an EAGLE
run's the feature drafter's and a Hydra run's the heads' (the target's embedding and vocabulary-trimmed LM head are
frozen; the trimmed vocabulary is saved as ``workdir/draft_vocab.npy``), a distilling draft run's are the draft's
(the teacher is read the same way).

Parallelism: the step is ``jax.jit`` with ``in_shardings``/``out_shardings`` of ``NamedSharding`` on the mesh
of ``config.mesh``: the batch is split over the ``data`` (and ``fsdp``) axes, parameters follow the logical
rules of ``jaxspec.parallel.sharding`` (replicated under the default mesh), and XLA inserts the gradient
all-reduce. On one device the same code runs unchanged.

Resume: a workdir with a checkpoint continues from its latest step (params, optimizer, step, RNG and the
data stream's position), so the later losses equal an uninterrupted run's. A missing, partial or
mismatched checkpoint raises (from ``checkpoint``), and a workdir holding an earlier run's files but no
checkpoint is refused rather than overwritten.

Each log and evaluation step appends one JSON object to ``workdir/metrics.jsonl``: ``step``, ``loss``,
``lr``, ``grad_norm``, ``tokens_per_s`` and per-stream figures over the steps since the last log, and
``val_*`` figures (see ``losses.summarize``) at evaluation steps. ``tokens_per_s`` counts train-step time
only: the first step of a process (compilation), evaluation and checkpointing are excluded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxspec import config as config_lib
from jaxspec import zoo
from jaxspec.config import ConfigError
from jaxspec.errors import InputError
from jaxspec.models.eagle import EagleNet, drafter_model_cfg, target_side
from jaxspec.models.heads import MedusaHeads, lm_head_kernel
from jaxspec.models.hydra import HydraHeads
from jaxspec.models.lm import build_model, count_params, init_params
from jaxspec.parallel import mesh as mesh_lib
from jaxspec.parallel import sharding as sharding_lib
from jaxspec.training import checkpoint, losses, optim, selfdistill
from jaxspec.training.data import make_datasets
from jaxspec.training.tokenizer import load_tokenizer
from jaxspec.training.train_config import (
    ON_TARGET,
    eagle_defaults,
    hydra_defaults,
    medusa_defaults,
    needs_target,
    reads_selfdistill,
    train_defaults,
    validate_config,
)

METRICS_FILE = "metrics.jsonl"
DRAFT_VOCAB_FILE = "draft_vocab.npy"  # an EAGLE, Hydra or Medusa run's draft vocabulary: ids, most frequent first

TrainState = dict[str, Any]  # {"params", "opt_state", "step", "rng"}


# ------------------------------------------------------------------------------------------------ config


def prepare_config(config) -> ml_collections.ConfigDict:
    """A validated copy of `config` (train/medusa keys it leaves out at their defaults), with the target's
    model for Medusa runs; raises before any compute. `target_workdir` may name a zoo model (fetched and
    converted on first use).

    Medusa heads and EAGLE drafters sit on the target, so their run's `model` section is the target's (from
    ``target_workdir/config.json``), and an EAGLE run reads its data with the target's tokenizer. A distilling
    draft must share the target's vocabulary and tokenizer.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for section, defaults in (("train", train_defaults), ("medusa", medusa_defaults), ("eagle", eagle_defaults),
                              ("hydra", hydra_defaults)):
        if isinstance(config.get(section), ml_collections.ConfigDict):  # keys left out take their defaults
            filled = defaults()
            filled.update(config[section])
            config[section] = filled
    target = None
    if needs_target(config) and config.get("target_workdir") in zoo.ZOO:  # a zoo name: its converted workdir
        config.target_workdir = zoo.model_workdir(config.target_workdir)
    if needs_target(config) and config.get("target_workdir"):
        target = checkpoint.load_config(config.target_workdir)
        if config.train.loss in ON_TARGET:
            # Model keys added since the target was saved take their defaults (as restore_params reads it).
            config.model = config_lib.with_defaults(target.model, config_lib.model_defaults())
        if reads_selfdistill(config):
            config.data.tokenizer = target.data.tokenizer
    validate_config(config)
    if target is None:
        return config
    where = f"target_workdir={config.target_workdir!r}"
    if reads_selfdistill(config):
        _check_selfdistill_target(config.data.source, config.target_workdir, target.model)
        stream_index(config)
    if target.data.tokenizer != config.data.tokenizer:
        raise ConfigError(f"config.data.tokenizer={config.data.tokenizer!r} differs from the target's "
                          f"{target.data.tokenizer!r} ({where}); a drafter must use the target's tokenizer")
    if target.model.vocab_size != config.model.vocab_size:
        raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} differs from the target's "
                          f"{target.model.vocab_size} ({where}); a draft model must share the vocabulary")
    return config


def _check_selfdistill_target(source: str, target_workdir: str, target_model) -> None:
    """A self-distillation set holds one target's replies and features: refuse it for another target."""
    with open(os.path.join(source, selfdistill.MANIFEST)) as fh:
        manifest = json.load(fh)
    made_by = manifest.get("target_workdir", "")
    if made_by and not zoo.same_target(made_by, target_workdir):
        raise ConfigError(f"data.source={source!r} was generated by the target {made_by!r}, not target_workdir="
                          f"{target_workdir!r}: a drafter learns its own target's features")
    if (manifest.get("d_model"), manifest.get("vocab_size")) != (target_model.d_model, target_model.vocab_size):
        raise ConfigError(f"data.source={source!r} stores d_model={manifest.get('d_model')}, vocab_size="
                          f"{manifest.get('vocab_size')}; the target has d_model={target_model.d_model}, "
                          f"vocab_size={target_model.vocab_size}")


def stream_index(config) -> tuple[int, ...]:
    """Where `eagle.feature_layers` (EAGLE-3's fused streams) lie among the layers the self-distillation set
    `data.source` stores; a layer it does not store is refused by name."""
    layers = tuple(config.eagle.feature_layers) if config.train.loss == "eagle" else ()
    if not layers:
        return ()
    with open(os.path.join(config.data.source, selfdistill.MANIFEST)) as fh:
        stored = list(json.load(fh).get("feature_layers", []))
    missing = [i for i in layers if i not in stored]
    if missing:
        raise ConfigError(f"eagle.feature_layers={list(layers)}: the self-distillation set data.source="
                          f"{config.data.source!r} stores the residual streams of layers {stored}, not {missing} "
                          "(make the set with those feature_layers, configs/selfdistill.py)")
    return tuple(stored.index(i) for i in layers)


def load_target(config) -> tuple[Any, Any]:
    """(target model module, target params) of `config.target_workdir`."""
    params, target_config = checkpoint.restore_params(config.target_workdir)
    return build_model(target_config.model), params


# ------------------------------------------------------------------------------------------------ trainer


def make_init_state(init_params, optimizer):
    """key data (uint32) -> a fresh train state."""

    def init_state(key_data) -> TrainState:
        init_key, rng = jax.random.split(jax.random.wrap_key_data(key_data))
        params = init_params(init_key)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(rng)}

    return init_state


def _seed_key_data(seed: int):
    return jax.random.key_data(jax.random.key(seed))


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The jitted train and eval steps of one config on one mesh, and what they need."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    objective: losses.Objective
    init_fn: Any  # key data -> train state
    frozen: Any  # params read but not trained (Medusa backbone, EAGLE head, distillation teacher), on the mesh
    state_shardings: Any
    batch_shardings: Any
    train_step: Any  # (state, batch, frozen) -> (state, metrics); donates the state
    eval_step: Any  # (params, frozen, batch) -> stats

    @property
    def tokens_per_step(self) -> int:
        return self.config.data.batch_size * self.config.data.seq_len

    def init_state(self, seed: int) -> TrainState:
        return jax.jit(self.init_fn, out_shardings=self.state_shardings)(_seed_key_data(seed))

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings (the target of a checkpoint restore)."""
        shapes = jax.eval_shape(self.init_fn, _seed_key_data(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A host batch (the same global batch on every process) as global arrays split over the mesh."""
        def put(x, sharding):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return {k: put(batch[k], sharding) for k, sharding in self.batch_shardings.items()}

    def evaluate(self, params, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
        """``val_*`` figures over `batches`, from statistics summed over all of them."""
        totals: dict[str, dict[str, float]] = {}
        for batch in batches:
            losses.accumulate(totals, jax.device_get(self.eval_step(params, self.frozen, self.put_batch(batch))))
        if not totals:
            raise InputError("evaluation saw no validation batches")
        return losses.summarize(totals, self.objective, prefix="val_")


def _replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _state_shardings(optimizer, abstract_state, mesh, rules) -> TrainState:
    params = sharding_lib.param_shardings(abstract_state["params"], mesh, rules)
    # Optimizer moments shard like their parameters; counters and the like are replicated.
    opt_state = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state["opt_state"], params,
                                      transform_non_params=lambda _: _replicated(mesh))
    return {"params": params, "opt_state": opt_state, "step": _replicated(mesh), "rng": _replicated(mesh)}


def _model_and_objective(config, tokenizer, target) -> tuple[Any, losses.Objective]:
    """(init function key -> trainable params, objective) for `config.train.loss`."""
    train_cfg, loss = config.train, config.train.loss
    pad_id = tokenizer.pad_id
    if loss == "eagle":
        d = config.model.d_model
        streams = stream_index(config)
        net = EagleNet(drafter_model_cfg(config.model, config.eagle.num_layers), fused_streams=len(streams))
        width = d * max(1, len(streams))
        init = lambda key: net.init(key, jnp.zeros((1, 1, width)), jnp.zeros((1, 1, d)))["params"]
        return init, losses.eagle_objective(net, config.eagle, streams)
    if loss == "hydra":
        h, d = config.hydra, config.model.d_model
        heads = HydraHeads(h.num_heads, d, h.num_layers)
        init = lambda key: heads.init(key, jnp.zeros((1, 1, d)), jnp.zeros((1, 1, h.num_heads, d)))["params"]
        return init, losses.hydra_objective(heads, h)
    if loss == "medusa":
        m = config.medusa
        outputs = m.draft_vocab or config.model.vocab_size  # a draft vocabulary's rows, or every id
        heads = MedusaHeads(m.num_heads, config.model.d_model, outputs, m.num_layers, m.share_lm_head)
        kernel = jnp.zeros((config.model.d_model, outputs)) if m.share_lm_head else None
        init = lambda key: heads.init(key, jnp.zeros((1, 1, config.model.d_model)), kernel)["params"]
        if reads_selfdistill(config):  # the stored final features stand in for the backbone
            return init, losses.medusa_selfdistill_objective(heads, train_cfg)
        if target is None:
            raise InputError("train.loss='medusa' needs the target (backbone) model and params")
        return init, losses.medusa_objective(target[0], heads, train_cfg, pad_id)
    model = build_model(config.model)
    byte_counts = jnp.asarray(losses.token_byte_counts(tokenizer, config.model.vocab_size))
    init = lambda key: init_params(model, key)
    if loss == "matformer":
        return init, losses.matformer_objective(model, train_cfg, pad_id, byte_counts)
    if loss == "distill":
        target_model = None if target is None else target[0]
        return init, losses.distill_objective(model, target_model, train_cfg, pad_id, byte_counts)
    return init, losses.lm_objective(model, train_cfg, pad_id, byte_counts)


def build_trainer(config, mesh, tokenizer=None, target=None) -> Trainer:
    """The trainer of a prepared config. `target` is (model, params) when the objective reads a target."""
    tokenizer = tokenizer or load_tokenizer(config.data.tokenizer)
    rules = config.mesh.get("rules", mesh_lib.DEFAULT_RULES)
    init, objective = _model_and_objective(config, tokenizer, target)
    optimizer, schedule = optim.make_optimizer(config.train)
    frozen = {} if target is None else target[1]
    frozen_shardings = sharding_lib.param_shardings(frozen, mesh, rules)
    frozen = jax.device_put(frozen, frozen_shardings)
    replicated = _replicated(mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh, rules)
    batch_keys = ("tokens", "features", "mask") if reads_selfdistill(config) else ("inputs", "targets")
    if config.train.loss == "eagle" and config.eagle.feature_layers:
        batch_keys += ("layer_features",)
    batch_shardings = {key: batch_sharding for key in batch_keys}

    def train_step(state, batch, frozen):
        grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
        (loss, stats), grads = grad_fn(state["params"], frozen, batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))[0]
        new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": jax.random.key_data(rng)}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
                   "stats": stats}
        return new_state, metrics

    init_fn = make_init_state(init, optimizer)
    state_shardings = _state_shardings(optimizer, jax.eval_shape(init_fn, _seed_key_data(0)), mesh, rules)
    jitted_train_step = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                                out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_step = jax.jit(objective.stats, in_shardings=(state_shardings["params"], frozen_shardings,
                                                       batch_shardings), out_shardings=replicated)
    return Trainer(config, mesh, objective, init_fn, frozen, state_shardings, batch_shardings,
                   _under_mesh(jitted_train_step, mesh), _under_mesh(eval_step, mesh))


def _under_mesh(fn, mesh):
    """Call `fn` with `mesh` ambient, so layers see the `sequence` axis and take their LASP-2 paths."""

    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    return call


# --------------------------------------------------------------------------------------------- bookkeeping


class TrainClock:
    """Seconds spent in train steps; stopped around evaluation and checkpointing."""

    def __init__(self):
        self._total, self._since = 0.0, None

    def start(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self._total += time.perf_counter() - self._since
            self._since = None

    def read(self) -> float:
        return self._total + (0.0 if self._since is None else time.perf_counter() - self._since)


@dataclasses.dataclass
class LogWindow:
    """Per-step metrics (device arrays, fetched only when the window is flushed) since the last log."""

    metrics: list = dataclasses.field(default_factory=list)
    timed_tokens: int = 0
    clock_start: float = 0.0

    def flush(self, objective: losses.Objective, clock: TrainClock) -> dict[str, float]:
        fetched = jax.device_get(self.metrics)  # waits for the window's steps, so the clock read covers them
        clock_now = clock.read()
        stats: dict[str, dict[str, float]] = {}
        for m in fetched:
            losses.accumulate(stats, m["stats"])
        record = losses.summarize(stats, objective)
        record["loss"] = float(np.mean([m["loss"] for m in fetched]))
        record["grad_norm"] = float(np.mean([m["grad_norm"] for m in fetched]))
        record["lr"] = float(fetched[-1]["lr"])
        seconds = clock_now - self.clock_start
        if self.timed_tokens and seconds > 0:
            record["tokens_per_s"] = self.timed_tokens / seconds
        self.metrics, self.timed_tokens, self.clock_start = [], 0, clock_now
        return record


def _metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS_FILE)


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl` (empty when there is none). A last line without its newline is a
    record a killed run was appending: it is left out (a resumed run then rewrites the file without it)."""
    path = _metrics_path(workdir)
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        lines = fh.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number} is not a JSON record ({err}); the metrics file was edited or "
                                 "corrupted") from None
    return records


def _truncate_metrics(workdir: str, step: int) -> None:
    """Drop records newer than the checkpoint a run resumes from (the killed run logged past it)."""
    kept = [r for r in read_metrics(workdir) if r["step"] <= step]
    path = _metrics_path(workdir)
    with open(f"{path}.tmp", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(f"{path}.tmp", path)


def _append_metrics(workdir: str, record: Mapping[str, Any]) -> None:
    with open(_metrics_path(workdir), "a") as fh:
        fh.write(json.dumps(dict(record)) + "\n")


def _refuse_used_workdir(workdir: str) -> None:
    """A fresh start must not clobber an earlier run that never saved (or whose checkpoints were removed)."""
    found = [f for f in (checkpoint.CONFIG_FILE, METRICS_FILE) if os.path.isfile(os.path.join(workdir, f))]
    if found:
        raise InputError(
            f"workdir {workdir!r} holds files of an earlier run ({', '.join(found)}) but no checkpoint to "
            "resume from; use a fresh workdir or remove them")


# ------------------------------------------------------------------------------------------------- EAGLE


def draft_vocab(config, train_batches, workdir: str) -> np.ndarray:
    """The draft vocabulary of an EAGLE, Hydra or Medusa run: the `eagle.draft_vocab` (`hydra.draft_vocab`,
    `medusa.draft_vocab`) target ids most frequent among the training split's reply tokens (all ids when 0; a
    Medusa run asks only when > 0), most frequent first; saved once in the workdir and read back on resume, so a
    resumed run and the decoder use the same rows."""
    path = os.path.join(workdir, DRAFT_VOCAB_FILE)
    if os.path.isfile(path):
        return np.load(path)
    vocab_size = config.model.vocab_size
    n = config[config.train.loss].draft_vocab or vocab_size
    examples = train_batches.windows
    replies = examples["tokens"][:, 1:][examples["mask"][:, :-1]]  # mask[t]: token t+1 is a reply token
    counts = np.bincount(replies, minlength=vocab_size)
    ids = np.argsort(-counts, kind="stable")[:n].astype(np.int32)
    covered = counts[ids].sum() / max(counts.sum(), 1)
    print(f"draft vocabulary: {n} of {vocab_size} ids cover {covered:.2%} of the training replies' tokens")
    np.save(f"{path}.tmp.npy", ids)
    os.replace(f"{path}.tmp.npy", path)
    return ids


def _stored_features_side(config, target_params, train_batches, workdir: str) -> dict:
    """What a drafter trained on a self-distillation set reads of its frozen target: an EAGLE drafter or Hydra
    heads the token embedding and the (vocabulary-trimmed) LM head; Medusa heads the LM head when they share it,
    and on a draft vocabulary each target id's row in it (the LM head then restricted to those rows)."""
    if config.train.loss != "medusa":
        return target_side(target_params, config.model, draft_vocab(config, train_batches, workdir))
    m = config.medusa
    if not m.draft_vocab:
        return {"lm_head": lm_head_kernel(target_params, config.model)} if m.share_lm_head else {}
    side = target_side(target_params, config.model, draft_vocab(config, train_batches, workdir))
    return {"vocab_index": side["vocab_index"], **({"lm_head": side["head_t"].T} if m.share_lm_head else {})}


# ------------------------------------------------------------------------------------------------- train


def train(config, workdir: str) -> dict[str, float]:
    """Train (or resume) the run of `config` in `workdir`; returns the final metrics.

    The returned dict holds the last log record (``loss``, per-stream figures, ``lr``), the final
    evaluation (``val_loss``, ``val_bpb``, ...), ``step``, ``num_params``, ``tokens_per_s`` (over the whole
    run's timed steps), ``train_seconds``, ``compile_seconds`` and ``wall_seconds``.
    """
    wall_start = time.perf_counter()
    config = prepare_config(config)
    is_main = jax.process_index() == 0
    mesh = mesh_lib.make_mesh(config.mesh)
    train_batches, val_batches, tokenizer = make_datasets(config.data)
    if config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}, data.tokenizer={config.data.tokenizer!r})")
    target = load_target(config) if needs_target(config) else None
    if reads_selfdistill(config):
        os.makedirs(workdir, exist_ok=True)
        target = (target[0], _stored_features_side(config, target[1], train_batches, workdir))
    trainer = build_trainer(config, mesh, tokenizer, target)
    num_params = count_params(trainer.abstract_state()["params"])
    if is_main:
        print(f"config:\n{config}")
        frozen_note = f", frozen {count_params(trainer.frozen):,}" if target is not None else ""
        print(f"parameters: trainable {num_params:,}{frozen_note}; mesh {dict(mesh.shape)}")

    tc = config.train
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint.CheckpointManager(workdir, save_every=tc.save_every, keep=tc.keep_checkpoints)
    try:
        if manager.latest_step() is None:
            _refuse_used_workdir(workdir)
            state, start = trainer.init_state(config.seed), 0
        else:
            state, data_state, start = manager.restore_train_state(trainer.abstract_state())
            train_batches.restore(data_state)
            if is_main:
                _truncate_metrics(workdir, start)
                print(f"resumed from step {start} of {workdir}")
        final = _train_loop(trainer, state, start, train_batches, val_batches, manager, workdir, is_main)
    finally:
        manager.close()
    final.update(num_params=num_params, wall_seconds=time.perf_counter() - wall_start)
    return final


def _train_loop(trainer: Trainer, state, start, train_batches, val_batches, manager, workdir, is_main):
    config, tc = trainer.config, trainer.config.train
    clock, window = TrainClock(), LogWindow()
    record: dict[str, float] = {}
    compile_seconds, timed_steps = 0.0, 0
    bar = tqdm(total=tc.steps, initial=min(start, tc.steps), desc="train", dynamic_ncols=True,
               disable=not (tc.progress_bar and is_main))
    for step in range(start + 1, tc.steps + 1):
        batch = trainer.put_batch(next(train_batches))
        if step == start + 1:
            first = time.perf_counter()
            state, metrics = trainer.train_step(state, batch, trainer.frozen)
            jax.block_until_ready(state)
            compile_seconds = time.perf_counter() - first
            clock.start()
            window.clock_start = clock.read()
        else:
            state, metrics = trainer.train_step(state, batch, trainer.frozen)
            window.timed_tokens += trainer.tokens_per_step
            timed_steps += 1
        window.metrics.append(metrics)
        record = {}
        if step % tc.log_every == 0 or step == tc.steps:
            record.update(window.flush(trainer.objective, clock))
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}")
        is_last = step == tc.steps
        evaluating = is_last or (tc.eval_every and step % tc.eval_every == 0)
        saving = is_last or step % tc.save_every == 0
        if evaluating or saving:
            jax.block_until_ready(state)
            clock.stop()
            if evaluating:
                record.update(trainer.evaluate(state["params"], val_batches.eval_pass(tc.eval_batches)))
            if saving:
                manager.save(step, state, train_batches.state(), config, force=is_last)
            clock.start()
        if record and is_main:
            _append_metrics(workdir, {"step": step, **record})
        bar.update(1)
    bar.close()
    clock.stop()
    if start >= tc.steps:  # resumed at or past the last step: nothing to train, report the evaluation
        record = trainer.evaluate(state["params"], val_batches.eval_pass(tc.eval_batches))
    train_seconds = clock.read()
    final = {"step": max(start, tc.steps), **record, "train_seconds": train_seconds,
             "compile_seconds": compile_seconds}
    if timed_steps and train_seconds > 0:
        final["tokens_per_s"] = timed_steps * trainer.tokens_per_step / train_seconds
    return final
