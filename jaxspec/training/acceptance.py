"""Training SpecDec++'s acceptance head (`jaxspec.models.acceptance`) for one drafter, on a self-distillation set.

A self-distillation set holds the target's own greedy replies, so at every reply position t the target's next
token is the set's token t + 1. One full forward of the drafter over each sequence (teacher-forced: the context
is always the target's) gives, at every such t, the head's features and the label "the drafter's top token is
the target's" -- whether a greedy draft from there is accepted, given that everything before it was. The head
is fitted with AdamW on part of the replies, the step kept by its log-loss on a second part, and scored on a
third: its log-loss and accuracy against the constant predictor of the training base rate (which it must beat).

A trained head is saved as a jaxspec workdir (orbax params, config.json) whose config records the drafter it
was trained for (`ModelDrafting.drafted_by`) and the target; `load_head` refuses it for any other drafter.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxspec.errors import InputError
from jaxspec.models.acceptance import AcceptanceHead, acceptance_features
from jaxspec.training import checkpoint, selfdistill


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    hidden: int = 0  # 0: logistic regression on the features
    steps: int = 2000
    batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    val_fraction: float = 0.1  # replies held out to score the head; as many again pick the step to keep
    eval_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"acceptance head setting {name}={value!r} must be a positive integer")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 0:
            raise InputError(f"acceptance head setting hidden={self.hidden!r} must be >= 0 (0: logistic regression)")
        if not self.learning_rate > 0 or not self.weight_decay >= 0:
            raise InputError(f"acceptance head settings learning_rate={self.learning_rate!r} (> 0) and "
                             f"weight_decay={self.weight_decay!r} (>= 0)")
        if not 0 < self.val_fraction < 0.5:
            raise InputError(f"acceptance head setting val_fraction={self.val_fraction!r} must lie in (0, 0.5)")


@functools.partial(jax.jit, static_argnums=0)
def _examples(drafter, params, tokens):
    hidden, logits = drafter.forward_features(params, tokens)
    accepted = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    return acceptance_features(hidden[:, :-1], logits[:, :-1]), accepted


def acceptance_examples(drafter, params, arrays, rows_per_forward: int = 4) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """(features [N, d + 2], labels [N] bool, example index [N]) at every reply position of a self-distillation
    set's `arrays` (`selfdistill.read`), from full forwards of `drafter` (a ModelDrafter) with `params`."""
    tokens = np.asarray(arrays["tokens"], np.int32)
    mask = selfdistill.loss_mask(arrays)[:, :-1]
    feats, labels, index = [], [], []
    for start in range(0, len(tokens), rows_per_forward):
        chunk = tokens[start:start + rows_per_forward]
        pad = rows_per_forward - len(chunk)  # one compiled shape for every chunk
        f, a = _examples(drafter, params, jnp.asarray(np.pad(chunk, ((0, pad), (0, 0)))))
        f, a, m = np.asarray(f)[:len(chunk)], np.asarray(a)[:len(chunk)], mask[start:start + len(chunk)]
        feats.append(f[m])
        labels.append(a[m])
        index.append(np.nonzero(m)[0] + start)
    if not feats or sum(len(x) for x in labels) == 0:
        raise InputError("the self-distillation set has no reply positions to learn acceptance from")
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(index)


def _log_loss(logits, labels):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))


def _score(head, params, features, labels, base_rate: float) -> dict:
    logits = head.apply({"params": params}, jnp.asarray(features))
    labels = jnp.asarray(labels)
    constant = jnp.full(labels.shape, np.log(base_rate / (1 - base_rate)), jnp.float32)
    return dict(log_loss=float(_log_loss(logits, labels)), base_log_loss=float(_log_loss(constant, labels)),
                accuracy=float(jnp.mean((logits > 0) == labels)),
                base_accuracy=float(jnp.mean(labels == (base_rate >= 0.5))), positives=float(jnp.mean(labels)),
                examples=int(labels.shape[0]))


