"""DecodeState: per-layer KV caches and recurrent states, and the commit that makes a verified path context.

A forward over K new nodes (see `DecoderLM`) leaves, per layer, a *pending* entry:
  attention        KVCache of the K nodes' own keys/values       -> commit compacts the path into the cache
                   (a SharedPrefixCache: into its rows' suffix; a budgeted HeavyHitterCache is extended
                   only: commit refuses it)
  linear attention LinearState per node   (s [B, K, H, dk, dv])  -> commit takes the last accepted node's
  mamba            MambaState per node    (conv, ssm with a K axis)  state (its recurrent state is exact)
so rollback is exact for every mixer, and per batch row (the mixer contract: `jaxspec.models.mixer.Mixer`).

A model with `model.scan_layers` keeps the entries of its scanned layers [0, period * groups) *stacked*: per
position j of the period, the entries of layers j, j + period, ... on a leading [groups] axis (`stacked`, and
`pending_stacked` after a tree forward), the layout the scan over layers reads and writes
(jaxspec/models/layer_scan.py), so a decode step neither stacks nor unstacks its caches. `layers[i]` is then
None for those layers. `per_layer(state)` gives the per-layer form of any state, `stacked_state` the stacked one.
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
from jaxspec.models import layer_scan


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
    # per layer: KVCache | SharedPrefixCache | HeavyHitterCache | LinearState | MambaState, None where `stacked`
    layers: tuple
    pending: tuple | None = None  # per layer after a tree forward (None for skipped and stacked layers)
    stacked: tuple | None = None  # per position of the period: the scanned layers' entries on a [groups] axis
    pending_stacked: tuple | None = None  # the same for their pending entries (None for a skipped position)

    @property
    def has_pending(self) -> bool:
        return self.pending is not None or self.pending_stacked is not None

    @property
    def stack_plan(self) -> tuple[int, int] | None:
        """(period, groups) of the stacked entries, or None for a state in per-layer form."""
        if self.stacked is None:
            return None
        return len(self.stacked), jax.tree.leaves(self.stacked)[0].shape[0]

    @property
    def max_len(self) -> int:
        for layer in self.layers:
            if isinstance(layer, KVCache):
                return layer.k.shape[2]
            if isinstance(layer, SharedPrefixCache):
                return layer.capacity
        for entry in self.stacked or ():  # stacked entries are plain KV caches and recurrent states
            if isinstance(entry, KVCache):
                return entry.k.shape[3]
        return np.iinfo(np.int32).max  # recurrent layers and budgeted caches have no length limit


def per_layer(state: DecodeState) -> DecodeState:
    """`state` with every layer's entry (and pending entry) in `layers` (and `pending`): stacked entries are
    sliced out per layer (a copy under jit)."""
    if state.stacked is None:
        return state
    period, groups = state.stack_plan
    scanned = period * groups
    layers = layer_scan.unstack_positions(state.stacked, groups) + list(state.layers[scanned:])
    pending = state.pending
    if state.pending_stacked is not None:
        pending = layer_scan.unstack_positions(state.pending_stacked, groups) + list(state.pending[scanned:])
    return DecodeState(lengths=state.lengths, layers=tuple(layers), pending=None if pending is None else tuple(pending))


def stacked_state(state: DecodeState, plan: tuple[int, int] | None) -> DecodeState:
    """`state` with the entries of layers [0, period * groups) stacked per position of the period (plan =
    (period, groups)); a plan of None or with no groups gives the per-layer form. Pending entries stay per layer."""
    state = per_layer(state) if state.stacked is not None and state.stack_plan != plan else state
    if plan is None or not plan[1] or state.stacked is not None:
        return state
    if any(layer is None for layer in state.layers):
        raise InputError("stacked_state: the state's layers hold None entries; it cannot be stacked")
    period, groups = plan
    scanned = period * groups
    stacked = tuple(layer_scan.stack_positions(state.layers[:scanned], period, groups))
    return state.replace(layers=(None,) * scanned + tuple(state.layers[scanned:]), stacked=stacked)


def init_decode_state(model_cfg, batch: int, max_len: int | None = None, dtype=None) -> DecodeState:
    """Empty state for `batch` rows; attention layers get a cache of `max_len` (default model.max_len). With
    `model.scan_layers`, the scanned layers' entries are stacked (see the module docstring)."""
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
    state = DecodeState(lengths=jnp.zeros((batch,), jnp.int32), layers=tuple(layers))
    return stacked_state(state, layer_scan.model_plan(model_cfg))


