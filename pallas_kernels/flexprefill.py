"""FlexPrefill block selection: per head, a query-aware or a vertical-slash set of (query block, key block) tiles.

Following FlexPrefill (Lai et al., ICLR 2025), each head looks at the exact attention of its last `block_size`
queries over all keys (a [block_size, T] slice of the attention matrix) and chooses its sparse pattern:

- pattern search: the slice's attention summed per key block and averaged over its queries (the true block
  distribution) is compared with an estimate from pooled vectors (softmax of those queries' mean against each
  key block's mean key). When their square-root Jensen-Shannon divergence is below `tau`, pooled vectors
  predict the head well and it takes the query-aware pattern; otherwise the vertical-slash pattern.
- query-aware: each query block's mean query against each key block's mean key, softmaxed per query block
  (causal at the block grain); the tiles of the whole head, taken by descending score until they hold
  `gamma` of its total.
- vertical-slash: from the same slice, the attention share of every key position (vertical lines) and of
  every distance query - key (slash lines), averaged over its queries; each kind of line is taken by
  descending share until the lines hold `gamma`, and a tile is kept when a chosen line crosses one of its
  visible elements (the paper's conversion of lines to blocks; the reference code instead derives a block
  count from the number of lines and ranks blocks by pooled line scores).

The sink tiles (key block 0) and the diagonal tiles are always kept, and with gamma = 1 every causal tile is.
Attention is causal self-attention over one sequence (Tq == Tk), top-left aligned like
`block_sparse_attention`: query i sees key j <= i. Rows may be right-padded (`lengths`): the last queries are
then each row's last real ones, and padding enters no estimate. The result is the boolean keep mask that
`xattention_block_mask` also returns, for `three_state_block_mask` and `block_sparse_attention`.
Both patterns are computed for every head and one is chosen per head with `where`: each is small next to the
attention it prunes ([block_size, T] for the lines, [nq, nk] for the pooled scores).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from jaxspec.errors import InputError
from pallas_kernels._common import MASK_VALUE, pad_axis
from pallas_kernels.xattention import _select_by_threshold as select_by_share


class FlexPrefillSelection(NamedTuple):
    keep: jax.Array  # bool [B, H, nq, nk]: the tiles the block-sparse attention computes
    query_aware: jax.Array  # bool [B, H]: the heads that took the query-aware pattern (else vertical-slash)


def _grouped_scores(q, k, scale):
    """Scaled float32 scores [B, H, M, N] of q [B, H, M, D] against k [B, Hkv, N, D] (GQA: H % Hkv == 0)."""
    b, h, m, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    grouped = q.reshape(b, hkv, h // hkv, m, d).astype(jnp.float32)
    scores = jnp.einsum("bngmd,bnkd->bngmk", grouped, k.astype(jnp.float32))
    return scores.reshape(b, h, m, n) * scale


def _masked_softmax(scores, visible):
    """Softmax over the last axis of the visible entries; hidden entries (and rows with none visible) are 0."""
    scores = jnp.where(visible, scores, MASK_VALUE)
    probs = jnp.where(visible, jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)), 0.0)
    return probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def _block_sums(x, block_size):
    """[..., T] summed over each block of `block_size` positions: [..., ceil(T / block_size)]."""
    n = -(-x.shape[-1] // block_size)
    return pad_axis(x, x.ndim - 1, n * block_size).reshape(*x.shape[:-1], n, block_size).sum(-1)


def _block_means(x, block_size, lengths):
    """x [B, H, T, D] averaged over each block of real positions (those before the row's length) along T:
    [B, H, ceil(T / block_size), D]. A ragged block averages its real positions only; one with none is 0."""
    b, h, t, d = x.shape
    n = -(-t // block_size)
    real = (jnp.arange(t)[None, :] < lengths[:, None])[:, None, :, None]
    sums = pad_axis(jnp.where(real, x.astype(jnp.float32), 0.0), 2, n * block_size)
    sums = sums.reshape(b, h, n, block_size, d).sum(3)
    counts = jnp.clip(lengths[:, None] - jnp.arange(n)[None, :] * block_size, 0, block_size)  # [B, n]
    return sums / jnp.maximum(counts, 1)[:, None, :, None]


def _sqrt_js_divergence(p, q):
    """sqrt(JSD(p, q)) over the last axis of two distributions (natural log: in [0, sqrt(ln 2)])."""
    m = (p + q) / 2
    kl_to_m = lambda a: jnp.sum(xlogy(a, a) - xlogy(a, m), axis=-1)
    return jnp.sqrt(jnp.maximum(0.5 * kl_to_m(p) + 0.5 * kl_to_m(q), 0.0))


class _LastQueries(NamedTuple):
    """The last `rows` real queries of each row: their causal attention over all keys and where they are."""

    probs: jax.Array  # [B, H, rows, T]; 0 on the rows of a sequence shorter than `rows`
    queries: jax.Array  # [B, H, rows, D]
    positions: jax.Array  # [B, rows] int
    real: jax.Array  # [B, rows] bool: the position lies in the sequence (a short sequence has fewer rows)


def _last_queries(q, k, *, rows, scale, lengths) -> _LastQueries:
    """The last `rows` positions before each row's length, and their exact causal attention over k."""
    positions = lengths[:, None] - rows + jnp.arange(rows)[None, :]
    real = positions >= 0
    queries = jnp.take_along_axis(q, jnp.maximum(positions, 0)[:, None, :, None], axis=2).astype(jnp.float32)
    visible = (jnp.arange(k.shape[2])[None, None, :] <= positions[:, :, None]) & real[:, :, None]
    probs = _masked_softmax(_grouped_scores(queries, k, scale), visible[:, None])
    return _LastQueries(probs, queries, positions, real)


def _line_shares(last: _LastQueries):
    """(vertical, slash), each [B, H, T]: the attention of the last queries averaged over them, per key
    position and per distance (query position - key position); each sums to 1."""
    t = last.probs.shape[-1]
    count = jnp.maximum(jnp.sum(last.real, axis=-1), 1)[:, None, None]
    vertical = last.probs.sum(axis=2) / count
    keys = last.positions[:, None, :, None] - jnp.arange(t)  # [B, 1, rows, T]: the key at each distance
    at_distance = jnp.take_along_axis(last.probs, jnp.broadcast_to(jnp.maximum(keys, 0), last.probs.shape), axis=-1)
    slash = jnp.where(keys >= 0, at_distance, 0.0).sum(axis=2) / count
    return vertical, slash


def _pooled_estimate(last: _LastQueries, k, *, block_size, scale, lengths):
    """The block distribution [B, H, nk] that pooled vectors predict for the last queries: softmax of their
    mean query against each (non-empty) key block's mean key."""
    real = last.real[:, None, :, None]
    mean_query = jnp.sum(jnp.where(real, last.queries, 0.0), axis=2, keepdims=True) / jnp.maximum(
        jnp.sum(real, axis=2, keepdims=True), 1)
    scores = _grouped_scores(mean_query, _block_means(k, block_size, lengths), scale)[:, :, 0]
    n = scores.shape[-1]
    return _masked_softmax(scores, (jnp.arange(n)[None, :] * block_size < lengths[:, None])[:, None])


def _top_share(scores, gamma, valid):
    """Per row of `scores` [..., N]: the valid entries taken by descending score until they hold `gamma` of the
    row's total (the entry that crosses it included); gamma >= 1 takes every valid entry."""
    valid = jnp.broadcast_to(valid, scores.shape)
    return select_by_share(scores, jnp.zeros(scores.shape, bool), valid, gamma)


def _vertical_slash_tiles(vertical, slash, *, block_size, gamma, lengths):
    """Tiles [B, H, n, n] crossed by the vertical or slash lines that hold `gamma` of their kind (causal
    tiles only are meaningful; the caller masks the rest)."""
    t = vertical.shape[-1]
    n = -(-t // block_size)
    in_sequence = (jnp.arange(t)[None, :] < lengths[:, None])[:, None]  # [B, 1, T]: real keys, and distances
    verticals = _top_share(vertical, gamma, in_sequence).astype(jnp.int32)
    has_vertical = _block_sums(verticals, block_size) > 0  # [B, H, nk]
    # Distances of the visible elements of tile (r, c), r >= c: from max(0, (r - c - 1) * block_size + 1) to
    # (the row's last real query) - c * block_size.
    r = jnp.arange(n)[:, None]
    c = jnp.arange(n)[None, :]
    lo = jnp.clip((r - c - 1) * block_size + 1, 0, t)
    row_end = jnp.minimum((r + 1) * block_size, lengths[:, None, None])  # [B, n, 1]: one past the last query
    hi = jnp.clip(row_end - c * block_size, lo, t)  # one past the last distance
    slashes = _top_share(slash, gamma, in_sequence).astype(jnp.int32)
    slashes_before = jnp.concatenate([jnp.zeros_like(slashes[..., :1]), jnp.cumsum(slashes, axis=-1)], axis=-1)
    has_slash = jax.vmap(lambda before, hi: before[..., hi] - before[..., lo])(slashes_before, hi) > 0
    return has_vertical[..., None, :] | has_slash


def _query_aware_tiles(q, k, *, block_size, gamma, scale, lengths, causal):
    """Tiles [B, H, nq, nk] chosen by pooled attention: block-mean queries against block-mean keys, softmaxed
    per query block over its causal key blocks, then the head's tiles by descending score up to `gamma`."""
    n = causal.shape[-1]
    nonempty = jnp.arange(n)[None, :] * block_size < lengths[:, None]  # [B, n]
    valid = (causal & nonempty[:, :, None] & nonempty[:, None, :])[:, None]  # [B, 1, nq, nk]
    scores = _grouped_scores(_block_means(q, block_size, lengths), _block_means(k, block_size, lengths), scale)
    probs = _masked_softmax(scores, valid)
    b, h = probs.shape[:2]
    return _top_share(probs.reshape(b, h, n * n), gamma, valid.reshape(b, 1, n * n)).reshape(b, h, n, n)


def _check_arguments(q, k, block_size, gamma, tau):
    op = "flexprefill_block_mask"
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise InputError(f"{op}: need q [B, H, T, D] and k [B, Hkv, T, D]; got q {q.shape}, k {k.shape}")
    if q.shape[1] % k.shape[1]:
        raise InputError(f"{op}: query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if q.shape[2] != k.shape[2]:
        raise InputError(f"{op}: causal self-attention needs as many queries as keys; got q length {q.shape[2]}, "
                         f"k length {k.shape[2]}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise InputError(f"{op}: block_size={block_size!r} must be a positive integer")
    if isinstance(gamma, (int, float)) and not 0.0 < gamma <= 1.0:
        raise InputError(f"{op}: gamma={gamma!r} must be in (0, 1]")
    if isinstance(tau, (int, float)) and not 0.0 <= tau <= 1.0:
        raise InputError(f"{op}: tau={tau!r} must be in [0, 1]")


def flexprefill_selection(q, k, *, block_size: int, gamma, tau, scale=None, lengths=None) -> FlexPrefillSelection:
    """The kept tiles [B, H, ceil(T / block_size)]^2 and each head's pattern (see the module docstring).

    q [B, H, T, D], k [B, Hkv, T, D] (GQA: H % Hkv == 0). gamma in (0, 1]: the attention share the chosen
    lines or tiles hold; tau in [0, 1]: the divergence under which a head is query-aware (0: none is, 1: all
    are). gamma and tau may be Python floats or traced scalars. scale: the attention's score scale (None:
    1/sqrt(D)). lengths [B] (None: T): each row's real positions, right padding after them (a bucketed
    prefill); the last queries are then the row's last real ones and padding enters no estimate.
    Tiles above the diagonal are never kept. Jittable with block_size static.
    """
    _check_arguments(q, k, block_size, gamma, tau)
    # Selection is discrete: no gradient should flow back through the scoring.
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    b, t, d = q.shape[0], q.shape[2], q.shape[3]
    scale = d**-0.5 if scale is None else scale
    gamma = jnp.asarray(gamma, jnp.float32)
    lengths = jnp.broadcast_to(jnp.asarray(t if lengths is None else lengths, jnp.int32), (b,))
    n = -(-t // block_size)
    qi = jnp.arange(n)[:, None]
    kj = jnp.arange(n)[None, :]
    causal = kj <= qi
    forced = (kj == 0) | (kj == qi)

    last = _last_queries(q, k, rows=min(block_size, t), scale=scale, lengths=lengths)
    vertical, slash = _line_shares(last)
    estimate = _pooled_estimate(last, k, block_size=block_size, scale=scale, lengths=lengths)
    query_aware = _sqrt_js_divergence(_block_sums(vertical, block_size), estimate) < tau
    tiles = jnp.where(query_aware[..., None, None],
                      _query_aware_tiles(q, k, block_size=block_size, gamma=gamma, scale=scale, lengths=lengths,
                                         causal=causal),
                      _vertical_slash_tiles(vertical, slash, block_size=block_size, gamma=gamma, lengths=lengths))
    return FlexPrefillSelection((tiles | forced) & causal, query_aware)


def flexprefill_block_mask(q, k, *, block_size: int, gamma, tau, scale=None, lengths=None):
    """Boolean keep mask [B, H, ceil(T / block_size), ceil(T / block_size)] of FlexPrefill's selection
    (`flexprefill_selection(...).keep`), the form `xattention_block_mask` returns."""
    return flexprefill_selection(q, k, block_size=block_size, gamma=gamma, tau=tau, scale=scale,
                                 lengths=lengths).keep