def split_by_example(index: np.ndarray, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """int [N]: which part each position falls in, 1 .. len(fractions) for the held-out parts (each about that
    fraction of the replies), 0 for the rest; whole replies, so no reply is on two sides."""
    examples = np.random.default_rng(seed).permutation(np.unique(index))
    part, start = np.zeros(len(index), np.int32), 0
    for number, fraction in enumerate(fractions, 1):
        size = max(1, int(round(fraction * len(examples))))
        part[np.isin(index, examples[start:start + size])] = number
        start += size
    return part


def train_head(features: np.ndarray, labels: np.ndarray, index: np.ndarray, settings: HeadSettings
               ) -> tuple[AcceptanceHead, dict, dict]:
    """(head, its params, metrics {"train", "validation", "best_step"}): fitted with AdamW on the replies not held
    out, keeping the step whose log-loss on a second held-out part is lowest (the head overfits the hidden
    states of a few thousand positions quickly), scored on the first held-out part."""
    part = split_by_example(index, (settings.val_fraction, settings.val_fraction), settings.seed)
    fit, held, stop = part == 0, part == 1, part == 2
    if not (fit.any() and held.any() and stop.any()):
        raise InputError(f"acceptance head: {len(np.unique(index))} replies cannot be split into training, "
                         "validation and stopping parts; use a larger self-distillation set")
    x_fit, y_fit = features[fit], labels[fit]
    base_rate = float(np.clip(y_fit.mean(), 1e-3, 1 - 1e-3))
    head = AcceptanceHead(settings.hidden)
    params = head.init(jax.random.key(settings.seed), jnp.zeros((1, features.shape[1]), jnp.float32))["params"]
    optimizer = optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _log_loss(head.apply({"params": p}, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    stop_loss = jax.jit(lambda p: _log_loss(head.apply({"params": p}, jnp.asarray(features[stop])),
                                            jnp.asarray(labels[stop])))
    rng = np.random.default_rng(settings.seed)
    x_dev, y_dev = jnp.asarray(x_fit), jnp.asarray(y_fit)
    best, best_loss, best_step = params, float(stop_loss(params)), 0
    for number in range(1, settings.steps + 1):
        pick = rng.integers(0, len(y_fit), min(settings.batch_size, len(y_fit)))
        params, opt_state, _ = step(params, opt_state, x_dev[pick], y_dev[pick])
        if number % settings.eval_every == 0 and float(stop_loss(params)) < best_loss:
            best, best_loss, best_step = params, float(stop_loss(params)), number
    metrics = {"train": _score(head, best, x_fit, y_fit, base_rate),
               "validation": _score(head, best, features[held], labels[held], base_rate), "best_step": best_step}
    return head, best, metrics


def _canonical(drafted_by: dict) -> str:
    """JSON of a drafter's description with tuples as lists, so a saved one and a live one compare equal."""
    return json.dumps(drafted_by, sort_keys=True, default=list)


def save_head(workdir: str, head: AcceptanceHead, params, drafted_by: dict, metrics: dict,
              target_workdir: str = "") -> None:
    config = ml_collections.ConfigDict({
        "acceptance": {"hidden": head.hidden, "drafted_by": _canonical(drafted_by), "metrics": json.dumps(metrics)},
        "target_workdir": target_workdir, "train": {"steps": 1}})
    with checkpoint.CheckpointManager(workdir) as manager:
        manager.save(1, {"params": params}, {}, config, force=True)


def load_head(workdir: str, drafted_by: dict) -> tuple[AcceptanceHead, dict]:
    """The head saved in `workdir`, refused unless it was trained for the drafter `drafted_by` describes."""
    params, config = checkpoint.restore_params(workdir)
    if "acceptance" not in config:
        raise InputError(f"{workdir} is not an acceptance head (its config has no 'acceptance' section; train one "
                         "with python -m launch.train_acceptance)")
    trained_for, wanted = config.acceptance.drafted_by, _canonical(drafted_by)
    if trained_for != wanted:
        raise InputError(f"the acceptance head in {workdir} was trained for the drafter {trained_for}, not "
                         f"{wanted}: a head predicts the acceptance of one drafter's tokens")
    return AcceptanceHead(config.acceptance.hidden), params


def check_head_fits(head_params, d_model: int, workdir: str) -> None:
    """The head reads [hidden; 2 summaries]: refuse one trained on another width (another target) by name."""
    width = head_params["hidden" if "hidden" in head_params else "out"]["kernel"].shape[0]
    if width != d_model + 2:
        raise InputError(f"the acceptance head in {workdir} reads {width - 2}-wide hidden states; this drafter's "
                         f"are {d_model}-wide: a head trained for another model")
