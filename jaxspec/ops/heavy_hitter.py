"""Heavy-hitter KV (H2O, Zhang et al. 2023): attention over a budgeted cache that keeps the recent window plus the
keys with the largest accumulated attention.

The rule (`keep_mask`): of the cached keys of one row and KV head, keep
  - the `recent` latest positions, always, and
  - of the others, the `budget - (recent kept)` keys with the largest accumulated score; equal scores go to
    the later position. The first key (the attention sink) has no reserved place: it stays only by its score
    (it usually wins: every later query attends to it).
A key's score is the attention probability it has received, summed over the query heads of its KV group and
over every query since it was cached (the prompt's queries included).

The cache (`state.HeavyHitterCache`) has `budget` slots. An extend of T tokens is one step of the rule:
  1. the new queries attend to the kept keys plus the new keys (causally among themselves): the prefill of a
     prompt therefore sees the whole prompt, and a decode step the kept set plus itself;
  2. every key's score grows by the attention it received from the new (valid) queries;
  3. the rule picks `budget` of the old and new keys; new keys that stay overwrite the slots of evicted ones.
So attention costs O(budget) per query at any context length, and the result depends on how context arrives:
one T-token extend evicts once, after its T queries (the decode loops append one token per step; a chunked
prefill evicts after every chunk). A tree forward (drafting) reads the cache and returns its nodes'
keys/values as pending; the nodes' attention adds to no score (they are not context yet).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec.config import is_int
from jaxspec.errors import InputError
from jaxspec.state import DecodeState, HeavyHitterCache, KVCache, per_layer

_MASKED = jnp.finfo(jnp.float32).min


def check_kv_budget(kv_budget) -> tuple[int, int]:
    """(budget, recent) of a `kv_budget` option, or an InputError naming the value and what is allowed."""
    ok = (isinstance(kv_budget, tuple) and len(kv_budget) == 2 and all(is_int(x) for x in kv_budget)
          and kv_budget[0] >= 1 and 0 <= kv_budget[1] <= kv_budget[0])
    if not ok:
        raise InputError(f"kv_budget={kv_budget!r} must be a tuple (budget, recent) of integers with budget >= 1 "
                         "and 0 <= recent <= budget")
    return kv_budget


def keep_mask(scores, positions, lengths, *, budget: int, recent: int):
    """Which keys the rule keeps (see the module docstring): bool [..., S].

    scores [..., S] accumulated attention; positions [..., S] int32, -1 for an empty slot (never kept);
    lengths [...] the context length the keys belong to (every position is below it). A row with at most
    `budget` keys keeps them all.
    """
    valid = positions >= 0
    in_window = valid & (positions >= lengths[..., None] - recent)
    others = valid & ~in_window
    heavy = budget - jnp.sum(in_window, axis=-1, keepdims=True)  # places left after the recent window
    axis = positions.ndim - 1
    slot = jax.lax.broadcasted_iota(jnp.int32, positions.shape, axis)
    # Best first: largest score, then latest position; keys outside `others` sort last.
    by_score = jnp.where(others, -scores.astype(jnp.float32), jnp.inf)
    _, _, order = jax.lax.sort((by_score, -positions, slot), dimension=axis, num_keys=2)
    # order[r] is the slot ranked r; sorting (order, r < heavy) by order puts each slot's verdict back in place.
    _, chosen = jax.lax.sort((order, slot < heavy), dimension=axis, num_keys=1)
    return in_window | (others & chosen)


def budgeted_state(state: DecodeState, kv_budget, fresh: bool) -> DecodeState:
    """The decode state whose attention layers keep a budgeted cache of `kv_budget = (budget, recent)`.

    A fresh prefill (`fresh=True`, an empty state) swaps every plain KV cache for an empty budgeted one; later
    forwards find the budgeted caches in the state and must ask for the same budget."""
    budget, recent = check_kv_budget(kv_budget)
    if state is None:
        raise InputError(f"kv_budget={kv_budget} needs a decode state (state=...): a full forward keeps no cache")
    state = per_layer(state)  # budgeted caches are held per layer
    layers = []
    for i, layer in enumerate(state.layers):
        if isinstance(layer, HeavyHitterCache):
            if (layer.budget, layer.recent) != (budget, recent):
                raise InputError(f"kv_budget={kv_budget} differs from the budget of the state's layer {i} "
                                 f"({layer.budget}, {layer.recent})")
        elif isinstance(layer, KVCache):
            if not fresh:
                raise InputError(f"kv_budget={kv_budget}: layer {i} of the state holds a plain KV cache; a budgeted "
                                 "cache starts at a fresh prefill (fresh=True into an empty state)")
            b, hkv, _, d = layer.k.shape
            layer = HeavyHitterCache(k=jnp.zeros((b, hkv, budget, d), layer.k.dtype),
                                     v=jnp.zeros((b, hkv, budget, d), layer.v.dtype),
                                     score=jnp.zeros((b, hkv, budget), jnp.float32),
                                     position=jnp.full((b, hkv, budget), -1, jnp.int32), recent=recent)
        layers.append(layer)
    return state.replace(layers=tuple(layers))


def _attention(q, k, v, cache: HeavyHitterCache, new_mask, scale):
    """Queries q [B, H, T, D] over the cache's kept keys and the T new keys k, v [B, Hkv, T, D], the new ones as
    new_mask [B, T, T] allows. Returns (out [B, H, T, D], probabilities [B, Hkv, G, T, budget + T]: slots first)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    rows = q.reshape(b, hkv, h // hkv, t, d)
    on_slots = jnp.einsum("bkgtd,bknd->bkgtn", rows, cache.k.astype(q.dtype), preferred_element_type=jnp.float32)
    on_new = jnp.einsum("bkgtd,bksd->bkgts", rows, k, preferred_element_type=jnp.float32)
    visible = jnp.concatenate([jnp.broadcast_to((cache.position >= 0)[:, :, None, None, :], on_slots.shape),
                               jnp.broadcast_to(new_mask[:, None, None], on_new.shape)], axis=-1)
    scores = jnp.concatenate([on_slots, on_new], axis=-1) * scale
    probs = jax.nn.softmax(jnp.where(visible, scores, _MASKED), axis=-1)
    n = cache.budget
    out = (jnp.einsum("bkgtn,bknd->bkgtd", probs[..., :n], cache.v.astype(jnp.float32))
           + jnp.einsum("bkgts,bksd->bkgtd", probs[..., n:], v.astype(jnp.float32)))
    return out.reshape(b, h, t, d).astype(q.dtype), probs


def _write_slots(cache_part, new, slot):
    """cache_part [B, Hkv, N, ...] with new [B, Hkv, T, ...] written at slot [B, Hkv, T] (N: not written)."""
    one = lambda c, x, i: c.at[i].set(x.astype(c.dtype), mode="drop")
    return jax.vmap(jax.vmap(one))(cache_part, new, slot)


def _evict(cache: HeavyHitterCache, k, v, score, position, keep) -> HeavyHitterCache:
    """The cache after the rule: kept slots stay where they are, and the kept new keys (score, position over
    the slots then the T new keys; keep likewise) fill the slots of evicted or empty ones, in slot order."""
    n = cache.budget
    kept_old, kept_new = keep[..., :n], keep[..., n:]
    free_first = jnp.argsort(kept_old.astype(jnp.int32), axis=-1, stable=True)  # free slots, in slot order
    rank = jnp.clip(jnp.cumsum(kept_new, axis=-1) - 1, 0, n - 1)  # a kept new key takes the rank-th free slot
    slot = jnp.where(kept_new, jnp.take_along_axis(free_first, rank, axis=-1), n)
    return HeavyHitterCache(
        k=_write_slots(cache.k, k, slot), v=_write_slots(cache.v, v, slot),
        score=_write_slots(jnp.where(kept_old, score[..., :n], 0.0), score[..., n:], slot),
        position=_write_slots(jnp.where(kept_old, position[..., :n], -1), position[..., n:], slot),
        recent=cache.recent)


def extend(q, k, v, cache: HeavyHitterCache, positions, lengths, valid, *, scale: float):
    """Append T tokens (see the module docstring). q [B, H, T, D] and k, v [B, Hkv, T, D] after RoPE; positions
    [B, T]; lengths [B] before the append; valid [B, T] (False: right padding, neither attended nor cached).
    Returns (out [B, H, T, D], the updated cache)."""
    t = q.shape[2]
    causal = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    out, probs = _attention(q, k, v, cache, causal, scale)
    received = jnp.sum(probs * valid[:, None, None, :, None], axis=(2, 3))  # [B, Hkv, budget + T]
    score = jnp.concatenate([cache.score, jnp.zeros(k.shape[:3], jnp.float32)], axis=-1) + received
    new_position = jnp.broadcast_to(jnp.where(valid, positions, -1)[:, None], k.shape[:3]).astype(jnp.int32)
    position = jnp.concatenate([cache.position, new_position], axis=-1)
    length = lengths + jnp.sum(valid, axis=1, dtype=jnp.int32)
    keep = keep_mask(score, position, length[:, None], budget=cache.budget, recent=cache.recent)
    return out, _evict(cache, k, v, score, position, keep)


def tree(q, k, v, cache: HeavyHitterCache, mask, *, scale: float):
    """Tree nodes (mask [B, K, K]: ancestors) over the kept keys, read-only. Returns (out, pending KVCache)."""
    out, _ = _attention(q, k, v, cache, mask, scale)
    return out, KVCache(k.astype(cache.k.dtype), v.astype(cache.v.dtype))
