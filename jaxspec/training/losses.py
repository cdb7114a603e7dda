"""Training objectives as weighted sums of per-token statistics, shared by the train step and evaluation.

An objective computes, for one batch, named *streams* of summed per-token statistics::

    {"lm": {"sum": total nats, "tokens": count, "correct": top-1 hits, "bytes": UTF-8 bytes}, "kl": {...}}

A stream's mean is ``sum / tokens``; the loss is ``sum_s weight_s * mean_s`` over the weighted streams (the
others are reported only). Evaluation adds the sums over many batches before dividing, so validation
figures are exact token averages over the whole evaluated set, not averages of batch averages.

Streams by `train.loss`:
  lm        "lm": next-token cross-entropy of the model.
  matformer "g0".."g{n-1}": the cross-entropy of each MatFormer granularity (smallest first) on the same
            batch, weighted by `train.matformer_weights` (default all 1).
  distill   "lm" with weight 1 - alpha, and with alpha > 0 "kl": KL(target || draft) of the temperature-T
            softened distributions, weighted alpha * T^2 (the T^2 keeps its gradient scale independent of T).
  medusa    "head0".."head{K-1}": head k reads the frozen target's final hidden state at position t and is
            scored on token t+k+2 (= targets[t+k+1]), weight `train.medusa_decay ** k`; "lm" is the
            target's own next-token loss, reported for reference only.
  eagle     "tok0".."tok{S-1}" and "feat0".."feat{S-1}": an EAGLE drafter over a self-distillation set (batch
            keys tokens, features, mask; see training/selfdistill.py), unrolled over S = `eagle.unroll` draft
            depths (step s reads its own guesses of step s-1). "tok{s}" is the cross-entropy of the frozen
            (vocabulary-trimmed) LM head on the guessed feature against the target's next token, weight
            `eagle.token_weight`; its accuracy is the greedy acceptance rate of depth s+1. "feat{s}" is the
            smooth-L1 distance of the guessed feature to the target's, weight `eagle.feature_weight`.
  medusa on a self-distillation set (`data.source` made by launch.selfdistill): "head0".."head{K-1}" on the
            stored final features, without running the target: head k at position t is scored on the reply
            token t+k+2 (masked as the EAGLE objective), weight `train.medusa_decay ** k`; with
            `medusa.draft_vocab` the heads score that draft vocabulary only (as hydra).
  hydra     "head0".."head{K-1}": Hydra heads over a self-distillation set, teacher-forced on the stored reply
            tokens (the target's own greedy tokens): head k reads f_t and E(x_{t+1}) .. E(x_{t+k+1}) and is
            scored, through the frozen (vocabulary-trimmed) LM head, on x_{t+k+2}, weight
            `hydra.decay ** k * (1 - hydra.teacher)`; with `hydra.teacher` > 0 also "teacher0".."teacher{K-1}":
            KL(target || head k) over the draft vocabulary, the target's distribution of x_{t+k+2} being its LM
            head on the stored feature f_{t+k+1} (Hydra's teacher distillation), weight
            `hydra.decay ** k * hydra.teacher`.
Any loss but medusa adds "exit{i}" for each of `train.early_exit_layers`: the LM head applied (through the
final norm) to the residual stream after layer i, weight `train.early_exit_weight` each, so that the
first layers alone make a usable self-drafter.

Bits per byte: ``bpb = (total nats over the non-PAD target tokens) / ln 2 / (UTF-8 bytes those targets
decode to)``. Special tokens (BOS/EOS) are predicted, so their nats count, but decode to no bytes. With the
byte tokenizer every other token is exactly one byte; for other tokenizers a token's byte count is the
length of its own decoded text (`token_byte_counts`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import InputError
from jaxspec.models.eagle import EagleNet, unrolled_parents
from jaxspec.models.heads import MedusaHeads, lm_head_kernel
from jaxspec.models.hydra import HydraHeads
from jaxspec.models.lm import DecoderLM
from jaxspec.training.tokenizer import ByteTokenizer

Stream = dict[str, jax.Array]  # summed statistics of one prediction stream
Stats = dict[str, Stream]
StatsFn = Callable[[object, object, Mapping[str, jax.Array]], Stats]  # (params, frozen, batch) -> stats


# --------------------------------------------------------------------------------------- per-token sums


def token_byte_counts(tokenizer, vocab_size: int) -> np.ndarray:
    """int32 [vocab_size]: the UTF-8 bytes each token id decodes to (0 for specials and unused ids)."""
    counts = np.zeros(vocab_size, np.int32)
    if isinstance(tokenizer, ByteTokenizer):
        counts[:256] = 1  # ids 0..255 are the bytes themselves (a lone one may not decode on its own)
        return counts
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    for i in range(min(tokenizer.vocab_size, vocab_size)):
        if i not in specials:
            counts[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return counts


def cross_entropy_stream(logits, targets, mask, byte_counts=None) -> Stream:
    """Summed next-token statistics of logits [..., V] against int targets [...] where mask is true."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weight = mask.astype(jnp.float32)
    stream = {
        "sum": jnp.sum(nll * weight),
        "tokens": jnp.sum(weight),
        "correct": jnp.sum((jnp.argmax(logp, axis=-1) == targets) * weight),
    }
    if byte_counts is not None:
        stream["bytes"] = jnp.sum(jnp.take(byte_counts, targets).astype(jnp.float32) * weight)
    return stream


