"""Tree attention: K new nodes attend to a committed KV cache plus their tree ancestors.

Shapes (GQA: H query heads share Hkv key/value heads, H % Hkv == 0):
  q           [B, H, K, D]    queries of the K tree nodes
  k_cache     [B, Hkv, L, D]  committed keys; row b is valid on [0, lengths[b])
  v_cache     [B, Hkv, L, D]
  lengths     [B] int32       committed length per row
  k_tree      [B, Hkv, K, D]  keys of the tree nodes themselves
  v_tree      [B, Hkv, K, D]
  tree_mask   [K, K] or [B, K, K] bool; tree_mask[i, j] = node j is an ancestor of i (or i itself)
Returns [B, H, K, D].

A chain is a lower-triangular tree_mask; plain decoding is K = 1.

`window` > 0 is a sliding window over absolute positions: cache entry c sits at position c, and node i at
lengths + depth(i), its depth read from tree_mask (the number of its strict ancestors, so the mask must be
ancestor-closed, as it is by definition). Key position j is visible to query position i iff
i - window < j <= i; a node's ancestors fall out of the window by position too.

The Pallas kernel is flash decoding. Its grid is (batch row, KV head, row tile, cache split). The G = H/Hkv
query heads of one KV head and the K nodes are stacked as the query rows of one program, so a cache
block is loaded once per KV head (once per row tile when G*K exceeds `block_rows`). A program runs an
online softmax over its split's cache blocks and stops at the row's length (blocks past it are never
loaded); with a window it also starts at the first block any of its rows can see (blocks wholly before
the window are never loaded). The last split also folds in the tree block under the ancestor mask. The splits' partial
(accumulator, max, sum) triples are merged in XLA. Block sizes, keyword arguments of `tree_attention`:
  block_k     cache block length (power of two; default 128, an upper bound: shrunk for short caches
              and, down to 16, until it divides the cache length)
  block_rows  query rows per program (power of two; default 64)
  num_splits  cache splits per (batch row, KV head) (default: enough programs to fill a GPU)
block_k and num_splits are chosen so that they tile the cache exactly when its length is a multiple of 16
(the decode loops' lengths are multiples of 64): only other lengths are padded, a copy of the cache per call.
K, G*K and D are padded to powers of two (at least 16) inside the op; those are the small operands.

The "xla" implementation: up to STREAMING_MAX_ROWS query rows (G*K) per KV head it takes the cache in the
layout it is stored in (`tree_attention_streaming`: scores as k_cache @ q^T, the cache the row-major left
operand), so a decode step reads the cache once and never transposes a copy of it, as the reference's
q @ k_cache^T makes XLA's CPU backend do on every step; more rows use the reference. An extend that has
already written its nodes into the cache attends there (`cached_chain_attention`, used by the model), which
transposes the keys once per layer (a product with the just-written cache would copy it whole).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    cache_block,
    check_block_size,
    check_block_size_keys,
    choose_blocks_per_split,
    compiler_params,
    default_num_splits,
    init_softmax_carry,
    interpret_mode,
    matmul,
    next_power_of_2,
    online_softmax_step,
    pad_axis,
    padded_head_dim,
    resolve_implementation,
    round_up,
    safe_denominator,
    scalar_table_spec,
)

BLOCK_SIZE_KEYS = ("block_k", "block_rows", "num_splits")
# Query rows per KV head (G*K) up to which the "xla" implementation streams the cache (see the docstring).
STREAMING_MAX_ROWS = 64


def node_depths(tree_mask):
    """[B, K] int32 depth of each node below the committed context: its strict ancestors in tree_mask."""
    return jnp.sum(tree_mask.astype(jnp.int32), axis=-1) - 1


def windowed_tree_mask(tree_mask, window: int):
    """tree_mask [B, K, K] without the ancestors that lie `window` or more positions above the node."""
    depth = node_depths(tree_mask)
    return tree_mask & (depth[:, None, :] > depth[:, :, None] - window)


def tree_attention_reference(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, *, scale=None, window=0):
    """Plain-jnp tree attention: one softmax over [cache | tree] scores."""
    b, h, k, d = q.shape
    hkv = k_cache.shape[1]
    if h % hkv:
        raise ValueError(f"query heads {h} not a multiple of kv heads {hkv}")
    group = h // hkv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, hkv, group, k, d).astype(jnp.float32)
    s_cache = jnp.einsum("bngkd,bnld->bngkl", qg, k_cache.astype(jnp.float32)) * scale
    s_tree = jnp.einsum("bngkd,bnjd->bngkj", qg, k_tree.astype(jnp.float32)) * scale
    cols = jnp.arange(k_cache.shape[2])
    tree_mask = jnp.broadcast_to(tree_mask, (b, k, k)).astype(bool)
    cache_valid = (cols[None, :] < lengths[:, None])[:, None, :]  # [B, 1, L]
    if window:
        positions = lengths[:, None] + node_depths(tree_mask)  # [B, K]
        cache_valid = cache_valid & (cols[None, None, :] > positions[:, :, None] - window)  # [B, K, L]
        tree_mask = windowed_tree_mask(tree_mask, window)
    neg = jnp.finfo(jnp.float32).min
    s_cache = jnp.where(cache_valid[:, None, None, :, :], s_cache, neg)
    s_tree = jnp.where(tree_mask[:, None, None, :, :], s_tree, neg)
    p = jax.nn.softmax(jnp.concatenate([s_cache, s_tree], axis=-1), axis=-1)
    l = k_cache.shape[2]
    out = jnp.einsum("bngkl,bnld->bngkd", p[..., :l], v_cache.astype(jnp.float32))
    out += jnp.einsum("bngkj,bnjd->bngkd", p[..., l:], v_tree.astype(jnp.float32))
    return out.reshape(b, h, k, d).astype(q.dtype)



def _scores_and_masks(lengths, tree_mask, cache_len: int, window: int, group: int):
    """(cache_valid [B, G*K, L], tree_mask [B, G*K, K]) per query row r = g * K + i (node i of head g)."""
    b, k, _ = tree_mask.shape
    cols = jnp.arange(cache_len)
    cache_valid = jnp.broadcast_to((cols[None, :] < lengths[:, None])[:, None, :], (b, k, cache_len))
    if window:
        positions = lengths[:, None] + node_depths(tree_mask)  # [B, K]
        cache_valid = cache_valid & (cols[None, None, :] > positions[:, :, None] - window)
        tree_mask = windowed_tree_mask(tree_mask, window)
    return jnp.tile(cache_valid, (1, group, 1)), jnp.tile(tree_mask, (1, group, 1))


def _scores_streaming(rows, k_cache):
    """rows [B, Hkv, R, D] . k_cache [B, Hkv, L, D] over D -> [B, Hkv, R, L], with the cache as the product's
    row-major left operand (k_cache @ rows^T, then the small [L, R] result transposed), the layout it is
    stored in, so XLA need not transpose the cache."""
    return jnp.einsum("bnld,bnrd->bnlr", k_cache.astype(jnp.float32), rows).swapaxes(-1, -2)


def tree_attention_streaming(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, *, scale=None, window=0):
    """Tree attention with the cache read in its stored layout (see the module docstring).

    Same inputs and result as `tree_attention_reference`; meant for few query rows (decode steps, tree
    verification).
    """
    b, h, k, d = q.shape
    hkv, cache_len = k_cache.shape[1], k_cache.shape[2]
    if h % hkv:
        raise ValueError(f"query heads {h} not a multiple of kv heads {hkv}")
    group = h // hkv
    scale = d**-0.5 if scale is None else scale
    rows = q.reshape(b, hkv, group * k, d).astype(jnp.float32)  # row r = g * K + i
    tree_mask = jnp.broadcast_to(tree_mask, (b, k, k)).astype(bool)
    cache_valid, tree_valid = _scores_and_masks(lengths, tree_mask, cache_len, window, group)
    neg = jnp.finfo(jnp.float32).min
    s_cache = _scores_streaming(rows, k_cache) * scale
    s_cache = jnp.where(cache_valid[:, None], s_cache, neg)  # [B, Hkv, R, L]
    s_tree = jnp.einsum("bnrd,bnjd->bnrj", rows, k_tree.astype(jnp.float32)) * scale
    s_tree = jnp.where(tree_valid[:, None], s_tree, neg)  # [B, Hkv, R, K]
    peak = jnp.maximum(jnp.max(s_cache, axis=-1), jnp.max(s_tree, axis=-1))[..., None]
    p_cache, p_tree = jnp.exp(s_cache - peak), jnp.exp(s_tree - peak)
    total = (jnp.sum(p_cache, axis=-1) + jnp.sum(p_tree, axis=-1))[..., None]
    # Normalised before the sums over values, so the result is two reductions and an add: cheap for XLA to
    # fuse into the output projection that reads it.
    p_cache, p_tree = p_cache / total, p_tree / total
    out = jnp.einsum("bnrl,bnld->bnrd", p_cache, v_cache.astype(jnp.float32))
    out = out + jnp.einsum("bnrj,bnjd->bnrd", p_tree, v_tree.astype(jnp.float32))
    return out.reshape(b, h, k, d).astype(q.dtype)


def cached_chain_attention(q, k_cache, v_cache, positions, *, scale=None, window=0):
    """Attention of K chain nodes whose keys/values are already in the cache at their positions (an extend that
    wrote them first): node i of row b sees the cache entries at positions <= positions[b, i] (and, with a
    window, > positions[b, i] - window) -- what tree_attention gives with the cache before the write and the
    nodes as a lower-triangular tree block. q [B, H, K, D], caches [B, Hkv, L, D], positions [B, K].

    One softmax over the cache, as multiply-and-sum (for few rows, see STREAMING_MAX_ROWS): two reductions over
    major axes (the keys transposed for the first), whose result XLA keeps apart from the output projection
    that reads it.
    """
    b, h, k, d = q.shape
    hkv, cache_len = k_cache.shape[1], k_cache.shape[2]
    if h % hkv:
        raise ValueError(f"query heads {h} not a multiple of kv heads {hkv}")
    if positions.shape != (b, k):
        raise ValueError(f"cached_chain_attention: positions must be [B={b}, K={k}], got {positions.shape}")
    group = h // hkv
    scale = d**-0.5 if scale is None else scale
    rows = q.reshape(b, hkv, group * k, d).astype(jnp.float32)  # row r = g * K + i
    row_positions = jnp.tile(positions, (1, group))[:, None, :, None]  # [B, 1, R, 1]
    cols = jnp.arange(cache_len)[None, None, None, :]
    visible = cols <= row_positions
    if window:
        visible = visible & (cols > row_positions - window)
    # Multiply-and-sum only, no matmul against the cache: a matmul operand makes XLA duplicate the in-place
    # cache update that precedes it (and copy the whole cache to do so) inside a decode loop. The scores sum
    # over D; summed as the keys lie (D minor) XLA's CPU backend runs that reduction at ~2 GB/s, 6 ms of a
    # SmolLM2 step. One transposed copy of the keys makes it a sum over a major axis: 12% faster step
    # (benchmarks/step_profile.py, docs/benchmarks.md).
    keys_t = jnp.swapaxes(k_cache, -1, -2).astype(jnp.float32)  # [B, Hkv, D, L]
    scores = jnp.sum(rows[..., None] * keys_t[:, :, None], axis=-2) * scale
    probs = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.sum(probs[..., None] * v_cache[:, :, None].astype(jnp.float32), axis=-2)
    return out.reshape(b, h, k, d).astype(q.dtype)


def _tree_attention_kernel(*refs, scale, block_k, blocks_per_split, num_splits, row_tiles, window):
    """One (batch row, KV head, row tile, split): online softmax over the split's cache blocks + tree.

    refs: lengths, [first], q, k, v, k_tree, v_tree, tree mask, [positions], then the outputs acc, m, l.
    With a window (only then), `first` holds the first cache column any row of each (batch row, row tile)
    sees and `positions` each query row's absolute position.
    """
    if window:
        (length_ref, first_ref, q_ref, k_ref, v_ref, k_tree_ref, v_tree_ref, tree_mask_ref, position_ref,
         acc_ref, m_ref, l_ref) = refs
    else:
        length_ref, q_ref, k_ref, v_ref, k_tree_ref, v_tree_ref, tree_mask_ref, acc_ref, m_ref, l_ref = refs
    split = pl.program_id(3)
    length = length_ref[pl.program_id(0)]
    split_start = split * (blocks_per_split * block_k)
    # Blocks of this split that hold committed entries; the loop never touches blocks past the length.
    num_blocks = jnp.clip(pl.cdiv(length - split_start, block_k), 0, blocks_per_split)
    first_block = 0
    if window:  # nor blocks wholly before the window of every row of this tile
        first = first_ref[pl.program_id(0) * row_tiles + pl.program_id(2)]
        first_block = jnp.clip((first - split_start) // block_k, 0, num_blocks)
    q = q_ref[...]
    rows, dim = q.shape

    def cache_block(t, carry):
        start = pl.multiple_of(t * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        scores = matmul(q, k, transpose_b=True) * scale
        cols = split_start + start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        visible = cols < length
        if window:
            visible = visible & (cols > position_ref[...][:, None] - window)
        return online_softmax_step(carry, scores, visible, v)

    carry = jax.lax.fori_loop(first_block, num_blocks, cache_block, init_softmax_carry(rows, dim))
    # The tree block belongs to exactly one split (the last); the others mask it out entirely.
    scores = matmul(q, k_tree_ref[...], transpose_b=True) * scale
    visible = (tree_mask_ref[...] != 0) & (split == num_splits - 1)
    acc, m, l = online_softmax_step(carry, scores, visible, v_tree_ref[...])
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _window_tables(lengths, tree_mask, window: int, group: int, rows_padded: int, block_rows: int):
    """(absolute position of every query row [B, rows_padded], first cache column each (batch row, row tile)
    can see [B * row tiles]). Padding rows get a position past every key, so they see nothing."""
    positions = lengths[:, None] + node_depths(tree_mask)  # [B, K]
    row_positions = pad_axis(jnp.tile(positions, (1, group)), 1, rows_padded, value=jnp.iinfo(jnp.int32).max // 2)
    lowest = jnp.min(row_positions.reshape(row_positions.shape[0], -1, block_rows), axis=-1)
    return row_positions, jnp.maximum(lowest - window + 1, 0).reshape(-1)


def _tree_attention_pallas(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, *, scale, window=0,
                           block_k=128, block_rows=64, num_splits=None):
    b, h, k, d = q.shape
    hkv, cache_len = k_cache.shape[1], k_cache.shape[2]
    group = h // hkv
    op = "tree_attention"
    check_block_size(op, "block_k", block_k)
    check_block_size(op, "block_rows", block_rows)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"{op}: num_splits={num_splits!r} must be a positive int or None")

    dim = padded_head_dim(d)
    # Query rows: row r = g * K + i is node i of query head g of this KV head.
    rows = group * k
    block_rows = min(block_rows, max(16, next_power_of_2(rows)))
    rows_padded = round_up(rows, block_rows)
    tree_len = max(16, next_power_of_2(k))
    q_rows = q.reshape(b, hkv, rows, d)
    q_rows = pad_axis(pad_axis(q_rows, 2, rows_padded), 3, dim)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, cache_len)
    tree_mask = jnp.broadcast_to(tree_mask, (b, k, k)).astype(bool)
    if window:
        row_positions, first_cols = _window_tables(lengths, tree_mask, window, group, rows_padded, block_rows)
        tree_mask = windowed_tree_mask(tree_mask, window)
    row_mask = jnp.tile(tree_mask.astype(jnp.int32), (1, group, 1))
    row_mask = pad_axis(pad_axis(row_mask, 1, rows_padded), 2, tree_len)
    k_tree = pad_axis(pad_axis(k_tree, 2, tree_len), 3, dim)
    v_tree = pad_axis(pad_axis(v_tree, 2, tree_len), 3, dim)

    block_k = cache_block(cache_len, min(block_k, max(16, next_power_of_2(cache_len))))
    num_blocks = pl.cdiv(cache_len, block_k)
    row_tiles = rows_padded // block_rows
    if num_splits is None:
        num_splits = default_num_splits(num_blocks, b * hkv * row_tiles)
    blocks_per_split = choose_blocks_per_split(num_blocks, num_splits)
    num_splits = pl.cdiv(num_blocks, blocks_per_split)  # no split left without blocks
    split_len = blocks_per_split * block_k
    k_cache = pad_axis(pad_axis(k_cache, 2, num_splits * split_len), 3, dim)
    v_cache = pad_axis(pad_axis(v_cache, 2, num_splits * split_len), 3, dim)

    kernel = functools.partial(_tree_attention_kernel, scale=scale, block_k=block_k,
                               blocks_per_split=blocks_per_split, num_splits=num_splits, row_tiles=row_tiles,
                               window=window)
    rows_spec = pl.BlockSpec((None, None, block_rows, dim), lambda i, n, r, s: (i, n, r, 0))
    split_spec = pl.BlockSpec((None, None, split_len, dim), lambda i, n, r, s: (i, n, s, 0))
    tree_spec = pl.BlockSpec((None, None, tree_len, dim), lambda i, n, r, s: (i, n, 0, 0))
    partial_shape = (b, hkv, num_splits, rows_padded)
    in_specs = [scalar_table_spec(), rows_spec, split_spec, split_spec, tree_spec, tree_spec,
                pl.BlockSpec((None, block_rows, tree_len), lambda i, n, r, s: (i, r, 0))]
    inputs = [lengths, q_rows, k_cache, v_cache, k_tree, v_tree, row_mask]
    if window:
        in_specs.insert(1, scalar_table_spec())
        inputs.insert(1, first_cols)
        in_specs.append(pl.BlockSpec((None, block_rows), lambda i, n, r, s: (i, r)))
        inputs.append(row_positions)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, row_tiles, num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, block_rows, dim), lambda i, n, r, s: (i, n, s, r, 0)),
            pl.BlockSpec((None, None, None, block_rows), lambda i, n, r, s: (i, n, s, r)),
            pl.BlockSpec((None, None, None, block_rows), lambda i, n, r, s: (i, n, s, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        interpret=interpret_mode(),
        compiler_params=compiler_params(dim),
        name="tree_attention",
    )(*inputs)

    # Merge the splits' partial softmaxes: rescale each to the global max, then normalise once.
    m_max = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp(m - m_max)
    denom = jnp.sum(weight * l, axis=2)
    out = jnp.sum(weight[..., None] * acc, axis=2) / safe_denominator(denom)[..., None]
    out = out[:, :, :rows, :d].reshape(b, hkv, group, k, d).reshape(b, h, k, d)
    return out.astype(q.dtype)


def _check_shapes(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask):
    if q.ndim != 4:
        raise ValueError(f"tree_attention: q must be [B, H, K, D], got shape {q.shape}")
    b, h, k, d = q.shape
    if k_cache.ndim != 4 or k_cache.shape[0] != b or k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"tree_attention: k_cache/v_cache must both be [B={b}, Hkv, L, D={d}], "
                         f"got {k_cache.shape} and {v_cache.shape}")
    hkv = k_cache.shape[1]
    if h % hkv:
        raise ValueError(f"tree_attention: query heads {h} not a multiple of kv heads {hkv}")
    if lengths.shape != (b,):
        raise ValueError(f"tree_attention: lengths must be [B={b}], got {lengths.shape}")
    if k_tree.shape != (b, hkv, k, d) or v_tree.shape != k_tree.shape:
        raise ValueError(f"tree_attention: k_tree/v_tree must both be [{b}, {hkv}, {k}, {d}], "
                         f"got {k_tree.shape} and {v_tree.shape}")
    if tree_mask.shape not in ((k, k), (b, k, k)):
        raise ValueError(f"tree_attention: tree_mask must be [{k}, {k}] or [{b}, {k}, {k}], "
                         f"got {tree_mask.shape}")


def tree_attention(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, *, scale=None, window=0,
                   implementation=None, **block_sizes):
    """Dispatch: "xla" is plain XLA (streaming for few query rows, else the reference); "pallas" is the kernel
    (interpret mode on CPU).

    None picks "pallas" on GPU/TPU and "xla" on CPU. `window` (0: none) is a sliding window over absolute
    positions (see the module docstring). Block sizes (see the module docstring) are static Python ints;
    they only affect the kernel. Jit with `window`, `implementation` and block sizes static.
    """
    check_block_size_keys("tree_attention", block_sizes, BLOCK_SIZE_KEYS)
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"tree_attention: window={window!r} must be a non-negative int (0: no window)")
    implementation = resolve_implementation("tree_attention", implementation)
    _check_shapes(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask)
    if k_cache.shape[2] == 0:  # no committed context: the nodes attend among themselves (plain jnp suffices)
        return tree_attention_reference(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, scale=scale,
                                        window=window)
    if implementation == "xla" and q.shape[1] // k_cache.shape[1] * q.shape[2] <= STREAMING_MAX_ROWS:
        return tree_attention_streaming(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, scale=scale,
                                        window=window)
    if implementation == "xla":
        return tree_attention_reference(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, scale=scale,
                                        window=window)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _tree_attention_pallas(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, scale=scale,
                                  window=window, **block_sizes)
