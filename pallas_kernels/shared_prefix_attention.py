"""Shared-prefix attention (Hydragen): many rows attend to one shared prefix plus a suffix of their own.

B rows (B samples of one prompt, or B sequences that share a system prompt) see the same P prefix keys
and values, then their own committed suffix and the K new tree nodes of tree attention. Hydragen's
observation: attention over [prefix | suffix] splits exactly into an attention over the prefix and one over
the suffix, merged by their log-sum-exps, and the prefix part needs no batch axis: the queries of all rows
are stacked against the single prefix (inter-sequence batching), so the prefix is read once instead of B
times and the products are B times taller.

Shapes (GQA: H query heads share Hkv key/value heads, H % Hkv == 0, G = H / Hkv):
  q           [B, H, K, D]    queries of the K tree nodes of each row
  k_prefix    [Hkv, P, D]     the one shared prefix (no batch axis); valid on [0, prefix_len)
  v_prefix    [Hkv, P, D]
  prefix_len  int scalar      valid prefix length; clipped to [0, P], so P can be a padded bucket
  k_cache     [B, Hkv, L, D]  per-row suffix: row b is valid on [0, lengths[b]) (lengths may be 0)
  v_cache     [B, Hkv, L, D]
  lengths     [B] int32
  k_tree      [B, Hkv, K, D]  keys of the tree nodes themselves
  v_tree      [B, Hkv, K, D]
  tree_mask   [K, K] or [B, K, K] bool; tree_mask[i, j] = node j is an ancestor of i (or i itself)
Returns [B, H, K, D]: exactly tree attention over the concatenated cache [prefix[:prefix_len] |
k_cache[b, :lengths[b]]] of length prefix_len + lengths[b] (`shared_prefix_attention_reference`).
Sliding windows are not supported: positions in a window would depend on the prefix length, and the op
has no `window` argument; use tree_attention over the concatenated cache for that.

The math. For one query row with scores s_p over the visible prefix keys and s_s over its visible suffix
keys (row cache and tree ancestors), each part is a softmax with its log-sum-exp:
  out_p = softmax(s_p) @ v_p,  lse_p = log(sum(exp(s_p)))       (the same for the suffix: out_s, lse_s)
and attention over the concatenation is their convex combination:
  m = max(lse_p, lse_s)
  out = (exp(lse_p - m) * out_p + exp(lse_s - m) * out_s) / (exp(lse_p - m) + exp(lse_s - m))
A part that sees no key has lse = -inf and weight 0; a row that sees nothing outputs zeros.

`prefix_attention_partials` returns (out_p, lse_p). Its query rows, per KV head, are r = (b * G + g) * K + i
(node i of query head g of row b): all B*G*K of them form one [B*G*K, D] matrix against the [P, D] prefix.
  "xla"     one product per KV head (a matmul batched over Hkv only, [B*G*K, D] @ [D, P]), one softmax
            over its scores, one product with the values.
  "pallas"  flash attention over prefix blocks. Grid (KV head, row tile, prefix split): a program holds
            `block_rows` stacked query rows and runs an online softmax over its split's prefix blocks,
            stopping at prefix_len (blocks past it are never loaded). A prefix block is therefore loaded once
            per KV head and row tile, not once per batch row. The splits' partial (accumulator, max, sum)
            triples are merged in XLA into (out, lse).
`suffix_attention_partials` returns (out_s, lse_s): per-row tree attention over the row cache and the tree
block, in XLA for every implementation (the suffix is the short part; its rows are independent, so it has
nothing to share).

Kernel tuning knobs are a `BlockSizes` (static; they never change the result):
  block_k     prefix block length (power of two; default 128, an upper bound: shrunk for short prefixes and,
              down to 16, until it divides P, so a P that is a multiple of 16 is read in place)
  block_rows  stacked query rows per program (power of two; default 64; shrunk to the rows there are)
  num_splits  prefix splits per (KV head, row tile) (default: enough programs to fill a GPU)
B*G*K and D are padded inside the op (D to a power of two >= 16); P only when 16 does not divide it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    cache_block,
    check_block_size,
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
from pallas_kernels.tree_attention import tree_attention_reference

OP = "shared_prefix_attention"


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Static tuning knobs of the prefix kernel (see the module docstring); hashable, so jit-static."""

    block_k: int = 128
    block_rows: int = 64
    num_splits: int | None = None

    def check(self, op: str) -> BlockSizes:
        check_block_size(op, "block_k", self.block_k)
        check_block_size(op, "block_rows", self.block_rows)
        splits = self.num_splits
        if splits is not None and (not isinstance(splits, int) or isinstance(splits, bool) or splits < 1):
            raise ValueError(f"{op}: num_splits={splits!r} must be a positive int or None")
        return self