def kl_stream(target_logits, draft_logits, mask, temperature: float) -> Stream:
    """Summed KL(target || draft) of the temperature-softened distributions where mask is true."""
    target_logp = jax.nn.log_softmax(target_logits.astype(jnp.float32) / temperature, axis=-1)
    draft_logp = jax.nn.log_softmax(draft_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(target_logp) * (target_logp - draft_logp), axis=-1)
    weight = mask.astype(jnp.float32)
    return {"sum": jnp.sum(kl * weight), "tokens": jnp.sum(weight)}


# --------------------------------------------------------------------------------- from sums to figures


def stream_means(stats: Mapping[str, Stream]) -> dict[str, jax.Array]:
    """Per-token mean of each stream (0 for a stream without tokens)."""
    return {name: s["sum"] / jnp.maximum(s["tokens"], 1.0) for name, s in stats.items()}


def accumulate(totals: dict[str, dict[str, float]], stats: Mapping[str, Mapping[str, object]]) -> None:
    """Add one batch's fetched stats into host-side float totals, stream by stream."""
    for name, stream in stats.items():
        acc = totals.setdefault(name, {})
        for key, value in stream.items():
            acc[key] = acc.get(key, 0.0) + float(value)


def summarize(stats: Mapping[str, Mapping[str, float]], objective: Objective, prefix: str = "") -> dict:
    """Host-side figures from (possibly batch-summed) stats: loss, and per stream its loss, acc and bpb.

    ``{prefix}loss`` is the objective; ``{prefix}bpb`` the main stream's bits per byte when it has one.
    """
    means = {name: float(s["sum"]) / max(float(s["tokens"]), 1.0) for name, s in stats.items()}
    out = {f"{prefix}loss": float(objective.combine(means))}
    for name, s in stats.items():
        tokens = max(float(s["tokens"]), 1.0)
        out[f"{prefix}{name}_loss"] = means[name]
        if "correct" in s:
            out[f"{prefix}{name}_acc"] = float(s["correct"]) / tokens
        if "bytes" in s and float(s["bytes"]) > 0:
            out[f"{prefix}{name}_bpb"] = float(s["sum"]) / math.log(2) / float(s["bytes"])
    if objective.main is not None and f"{prefix}{objective.main}_bpb" in out:
        out[f"{prefix}bpb"] = out[f"{prefix}{objective.main}_bpb"]
    return out


@dataclasses.dataclass(frozen=True)
class Objective:
    """A stats function and how its streams combine into the loss."""

    stats: StatsFn
    weights: Mapping[str, float]  # stream -> loss weight; streams not listed are reported only
    main: str | None  # the stream whose bits per byte is the headline `bpb`

    def combine(self, means: Mapping[str, jax.Array | float]):
        """The loss from per-stream means."""
        return sum(w * means[name] for name, w in self.weights.items() if w)

    def loss(self, params, frozen, batch) -> tuple[jax.Array, Stats]:
        stats = self.stats(params, frozen, batch)
        return self.combine(stream_means(stats)), stats


# ----------------------------------------------------------------------------------------- objectives


