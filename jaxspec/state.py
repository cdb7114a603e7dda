"""DecodeState: per-layer KV caches and recurrent states, and the commit that makes a verified path context.

A forward over K new nodes (see `DecoderLM`) leaves, per layer, a *pending* entry:
  attention        KVCache of the K nodes' own keys/values       -> commit compacts the path into the cache
                   (a SharedPrefixCache: into its rows' suffix; a budgeted HeavyHitterCache is extended
                   only: commit refuses it)
  linear attention LinearState per node   (s [B, K, H, dk, dv])  -> commit takes the last accepted node's
  mamba            MambaState per node    (conv, ssm with a K axis)  state (its recurrent state is exact)
so rollback is exact for every mixer, and per batch row (the mixer contract: `jaxspec.models.mixer.Mixer`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec import checks
from jaxspec import config as config_lib
from jaxspec.config import MixerKind
from jaxspec.errors import InputError


@struct.dataclass
class KVCache:
    k: jax.Array  # [B, Hkv, L, D] (pending: [B, Hkv, K, D])
    v: jax.Array


@struct.dataclass
class HeavyHitterCache:
    """A budgeted KV cache (H2O): `budget` slots holding the keys/values the eviction rule kept, in no order.

    Keys are cached after RoPE, so a slot needs its position only to tell the recent window and ties apart;
    `score` is the attention each kept key has received so far (summed over the query heads of its group and
    over every query since it was cached). The rule and the attention over it: `jaxspec.ops.heavy_hitter`.
    """

    k: jax.Array  # [B, Hkv, budget, D]
    v: jax.Array
    score: jax.Array  # [B, Hkv, budget] float32
    position: jax.Array  # [B, Hkv, budget] int32, -1 for an empty slot
    recent: int = struct.field(pytree_node=False, default=0)  # the latest positions always kept

    @property
    def budget(self) -> int:
        return self.k.shape[2]


@struct.dataclass
class SharedPrefixCache:
    """The keys/values of the rows' common prompt beginning, held once for every row (Hydragen): samples of one
    prompt, or rows under one system prompt, attend to the shared prefix, their queries stacked across rows, and
    each to a suffix cache of its own, merged by log-sum-exp
    (`pallas_kernels.shared_prefix_attention`). A row's committed length counts the prefix: the suffix holds
    positions prefix_len .. lengths - 1."""

    k_prefix: jax.Array  # [Hkv, P, D]: valid on [0, prefix_len)
    v_prefix: jax.Array
    prefix_len: jax.Array  # int32 scalar
    suffix: KVCache  # [B, Hkv, L, D]

    @property
    def capacity(self) -> int:
        return self.k_prefix.shape[1] + self.suffix.k.shape[2]


@struct.dataclass
class LinearState:
    s: jax.Array  # [B, H, dk, dv] (pending: [B, K, H, dk, dv])


@struct.dataclass
class MambaState:
    conv: jax.Array  # [B, d_conv - 1, d_inner]: the last inputs of the causal conv, oldest first
    ssm: jax.Array  # [B, d_inner, d_state]


@struct.dataclass
class DecodeState:
    lengths: jax.Array  # [B] int32: committed tokens per row
    layers: tuple  # per layer: KVCache | SharedPrefixCache | HeavyHitterCache | LinearState | MambaState
    pending: tuple | None = None  # per layer after a tree forward (None for skipped layers)

    @property
    def max_len(self) -> int:
        for layer in self.layers:
            if isinstance(layer, KVCache):
                return layer.k.shape[2]
            if isinstance(layer, SharedPrefixCache):
                return layer.capacity
        return np.iinfo(np.int32).max  # recurrent layers and budgeted caches have no length limit


def init_decode_state(model_cfg, batch: int, max_len: int | None = None, dtype=None) -> DecodeState:
    """Empty state for `batch` rows; attention layers get a cache of `max_len` (default model.max_len)."""
    max_len = max_len or model_cfg.max_len
    if max_len <= 0 or batch <= 0:
        raise InputError(f"init_decode_state: batch={batch} and max_len={max_len} must be positive")
    dtype = dtype or jnp.dtype(model_cfg.dtype)
    hd = config_lib.head_dim(model_cfg)
    d_inner, _ = config_lib.mamba_dims(model_cfg)
    layers = []
    for kind in config_lib.layer_kinds(model_cfg):
        if kind == MixerKind.ATTENTION:
            shape = (batch, model_cfg.n_kv_heads, max_len, hd)
            layers.append(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
        elif kind == MixerKind.LINEAR_ATTENTION:
            layers.append(LinearState(jnp.zeros((batch, model_cfg.n_heads, hd, hd), jnp.float32)))
        else:
            layers.append(MambaState(
                conv=jnp.zeros((batch, model_cfg.mamba.d_conv - 1, d_inner), jnp.float32),
                ssm=jnp.zeros((batch, d_inner, model_cfg.mamba.d_state), jnp.float32)))
    return DecodeState(lengths=jnp.zeros((batch,), jnp.int32), layers=tuple(layers))


def share_prefix(state: DecodeState, batch: int, suffix_len: int) -> DecodeState:
    """The state of one prefilled row (batch 1) as the state of `batch` rows that continue the same prompt: each
    attention cache becomes a SharedPrefixCache over that row's keys/values, with an empty suffix of
    `suffix_len` positions per row; recurrent states are copied to every row."""
    if state.lengths.shape[0] != 1 or state.pending is not None:
        raise InputError(f"share_prefix: needs the committed state of one row, got {state.lengths.shape[0]} rows"
                         f"{' with a pending tree' if state.pending is not None else ''}")
    prefix_len = state.lengths[0]
    layers = []
    for layer in state.layers:
        if isinstance(layer, KVCache):
            _, hkv, _, d = layer.k.shape
            empty = jnp.zeros((batch, hkv, suffix_len, d), layer.k.dtype)
            layers.append(SharedPrefixCache(layer.k[0], layer.v[0], prefix_len, KVCache(empty, empty)))
        elif isinstance(layer, (LinearState, MambaState)):
            layers.append(jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape[1:])), layer))
        else:
            raise InputError(f"share_prefix: a {type(layer).__name__} cannot be shared across rows")
    return DecodeState(lengths=jnp.full((batch,), prefix_len, jnp.int32), layers=tuple(layers))


def validate_parents(parents) -> np.ndarray:
    """Host-side check of a concrete parents array [K] or [B, K]: each parent in [-1, own index)."""
    p = np.asarray(parents)
    if p.ndim not in (1, 2) or p.shape[-1] == 0:
        raise InputError(f"parents must have shape [K] or [B, K] with K >= 1, got shape {p.shape}")
    idx = np.arange(p.shape[-1])
    bad = (p < -1) | (p >= idx)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"parents is not a valid tree: parents{list(where)}={int(p[where])}, but every "
                         "parent must be -1 (follows the committed context) or an earlier node index")
    return p


def tree_ancestor_mask(parents, batch: int):
    """[B, K, K] bool, mask[b, i, j] = node j is i or an ancestor of i. parents [K] or [B, K] (may be traced).

    Pointer doubling: after r rounds `hop` jumps 2^r steps up, so ceil(log2 K) rounds cover any depth.
    """
    parents = jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (batch, jnp.shape(parents)[-1]))
    k = parents.shape[-1]
    eye = jnp.eye(k, dtype=bool)
    mask = eye[None] | (jax.nn.one_hot(parents, k, dtype=bool))  # self + parent (-1 gives no bit)
    hop = parents
    for _ in range(max(1, int(np.ceil(np.log2(max(k, 2)))))):
        # mask[i] |= mask[hop[i]]; hop[i] = hop[hop[i]]
        safe = jnp.maximum(hop, 0)
        jumped = jnp.take_along_axis(mask, safe[:, :, None], axis=1) & (hop >= 0)[:, :, None]
        mask = mask | jumped
        hop = jnp.where(hop >= 0, jnp.take_along_axis(hop, safe, axis=1), -1)
    return mask


def node_depths(ancestor_mask):
    """Depth of each node below the committed context: number of strict ancestors. [B, K] int32."""
    return jnp.sum(ancestor_mask, axis=-1).astype(jnp.int32) - 1


def write_kv(cache, new, start):
    """Write new [B, Hkv, T, D] into cache [B, Hkv, L, D] at per-row offsets start [B]; drops past L."""
    t = new.shape[2]

    def one(c, n, s):
        return c.at[:, s + jnp.arange(t)].set(n, mode="drop")

    return jax.vmap(one)(cache, new.astype(cache.dtype), start)


def commit(state: DecodeState, path, num_accepted) -> DecodeState:
    """Make the accepted nodes the new context, per row.

    path [B, P] node indices in order (root first), num_accepted [B] in [0, P]. Rows with 0 keep their state.
    """
    if state.pending is None:
        raise InputError("commit: the state holds no pending tree (run a forward with parents= first)")
    path = jnp.asarray(path, jnp.int32)
    n = jnp.asarray(num_accepted, jnp.int32)
    checks.expect((n >= 0) & (n <= path.shape[1]), f"commit: num_accepted={{}} must lie in [0, {path.shape[1]}]", n)
    checks.expect(state.lengths + n <= state.max_len, "commit: lengths {} + num_accepted {} exceed the decode "
                  f"state's max_len={state.max_len}", state.lengths, n)
    last = jnp.take_along_axis(path, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]  # [B]
    keep_old = n == 0
    layers = []
    for cache, pending in zip(state.layers, state.pending, strict=True):
        if pending is None:  # layer skipped in the forward: nothing to commit
            layers.append(cache)
        elif isinstance(cache, HeavyHitterCache):  # its scores come from real context, never from a tree
            raise InputError("commit: a budgeted (heavy-hitter) KV cache takes new context by extend only; its "
                             "tree forwards are read-only (drafting)")
        elif isinstance(cache, (KVCache, SharedPrefixCache)):
            gather = lambda x: jnp.take_along_axis(x, path[:, None, :, None], axis=2)
            # Entries past num_accepted land beyond the new length, where the length mask hides them.
            rows = cache if isinstance(cache, KVCache) else cache.suffix
            start = state.lengths if isinstance(cache, KVCache) else state.lengths - cache.prefix_len
            written = KVCache(write_kv(rows.k, gather(pending.k), start), write_kv(rows.v, gather(pending.v), start))
            layers.append(written if isinstance(cache, KVCache) else cache.replace(suffix=written))
        else:
            def take_last(old, per_node):
                index = last.reshape((-1,) + (1,) * (per_node.ndim - 1))
                picked = jnp.take_along_axis(per_node, index, axis=1)[:, 0]
                return jnp.where(keep_old.reshape((-1,) + (1,) * (old.ndim - 1)), old, picked)
            layers.append(jax.tree.map(take_last, cache, pending))
    return DecodeState(lengths=state.lengths + n, layers=tuple(layers), pending=None)