# ----------------------------------------------------------------------------------------------- checks


def _prefix_len_scalar(op: str, prefix_len, prefix_size: int):
    """prefix_len as an int32 scalar clipped to [0, P]; a Python int or an integer array of rank 0."""
    if isinstance(prefix_len, bool):
        raise ValueError(f"{op}: prefix_len must be an integer scalar, got the bool {prefix_len!r}")
    if not isinstance(prefix_len, int):
        shape, dtype = getattr(prefix_len, "shape", None), getattr(prefix_len, "dtype", None)
        if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"{op}: prefix_len must be an int32 scalar (rank 0), got shape {shape} dtype {dtype}")
    return jnp.clip(jnp.asarray(prefix_len, jnp.int32), 0, prefix_size)


def _check_prefix(op: str, q, k_prefix, v_prefix) -> None:
    if q.ndim != 4:
        raise ValueError(f"{op}: q must be [B, H, K, D], got shape {q.shape}")
    h, d = q.shape[1], q.shape[3]
    if k_prefix.ndim != 3 or k_prefix.shape[2] != d or v_prefix.shape != k_prefix.shape:
        raise ValueError(f"{op}: k_prefix/v_prefix must both be [Hkv, P, D={d}] (one prefix, no batch axis), "
                         f"got {k_prefix.shape} and {v_prefix.shape}")
    hkv = k_prefix.shape[0]
    if hkv == 0 or h % hkv:
        raise ValueError(f"{op}: query heads {h} (q {q.shape}) not a multiple of kv heads {hkv} "
                         f"(k_prefix {k_prefix.shape})")


def _check_suffix(op: str, q, hkv: int, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask) -> None:
    if q.ndim != 4:
        raise ValueError(f"{op}: q must be [B, H, K, D], got shape {q.shape}")
    b, h, k, d = q.shape
    if k_cache.ndim != 4 or k_cache.shape[:2] != (b, hkv) or k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: k_cache/v_cache must both be [B={b}, Hkv={hkv}, L, D={d}], "
                         f"got {k_cache.shape} and {v_cache.shape}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"{op}: query heads {h} (q {q.shape}) not a multiple of kv heads {hkv} "
                         f"(k_cache {k_cache.shape})")
    if lengths.shape != (b,):
        raise ValueError(f"{op}: lengths must be [B={b}], got {lengths.shape}")
    if k_tree.shape != (b, hkv, k, d) or v_tree.shape != k_tree.shape:
        raise ValueError(f"{op}: k_tree/v_tree must both be [{b}, {hkv}, {k}, {d}], "
                         f"got {k_tree.shape} and {v_tree.shape}")
    if tree_mask.shape not in ((k, k), (b, k, k)):
        raise ValueError(f"{op}: tree_mask must be [{k}, {k}] or [{b}, {k}, {k}], got {tree_mask.shape}")


# -------------------------------------------------------------------------------------------- reference


def concat_prefix(k_prefix, v_prefix, prefix_len, k_cache, v_cache, lengths):
    """Each row's cache with the shared prefix in front: (k [B, Hkv, P+L, D], v, lengths [B]), row b valid on
    [0, prefix_len + lengths[b]): entry c is prefix[c] below prefix_len, then cache[b, c - prefix_len]. What
    a batch without prefix sharing holds; entries past a row's length are unspecified (masked)."""
    size, cache_len = k_prefix.shape[1], k_cache.shape[2]
    prefix_len = _prefix_len_scalar("concat_prefix", prefix_len, size)
    cols = jnp.arange(size + cache_len)
    from_prefix = (cols < prefix_len)[None, None, :, None]

    def concat(prefix, cache):
        if size == 0:
            return cache
        head = jnp.take(prefix, jnp.minimum(cols, size - 1), axis=1)[None]  # [1, Hkv, P+L, D]
        if cache_len == 0:
            tail = jnp.zeros((), prefix.dtype)
        else:
            tail = jnp.take(cache, jnp.clip(cols - prefix_len, 0, cache_len - 1), axis=2)
        joined = jnp.where(from_prefix, head, tail).astype(jnp.result_type(prefix, cache))
        return jnp.broadcast_to(joined, (*cache.shape[:2], size + cache_len, cache.shape[3]))

    return concat(k_prefix, k_cache), concat(v_prefix, v_cache), prefix_len + lengths.astype(jnp.int32)