def _exit_streams(model: DecoderLM, params, layer_hidden, exits, targets, mask, byte_counts) -> Stats:
    streams = {}
    for i in exits:
        logits = model.apply({"params": params}, layer_hidden[i], method=DecoderLM.exit_logits)
        streams[f"exit{i}"] = cross_entropy_stream(logits, targets, mask, byte_counts)
    return streams


def _lm_streams(model, params, batch, mask, byte_counts, exits, granularity=None, name="lm"):
    """(stats, logits) of one forward pass: the model's stream and its early exits."""
    out = model.apply({"params": params}, batch["inputs"], granularity=granularity, return_hidden=True)
    stats = {name: cross_entropy_stream(out.logits, batch["targets"], mask, byte_counts)}
    stats.update(_exit_streams(model, params, out.layer_hidden, exits, batch["targets"], mask, byte_counts))
    return stats, out.logits


def lm_objective(model: DecoderLM, train_cfg, pad_id: int, byte_counts) -> Objective:
    exits = tuple(train_cfg.early_exit_layers)

    def stats(params, frozen, batch):
        del frozen  # nothing frozen in plain LM training
        return _lm_streams(model, params, batch, batch["targets"] != pad_id, byte_counts, exits)[0]

    weights = {"lm": 1.0, **{f"exit{i}": train_cfg.early_exit_weight for i in exits}}
    return Objective(stats, weights, main="lm")


def matformer_objective(model: DecoderLM, train_cfg, pad_id: int, byte_counts) -> Objective:
    n = len(model.model_cfg.matformer_fractions)
    exits = tuple(train_cfg.early_exit_layers)
    weights = tuple(train_cfg.matformer_weights) or (1.0,) * n

    def stats(params, frozen, batch):
        del frozen
        mask = batch["targets"] != pad_id
        out = {}
        for g in range(n):
            # Early exits train on the full model's residual stream only.
            streams, _ = _lm_streams(model, params, batch, mask, byte_counts, exits if g == n - 1 else (),
                                     granularity=g, name=f"g{g}")
            out.update(streams)
        return out

    loss_weights = {f"g{g}": float(w) for g, w in enumerate(weights)}
    loss_weights.update({f"exit{i}": train_cfg.early_exit_weight for i in exits})
    return Objective(stats, loss_weights, main=f"g{n - 1}")


def distill_objective(model: DecoderLM, target_model: DecoderLM | None, train_cfg, pad_id: int,
                      byte_counts) -> Objective:
    """Draft-model training; with distill_alpha > 0 the frozen argument is the target's params."""
    exits = tuple(train_cfg.early_exit_layers)
    alpha, temperature = train_cfg.distill_alpha, train_cfg.distill_temperature
    if alpha > 0 and target_model is None:
        raise InputError(f"train.distill_alpha={alpha} needs the target model (config.target_workdir)")

    def stats(params, frozen, batch):
        mask = batch["targets"] != pad_id
        out, logits = _lm_streams(model, params, batch, mask, byte_counts, exits)
        if alpha > 0:
            target_logits = jax.lax.stop_gradient(target_model.apply({"params": frozen}, batch["inputs"]))
            out["kl"] = kl_stream(target_logits, logits, mask, temperature)
        return out

    weights = {"lm": 1.0 - alpha, **{f"exit{i}": train_cfg.early_exit_weight for i in exits}}
    if alpha > 0:
        weights["kl"] = alpha * temperature**2
    return Objective(stats, weights, main="lm")


def medusa_objective(backbone: DecoderLM, heads: MedusaHeads, train_cfg, pad_id: int) -> Objective:
    """Trainable params are the heads'; the frozen argument is the backbone's params."""
    model_cfg = backbone.model_cfg

    def stats(params, frozen, batch):
        targets = batch["targets"]
        mask = targets != pad_id
        out = jax.lax.stop_gradient(backbone.apply({"params": frozen}, batch["inputs"], return_hidden=True))
        kernel = lm_head_kernel(frozen, model_cfg) if heads.share_lm_head else None
        head_logits = heads.apply({"params": params}, out.hidden, kernel)  # [B, T, K, V]
        streams = {"lm": cross_entropy_stream(out.logits, targets, mask)}
        for k in range(heads.num_heads):
            shift = k + 1  # hidden at t -> token t+k+2 = targets[t+k+1]
            streams[f"head{k}"] = cross_entropy_stream(
                head_logits[:, :-shift, k], targets[:, shift:], mask[:, shift:])
        return streams

    weights = {f"head{k}": train_cfg.medusa_decay**k for k in range(heads.num_heads)}
    return Objective(stats, weights, main=None)