def share_prefix(state: DecodeState, batch: int, suffix_len: int) -> DecodeState:
    """The state of one prefilled row (batch 1) as the state of `batch` rows that continue the same prompt: each
    attention cache becomes a SharedPrefixCache over that row's keys/values, with an empty suffix of
    `suffix_len` positions per row; recurrent states are copied to every row."""
    state = per_layer(state)  # the shared prefix is held per layer
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


def write_kv(cache, new, start, index=None):
    """Write new [B, Hkv, T, D] into cache [B, Hkv, L, D] at per-row offsets start [B]; drops past L. With `index`,
    cache is a stack [G, B, Hkv, L, D] of a scanned layer stack's caches, written at its layer `index` in place."""
    t = new.shape[2]
    new = new.astype(cache.dtype)
    if index is not None:
        rows, columns = jnp.arange(new.shape[0])[:, None], start[:, None] + jnp.arange(t)
        # The indexed axes (the layer, rows and columns, [B, T] together) come first: new as [B, T, Hkv, D].
        return cache.at[index, rows, :, columns].set(new.transpose(0, 2, 1, 3), mode="drop")

    def one(c, n, s):
        return c.at[:, s + jnp.arange(t)].set(n, mode="drop")

    return jax.vmap(one)(cache, new, start)


def _commit_entry(cache, pending, lengths, path, n):
    """One layer's entry after commit (see `commit`)."""
    if isinstance(cache, HeavyHitterCache):  # its scores come from real context, never from a tree
        raise InputError("commit: a budgeted (heavy-hitter) KV cache takes new context by extend only; its "
                         "tree forwards are read-only (drafting)")
    if isinstance(cache, (KVCache, SharedPrefixCache)):
        gather = lambda x: jnp.take_along_axis(x, path[:, None, :, None], axis=2)
        # Entries past num_accepted land beyond the new length, where the length mask hides them.
        rows = cache if isinstance(cache, KVCache) else cache.suffix
        start = lengths if isinstance(cache, KVCache) else lengths - cache.prefix_len
        written = KVCache(write_kv(rows.k, gather(pending.k), start), write_kv(rows.v, gather(pending.v), start))
        return written if isinstance(cache, KVCache) else cache.replace(suffix=written)
    last = jnp.take_along_axis(path, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]  # [B]
    keep_old = n == 0

    def take_last(old, per_node):
        index = last.reshape((-1,) + (1,) * (per_node.ndim - 1))
        picked = jnp.take_along_axis(per_node, index, axis=1)[:, 0]
        return jnp.where(keep_old.reshape((-1,) + (1,) * (old.ndim - 1)), old, picked)

    return jax.tree.map(take_last, cache, pending)


def commit(state: DecodeState, path, num_accepted) -> DecodeState:
    """Make the accepted nodes the new context, per row.

    path [B, P] node indices in order (root first), num_accepted [B] in [0, P]. Rows with 0 keep their state.
    Stacked entries are committed as one stack per position of the period.
    """
    if not state.has_pending:
        raise InputError("commit: the state holds no pending tree (run a forward with parents= first)")
    if state.stacked is not None and state.pending_stacked is None:  # pending per layer (a forward of another plan)
        return stacked_state(commit(per_layer(state), path, num_accepted), state.stack_plan)
    path = jnp.asarray(path, jnp.int32)
    n = jnp.asarray(num_accepted, jnp.int32)
    checks.expect((n >= 0) & (n <= path.shape[1]), f"commit: num_accepted={{}} must lie in [0, {path.shape[1]}]", n)
    checks.expect(state.lengths + n <= state.max_len, "commit: lengths {} + num_accepted {} exceed the decode "
                  f"state's max_len={state.max_len}", state.lengths, n)
    entry = lambda cache, pending: _commit_entry(cache, pending, state.lengths, path, n)
    # A skipped layer (pending None) keeps its entry; so does a stacked layer's None slot in `layers`.
    layers = tuple(cache if pending is None else entry(cache, pending)
                   for cache, pending in zip(state.layers, state.pending, strict=True))
    stacked = state.stacked
    if stacked is not None:
        stacked = tuple(cache if pending is None else jax.vmap(entry)(cache, pending)
                        for cache, pending in zip(stacked, state.pending_stacked, strict=True))
    return DecodeState(lengths=state.lengths + n, layers=layers, stacked=stacked)