def shared_prefix_attention_reference(q, k_prefix, v_prefix, prefix_len, k_cache, v_cache, lengths, k_tree,
                                      v_tree, tree_mask, *, scale=None):
    """Plain jnp: the prefix copied in front of every row's cache, then `tree_attention_reference`."""
    _check_prefix(OP, q, k_prefix, v_prefix)
    _check_suffix(OP, q, k_prefix.shape[0], k_cache, v_cache, lengths, k_tree, v_tree, tree_mask)
    k_cat, v_cat, lengths_cat = concat_prefix(k_prefix, v_prefix, prefix_len, k_cache, v_cache, lengths)
    return tree_attention_reference(q, k_cat, v_cat, lengths_cat, k_tree, v_tree, tree_mask, scale=scale)


# ------------------------------------------------------------------------------------- (out, lse) parts


def _softmax_parts(scores, axis):
    """Probabilities (unnormalised, masked -inf scores give 0), peak and total of score arrays that share
    every axis but `axis`, as one softmax over their concatenation along it."""
    peak = functools.reduce(jnp.maximum, [jnp.max(s, axis=axis, initial=-jnp.inf) for s in scores])
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)  # a row that sees nothing: every probability is exp(-inf)
    probs = [jnp.exp(s - jnp.expand_dims(peak, axis)) for s in scores]
    total = functools.reduce(jnp.add, [jnp.sum(p, axis=axis) for p in probs])
    return probs, peak, total