def _ahead(x, shift: int, length: int):
    """x [B, T, ...] moved `shift` positions left and cut to `length` (zero-padded past the end): at position t,
    x[t + shift]."""
    pad = ((0, 0), (0, max(0, shift + length - x.shape[1]))) + ((0, 0),) * (x.ndim - 2)
    return jnp.pad(x, pad)[:, shift:shift + length]


def _heads_on_stored_features(logits_of_head, tokens, mask, num_heads: int) -> Stats:
    """The streams head0..head{K-1} of heads reading the stored feature at position t < T = tokens.shape[1] - 1
    of a self-distillation batch: head k is scored on x_{t+k+2} where it is a reply token (mask[t + k + 1], as
    the EAGLE objective masks). `logits_of_head(k, labels [B, T])` -> (logits [B, T, N], the labels' rows among
    the N scored ids (-1: not among them, no loss), or None when the rows are the token ids themselves)."""
    t = tokens.shape[1] - 1
    streams = {}
    for k in range(num_heads):
        labels, valid = _ahead(tokens, k + 2, t), _ahead(mask, k + 1, t)
        logits, rows = logits_of_head(k, labels)
        if rows is not None:
            labels, valid = jnp.maximum(rows, 0), valid & (rows >= 0)
        streams[f"head{k}"] = cross_entropy_stream(logits, labels, valid)
    return streams


def medusa_selfdistill_objective(heads: MedusaHeads, train_cfg) -> Objective:
    """Medusa heads on a self-distillation set's stored final features (batch keys tokens, features, mask); the
    target itself never runs. The frozen argument holds "lm_head" [d, N] with `share_lm_head` and, for heads on a
    draft vocabulary of N ids (`medusa.draft_vocab`), "vocab_index" [V]: each target id's row (-1 outside; such
    labels carry no loss), as `models.eagle.target_side` gives them; with neither, `{}`."""

    def stats(params, frozen, batch):
        t = batch["tokens"].shape[1] - 1
        head_logits = heads.apply({"params": params}, batch["features"][:, :t].astype(jnp.float32),
                                  frozen.get("lm_head"))  # [B, T, K, N]

        def logits_of_head(k, labels):
            rows = jnp.take(frozen["vocab_index"], labels) if "vocab_index" in frozen else None
            return head_logits[:, :, k], rows

        return _heads_on_stored_features(logits_of_head, batch["tokens"], batch["mask"], heads.num_heads)

    weights = {f"head{k}": train_cfg.medusa_decay**k for k in range(heads.num_heads)}
    return Objective(stats, weights, main=None)


def hydra_objective(heads: HydraHeads, hydra_cfg) -> Objective:
    """Trainable params are the heads'; the frozen argument is `models.eagle.target_side`'s dict: the target's
    token embedding, its LM head restricted to the draft vocabulary, and each target id's row there."""

    teacher = float(hydra_cfg.get("teacher", 0.0))  # runs saved before the key existed trained on tokens only

    def stats(params, frozen, batch):
        tokens = batch["tokens"]
        t = tokens.shape[1] - 1
        embeddings = jnp.take(frozen["embedding"], tokens, axis=0).astype(jnp.float32)
        path = jnp.stack([_ahead(embeddings, j + 1, t) for j in range(heads.num_heads)], axis=2)  # [B, T, K, d]
        features = batch["features"].astype(jnp.float32)
        feats = heads.apply({"params": params}, features[:, :t], path)
        head_logits = [jnp.einsum("btd,nd->btn", feats[:, :, k], frozen["head_t"]) for k in range(heads.num_heads)]

        def logits_of_head(k, labels):
            return head_logits[k], jnp.take(frozen["vocab_index"], labels)

        streams = _heads_on_stored_features(logits_of_head, tokens, batch["mask"], heads.num_heads)
        if teacher:
            # The target's own guess of x_{s+1} from its feature at s, once per position; head k at t is scored
            # against it at s = t + k + 1 (a shift, not K products over the same positions).
            target_logits = jnp.einsum("bsd,nd->bsn", features, frozen["head_t"])
            for k in range(heads.num_heads):
                streams[f"teacher{k}"] = kl_stream(_ahead(target_logits, k + 1, t), head_logits[k],
                                                   _ahead(batch["mask"], k + 1, t), 1.0)
        return streams

    weights = {f"head{k}": hydra_cfg.decay**k * (1 - teacher) for k in range(heads.num_heads)}
    if teacher:
        weights.update({f"teacher{k}": hydra_cfg.decay**k * teacher for k in range(heads.num_heads)})
    return Objective(stats, weights, main=None)


