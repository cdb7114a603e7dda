"""EAGLE-style feature drafter (Li et al., 2024): autoregression in the target's feature space.

The target's feature f_t (its final hidden state, after the final norm, at position t) and the embedding of
the token x_{t+1} that followed it go through one fully connected fusion and a few decoder layers of the
target's own shape; the output is the drafter's guess of f_{t+1}, and the target's frozen LM head turns it
into a distribution over x_{t+2}. Drafting feeds the guessed features back in, depth by depth.

    net = EagleNet(drafter_model_cfg(target_cfg, num_layers=1))
    feats, state = net.apply({"params": p}, features, embeddings, state=state, num_new=n)     # extend
    feats, state = net.apply({"params": p}, None, embeddings, guessed=g, state=state, parents=par)  # tree (pending)
    feats = net.apply({"params": p}, features, embeddings, guessed=g, parents=par)   # no context (training)

EAGLE-3 (Li et al., 2025) reads several of the target's residual streams instead of its final feature:
`EagleNet(cfg, fused_streams=3)` takes `features` [B, T, 3 * d] (say layers 2, n/2 and n-3, concatenated),
normalises each stream and projects them to d ("reduce") before the fusion with the token embedding. Guessed
features (`guessed`, [B, T', d], the drafter's own outputs) skip that projection: they follow the target's
positions in the same forward, so a round's drafted nodes, and the unrolled draft depths of training, read
the drafter's guesses while the committed pairs read the target's streams.

The layers are `lm.Block`s over the same `Step`s as the target, so drafting a tree, committing accepted
pairs and training over unrolled draft steps (`unrolled_parents`) all use the target's attention code.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxspec.config import MixerKind
from jaxspec.errors import InputError
from jaxspec.models.heads import lm_head_kernel
from jaxspec.models.layers import RMSNorm
from jaxspec.models.lm import Block, context_free_tree_step, make_step
from jaxspec.models.step import Mode
from jaxspec.state import DecodeState


def drafter_model_cfg(target_cfg, num_layers: int) -> ml_collections.FrozenConfigDict:
    """The drafter's layer config: the target's attention/FFN shape, `num_layers` global attention layers."""
    if num_layers < 1:
        raise InputError(f"an EAGLE drafter needs num_layers >= 1, got {num_layers}")
    cfg = ml_collections.ConfigDict(ml_collections.ConfigDict(target_cfg).to_dict())
    cfg.n_layers, cfg.layer_pattern = num_layers, MixerKind.ATTENTION.value
    cfg.layer_windows, cfg.d_ff_per_layer, cfg.matformer_fractions = (), (), (1.0,)
    cfg.weight_dtype = "float32"
    return ml_collections.FrozenConfigDict(cfg)


def unrolled_parents(length: int, steps: int) -> np.ndarray:
    """Parents [steps * length] of the tree that trains `steps` draft depths at once (EAGLE-3's training-time
    test): node (s, i) = index s * length + i, s = 0 the true features, s >= 1 the drafter's own guesses.

    (0, i) follows (0, i - 1): the committed context. (s, i) for s >= 1 reads the guess made at (s - 1, i - 1),
    so its parent is that node, and its ancestors are exactly what the drafter sees at depth s + 1 of a round
    whose context ends at position i - s: the true pairs up to there and its own earlier guesses.
    Nodes (s, i < s) have no such round; they hang off the context (-1) and carry no loss.
    """
    if length < 1 or steps < 1:
        raise InputError(f"unrolled_parents needs length >= 1 and steps >= 1, got {length}, {steps}")
    i = np.arange(length)
    parents = [i - 1]
    for s in range(1, steps):
        parents.append(np.where(i >= s, (s - 1) * length + i - 1, -1))
    return np.concatenate(parents).astype(np.int32)


class EagleNet(nn.Module):
    """(target features [B, T, d * max(1, fused_streams)], token embeddings [B, T + T', d], guessed features
    [B, T', d] or None) -> guessed next features [B, T + T', d]."""

    model_cfg: Any  # from drafter_model_cfg
    fused_streams: int = 0  # 0: `features` is the target's final feature; n >= 1: n residual streams (EAGLE-3)

    @nn.compact
    def __call__(self, features, embeddings, *, guessed=None, state: DecodeState | None = None, parents=None,
                 num_new=None, fresh: bool = False):
        cfg = self.model_cfg
        d, b = cfg.d_model, embeddings.shape[0]
        width = d * max(1, self.fused_streams)
        if features is None:
            features = jnp.zeros((b, 0, width), jnp.float32)
        if guessed is None:
            guessed = jnp.zeros((b, 0, d), jnp.float32)
        t = features.shape[1] + guessed.shape[1]
        shapes_ok = (features.ndim == guessed.ndim == 3 and (features.shape[0], features.shape[-1]) == (b, width)
                     and (guessed.shape[0], guessed.shape[-1]) == (b, d) and embeddings.shape == (b, t, d))
        if not shapes_ok:
            raise InputError(f"EagleNet: features {features.shape} must be [B, T, {width}], guessed "
                             f"{guessed.shape} [B, T', {d}] and embeddings {embeddings.shape} [B, T + T', {d}]")
        if state is not None and len(state.layers) != cfg.n_layers:
            raise InputError(f"EagleNet: decode state has {len(state.layers)} layers; the drafter has "
                             f"{cfg.n_layers}")
        if state is None and parents is not None:  # training over unrolled draft depths: no context, no cache
            step = context_free_tree_step(parents, b)
        else:
            step = make_step(embeddings[..., 0], state, parents, num_new, fresh)
        features = features.astype(jnp.float32)
        if self.fused_streams:
            # Residual streams of different depths differ in scale by orders of magnitude: each is normalised
            # before the projection, so that no single layer dominates it.
            streams = features.reshape(*features.shape[:2], self.fused_streams, d)
            streams = jnp.concatenate([RMSNorm(cfg.rms_eps, name=f"stream_norm_{j}")(streams[:, :, j])
                                       for j in range(self.fused_streams)], axis=-1)
            features = nn.Dense(d, use_bias=False, name="reduce")(streams)
        inputs = jnp.concatenate([features, guessed.astype(jnp.float32)], axis=1)
        fused = jnp.concatenate([inputs, embeddings.astype(jnp.float32)], axis=-1)
        x = nn.Dense(cfg.d_model, use_bias=True, name="fuse")(fused)
        new_layers = []
        for i in range(cfg.n_layers):
            cache = None if state is None else state.layers[i]
            x, new = Block(cfg, MixerKind.ATTENTION, i, name=f"layer_{i}")(x, step, cache, None)
            new_layers.append(new)
        out = RMSNorm(cfg.rms_eps, name="norm")(x)
        if state is None:
            return out
        if step.mode == Mode.TREE:
            return out, state.replace(pending=tuple(new_layers))
        return out, DecodeState(lengths=state.lengths + jnp.sum(step.valid, axis=1, dtype=jnp.int32),
                                layers=tuple(new_layers))


def eagle3_layers(n_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high residual streams of an `n_layers` target: after layers 2, n/2 and n-3
    (as its reference implementation picks them); fewer in a model too small for three distinct ones."""
    if n_layers < 1:
        raise InputError(f"eagle3_layers needs n_layers >= 1, got {n_layers}")
    picks = (min(2, n_layers - 1), n_layers // 2, max(n_layers - 3, 0))
    return tuple(sorted(set(picks)))


def target_side(target_params, model_cfg, vocab_ids) -> dict:
    """What an EAGLE drafter reads of its frozen target (standard or decode-layout params): the token
    embedding [V, d], the LM head's rows of the draft vocabulary [N, d] (float32), the vocabulary's target ids
    [N], and each target id's row there [V] (-1: not in the draft vocabulary)."""
    vocab_ids = np.asarray(vocab_ids, np.int32)
    index = np.full((model_cfg.vocab_size,), -1, np.int32)
    index[vocab_ids] = np.arange(len(vocab_ids), dtype=np.int32)
    head_t = jnp.take(lm_head_kernel(target_params, model_cfg).T, jnp.asarray(vocab_ids), axis=0)
    embedding = target_params["embed"]["embedding"]
    if "scale" in target_params["embed"]:  # int8 decode layout
        embedding = embedding.astype(jnp.float32) * target_params["embed"]["scale"][:, None]
    return {"embedding": jnp.asarray(embedding, jnp.float32), "head_t": head_t.astype(jnp.float32),
            "vocab_ids": jnp.asarray(vocab_ids), "vocab_index": jnp.asarray(index)}