def _log_sum_exp(peak, total):
    """peak + log(total), and -inf for a row that saw no key (total 0)."""
    return jnp.where(total > 0.0, peak + jnp.log(safe_denominator(total)), -jnp.inf)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from each one's (out [..., D], lse [...]) (float32).

    A side with lse = -inf (no visible key) gets weight 0; if both have none, the output is zeros.
    """
    peak = jnp.maximum(lse_a, lse_b)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weight_a, weight_b = jnp.exp(lse_a - peak), jnp.exp(lse_b - peak)
    total = safe_denominator(weight_a + weight_b)
    return (weight_a[..., None] * out_a + weight_b[..., None] * out_b) / total[..., None]


def _stack_rows(q, hkv: int):
    """q [B, H, K, D] -> [Hkv, B*G*K, D], row r = (b * G + g) * K + i."""
    b, h, k, d = q.shape
    return q.reshape(b, hkv, h // hkv, k, d).swapaxes(0, 1).reshape(hkv, -1, d)


def _unstack_rows(x, b: int, h: int, k: int):
    """Inverse of `_stack_rows` for [Hkv, B*G*K, ...] -> [B, H, K, ...]."""
    hkv, rest = x.shape[0], x.shape[2:]
    return x.reshape(hkv, b, h // hkv, k, *rest).swapaxes(0, 1).reshape(b, h, k, *rest)


def _prefix_partials_xla(q, k_prefix, v_prefix, prefix_len, scale):
    b, h, k, _ = q.shape
    hkv, size = k_prefix.shape[:2]
    rows = _stack_rows(q, hkv).astype(jnp.float32)  # [Hkv, R, D]
    # One product per KV head with the rows of all B batch rows stacked: [Hkv, R, D] @ [Hkv, P, D]^T.
    scores = jnp.einsum("nrd,npd->nrp", rows, k_prefix.astype(jnp.float32)) * scale  # [Hkv, R, P]
    scores = jnp.where(jnp.arange(size) < prefix_len, scores, -jnp.inf)
    (probs,), peak, total = _softmax_parts([scores], axis=-1)
    out = jnp.einsum("nrp,npd->nrd", probs, v_prefix.astype(jnp.float32)) / safe_denominator(total)[..., None]
    return _unstack_rows(out, b, h, k), _unstack_rows(_log_sum_exp(peak, total), b, h, k)


def _prefix_kernel(prefix_len_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale, block_k,
                   blocks_per_split):
    """One (KV head, row tile, split): online softmax of the tile's stacked rows over the split's blocks."""
    prefix_len = prefix_len_ref[0]
    split_start = pl.program_id(2) * (blocks_per_split * block_k)
    # Blocks of this split that hold prefix entries; the loop never touches blocks past prefix_len.
    num_blocks = jnp.clip(pl.cdiv(prefix_len - split_start, block_k), 0, blocks_per_split)
    q = q_ref[...]
    rows, dim = q.shape

    def prefix_block(t, carry):
        start = pl.multiple_of(t * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        scores = matmul(q, k, transpose_b=True) * scale
        cols = split_start + start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        return online_softmax_step(carry, scores, cols < prefix_len, v)

    acc, m, l = jax.lax.fori_loop(0, num_blocks, prefix_block, init_softmax_carry(rows, dim))
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _prefix_partials_pallas(q, k_prefix, v_prefix, prefix_len, scale, block_sizes: BlockSizes):
    b, h, k, d = q.shape
    hkv, size = k_prefix.shape[:2]
    dim = padded_head_dim(d)
    rows = b * (h // hkv) * k
    block_rows = min(block_sizes.block_rows, max(16, next_power_of_2(rows)))
    rows_padded = round_up(rows, block_rows)
    row_tiles = rows_padded // block_rows
    q_rows = pad_axis(pad_axis(_stack_rows(q, hkv), 1, rows_padded), 2, dim)  # padding rows are cut below

    block_k = cache_block(size, min(block_sizes.block_k, max(16, next_power_of_2(size))))
    num_blocks = pl.cdiv(size, block_k)
    num_splits = block_sizes.num_splits or default_num_splits(num_blocks, hkv * row_tiles)
    blocks_per_split = choose_blocks_per_split(num_blocks, num_splits)
    num_splits = pl.cdiv(num_blocks, blocks_per_split)  # no split left without blocks
    split_len = blocks_per_split * block_k
    k_prefix = pad_axis(pad_axis(k_prefix, 1, num_splits * split_len), 2, dim)
    v_prefix = pad_axis(pad_axis(v_prefix, 1, num_splits * split_len), 2, dim)

    kernel = functools.partial(_prefix_kernel, scale=scale, block_k=block_k, blocks_per_split=blocks_per_split)
    split_spec = pl.BlockSpec((None, split_len, dim), lambda n, r, s: (n, s, 0))
    partial_shape = (hkv, num_splits, rows_padded)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(hkv, row_tiles, num_splits),
        in_specs=[scalar_table_spec(), pl.BlockSpec((None, block_rows, dim), lambda n, r, s: (n, r, 0)),
                  split_spec, split_spec],
        out_specs=[
            pl.BlockSpec((None, None, block_rows, dim), lambda n, r, s: (n, s, r, 0)),
            pl.BlockSpec((None, None, block_rows), lambda n, r, s: (n, s, r)),
            pl.BlockSpec((None, None, block_rows), lambda n, r, s: (n, s, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        interpret=interpret_mode(),
        compiler_params=compiler_params(dim),
        name="shared_prefix_attention",
    )(prefix_len.reshape(1), q_rows, k_prefix, v_prefix)

    # Merge the splits: rescale each to the largest max, normalise once; lse = max + log(sum).
    m_max = jnp.max(m, axis=1)
    weight = jnp.exp(m - m_max[:, None])
    total = jnp.sum(weight * l, axis=1)
    out = jnp.sum(weight[..., None] * acc, axis=1) / safe_denominator(total)[..., None]
    lse = _log_sum_exp(m_max, total)
    return _unstack_rows(out[:, :rows, :d], b, h, k), _unstack_rows(lse[:, :rows], b, h, k)


def prefix_attention_partials(q, k_prefix, v_prefix, prefix_len, *, scale=None, implementation=None,
                              block_sizes: BlockSizes | None = None):
    """(out [B, H, K, D], lse [B, H, K]), both float32: attention of every row's queries over the shared prefix.

    All rows are stacked against the one prefix (see the module docstring). lse is -inf (and out zeros) when
    prefix_len is 0. Jit with `implementation` and `block_sizes` static.
    """
    implementation = resolve_implementation(OP, implementation)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"{OP}: block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}")
    _check_prefix(OP, q, k_prefix, v_prefix)
    prefix_len = _prefix_len_scalar(OP, prefix_len, k_prefix.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k_prefix.shape[1] == 0:  # nothing to read
        return jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32)
    if implementation == "xla":
        return _prefix_partials_xla(q, k_prefix, v_prefix, prefix_len, scale)
    block_sizes = (block_sizes or BlockSizes()).check(OP)
    return _prefix_partials_pallas(q, k_prefix, v_prefix, prefix_len, scale, block_sizes)


def suffix_attention_partials(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, *, scale=None):
    """(out [B, H, K, D], lse [B, H, K]), both float32: tree attention of each row over its own cache and tree.

    The cache is the row-major left operand of the score product (k_cache @ rows^T), the layout it is stored in.
    """
    if q.ndim != 4 or k_cache.ndim != 4:
        raise ValueError(f"{OP}: q and k_cache must be [B, H, K, D] and [B, Hkv, L, D], got {q.shape} and "
                         f"{k_cache.shape}")
    _check_suffix(OP, q, k_cache.shape[1], k_cache, v_cache, lengths, k_tree, v_tree, tree_mask)
    b, h, k, d = q.shape
    hkv, cache_len = k_cache.shape[1], k_cache.shape[2]
    group = h // hkv
    scale = d**-0.5 if scale is None else scale
    rows = q.reshape(b, hkv, group * k, d).astype(jnp.float32)  # row r = g * K + i
    s_cache = jnp.einsum("bnld,bnrd->bnlr", k_cache.astype(jnp.float32), rows).swapaxes(-1, -2) * scale
    cache_valid = jnp.arange(cache_len)[None, :] < lengths[:, None]  # [B, L]
    s_cache = jnp.where(cache_valid[:, None, None, :], s_cache, -jnp.inf)  # [B, Hkv, R, L]
    tree_valid = jnp.tile(jnp.broadcast_to(tree_mask, (b, k, k)).astype(bool), (1, group, 1))  # [B, R, K]
    s_tree = jnp.einsum("bnrd,bnjd->bnrj", rows, k_tree.astype(jnp.float32)) * scale
    s_tree = jnp.where(tree_valid[:, None], s_tree, -jnp.inf)  # [B, Hkv, R, K]
    (p_cache, p_tree), peak, total = _softmax_parts([s_cache, s_tree], axis=-1)
    out = jnp.einsum("bnrl,bnld->bnrd", p_cache, v_cache.astype(jnp.float32))
    out = out + jnp.einsum("bnrj,bnjd->bnrd", p_tree, v_tree.astype(jnp.float32))
    out = out / safe_denominator(total)[..., None]
    return out.reshape(b, h, k, d), _log_sum_exp(peak, total).reshape(b, h, k)


def shared_prefix_attention(q, k_prefix, v_prefix, prefix_len, k_cache, v_cache, lengths, k_tree, v_tree,
                            tree_mask, *, scale=None, implementation=None, block_sizes: BlockSizes | None = None):
    """Attention over [shared prefix | row suffix]: prefix partials (all rows stacked, read once) and suffix
    partials merged by log-sum-exp. Same result as `shared_prefix_attention_reference`.

    `implementation`: "xla", "pallas" (the prefix kernel; interpret mode on CPU) or None ("pallas" on GPU/TPU,
    "xla" on CPU); the suffix is XLA in every case. Jit with `implementation` and `block_sizes` static.
    """
    implementation = resolve_implementation(OP, implementation)
    _check_prefix(OP, q, k_prefix, v_prefix)
    _check_suffix(OP, q, k_prefix.shape[0], k_cache, v_cache, lengths, k_tree, v_tree, tree_mask)
    out_p, lse_p = prefix_attention_partials(q, k_prefix, v_prefix, prefix_len, scale=scale,
                                             implementation=implementation, block_sizes=block_sizes)
    out_s, lse_s = suffix_attention_partials(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, scale=scale)
    return merge_partials(out_p, lse_p, out_s, lse_s).astype(q.dtype)