def _smooth_l1(x, y):
    """Smooth-L1 distance, averaged over the feature axis (EAGLE's regression loss)."""
    diff = jnp.abs(x - y)
    return jnp.mean(jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5), axis=-1)


def eagle_objective(net: EagleNet, eagle_cfg, stream_index: tuple[int, ...] = ()) -> Objective:
    """Trainable params are the drafter's; the frozen argument is `{"embedding" [V, d], "head_t" [N, d],
    "vocab_index" [V]}`: the target's token embedding, its LM head restricted to the draft vocabulary, and each
    target id's row in it (-1 outside; such labels carry no token loss). EAGLE-3 (`net.fused_streams` > 0): the
    drafter reads the batch's `layer_features` [B, L, k, d] at `stream_index` (the positions of
    `eagle.feature_layers` among the layers the set stores), concatenated; the regression target stays the
    final feature."""
    steps, noise = eagle_cfg.unroll, eagle_cfg.feature_noise
    if len(stream_index) != net.fused_streams:
        raise InputError(f"the EAGLE net fuses {net.fused_streams} target streams; stream_index {stream_index} "
                         f"names {len(stream_index)}")

    def stats(params, frozen, batch):
        tokens, features, mask = batch["tokens"], batch["features"].astype(jnp.float32), batch["mask"]
        b, t = tokens.shape[0], tokens.shape[1] - 1  # t pairs (f_i, x_{i+1}), i < t
        if stream_index:
            streams = batch["layer_features"][:, :t, np.asarray(stream_index)].astype(jnp.float32)
            feats = streams.reshape(b, t, -1)
        else:
            feats = features[:, :t]
        if noise > 0:  # EAGLE's input noise: robustness to the drafter's own feature errors
            key = jax.random.fold_in(jax.random.key(0), jnp.sum(tokens))
            feats = feats + jax.random.uniform(key, feats.shape, minval=-noise, maxval=noise)
        embeddings = jnp.take(frozen["embedding"], tokens[:, 1:], axis=0).astype(jnp.float32)
        want_feat = features[:, 1:]  # the pair at i guesses f_{i+1}
        labels = jnp.pad(tokens[:, 2:], ((0, 0), (0, 1)))  # ... and its head scores x_{i+2}
        valid = jnp.pad(mask[:, 2:], ((0, 0), (0, 1)))  # x_{i+2} is a reply token
        guesses = None
        for depth in range(1, steps + 1):
            guessed = None
            if guesses is not None:  # step s reads the guess made one position earlier at step s-1
                shifted = jnp.pad(guesses[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))
                guessed = jax.lax.stop_gradient(shifted).reshape(b, (depth - 1) * t, -1)
            out = net.apply({"params": params}, feats, jnp.tile(embeddings, (1, depth, 1)), guessed=guessed,
                            parents=unrolled_parents(t, depth))  # a tree with no context: it is all they see
            guesses = out.reshape(b, depth, t, -1)
        head_rows = jnp.take(frozen["vocab_index"], labels)
        streams = {}
        for s in range(steps):
            ok = valid & (jnp.arange(t) >= s)[None, :]
            logits = jnp.einsum("btd,nd->btn", guesses[:, s], frozen["head_t"])
            streams[f"tok{s}"] = cross_entropy_stream(logits, jnp.maximum(head_rows, 0), ok & (head_rows >= 0))
            weight = ok.astype(jnp.float32)
            streams[f"feat{s}"] = {"sum": jnp.sum(_smooth_l1(guesses[:, s], want_feat) * weight),
                                   "tokens": jnp.sum(weight)}
        return streams

    weights = {f"tok{s}": eagle_cfg.token_weight for s in range(steps)}
    weights.update({f"feat{s}": eagle_cfg.feature_weight for s in range(steps)})
    return Objective(stats, weights, main=None)
