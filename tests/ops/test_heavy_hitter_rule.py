"""The H2O eviction rule (jaxspec.ops.heavy_hitter) on hand-built patterns whose kept set is known exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.errors import InputError
from jaxspec.ops import heavy_hitter
from jaxspec.state import HeavyHitterCache


def kept_positions(scores, positions, length, budget, recent) -> set[int]:
    keep = heavy_hitter.keep_mask(jnp.asarray(scores, jnp.float32), jnp.asarray(positions, jnp.int32),
                                  jnp.asarray(length), budget=budget, recent=recent)
    return {int(p) for p, k in zip(positions, np.asarray(keep)) if k}


@pytest.mark.parametrize("scores, budget, recent, expected", [
    # the 2 latest, then the 2 best of the rest: positions 0 (5.0) and 5 (4.0)
    ([5.0, 0.1, 3.0, 0.2, 0.3, 4.0, 0.0, 0.0], 4, 2, {0, 5, 6, 7}),
    # the first key (attention sink) has no reserved place: it goes when it loses on score
    ([0.1, 2.0, 3.0, 0.2, 0.3, 4.0, 0.0, 0.0], 4, 2, {2, 5, 6, 7}),
    # equal scores: the later position wins
    ([1.0] * 8, 4, 2, {4, 5, 6, 7}),
    ([2.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 9.0], 3, 1, {0, 4, 7}),
    # recent = 0: scores alone; recent = budget: a sliding window
    ([5.0, 0.1, 3.0, 0.2, 0.3, 4.0, 0.0, 9.0], 3, 0, {0, 5, 7}),
    ([5.0, 0.1, 3.0, 0.2, 0.3, 4.0, 0.0, 9.0], 3, 3, {5, 6, 7}),
    # a budget that holds every key keeps them all
    ([5.0, 0.1, 3.0, 0.2, 0.3, 4.0, 0.0, 9.0], 8, 1, set(range(8))),
])
def test_keeps_the_recent_window_and_the_heaviest(scores, budget, recent, expected):
    assert kept_positions(scores, list(range(8)), 8, budget, recent) == expected


def test_slots_in_any_order_and_empty_slots():
    # A physical cache: slots hold positions in no order, -1 marks an empty slot (never kept, never counted).
    positions = [7, -1, 3, 0, 5, 6, -1, 2]
    scores = [0.0, 99.0, 2.0, 4.0, 1.0, 3.0, 99.0, 2.0]
    assert kept_positions(scores, positions, 8, 3, 1) == {7, 0, 6}
    # ties at 2.0 between positions 3 and 2: the later one
    assert kept_positions(scores, positions, 8, 4, 1) == {7, 0, 6, 3}
    assert kept_positions(scores, positions, 8, 6, 2) == {7, 6, 0, 3, 2, 5}
    assert kept_positions(scores, positions, 8, 10, 2) == {7, 3, 0, 5, 6, 2}


def test_rows_and_heads_are_independent():
    scores = jnp.asarray([[[3.0, 1.0, 2.0, 0.0, 0.0], [1.0, 3.0, 2.0, 0.0, 0.0]],
                          [[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]])  # [B=2, Hkv=2, S=5]
    positions = jnp.asarray([[list(range(5))] * 2, [[0, 1, 2, -1, -1]] * 2])
    keep = heavy_hitter.keep_mask(scores, positions, jnp.asarray([[5], [3]]), budget=2, recent=1)
    np.testing.assert_array_equal(np.asarray(keep), [[[1, 0, 0, 0, 1], [0, 1, 0, 0, 1]],
                                                     [[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]]])


def test_extend_keeps_the_key_every_query_attends_to():
    """One head, keys 0 except key 2, which every query from position 2 on attends to (its score ~ 1 each).
    Budget 3, recent 1: after a 6-token prefill, key 2 (~4), key 0 (1 + 1/2 from queries 0 and 1) and the
    latest key 5 stay; a decode step then evicts 5 (no longer recent, scored ~0) for the new key 6."""
    d, t = 2, 6
    keys = np.zeros((t + 1, d), np.float32)
    keys[2] = [10.0, 0.0]
    values = np.arange((t + 1) * d, dtype=np.float32).reshape(t + 1, d)
    query = np.tile(np.float32([1.0, 0.0]), (t + 1, 1))
    as_heads = lambda x: jnp.asarray(x)[None, None]  # [1, 1, T, D]
    cache = HeavyHitterCache(k=jnp.zeros((1, 1, 3, d)), v=jnp.zeros((1, 1, 3, d)), score=jnp.zeros((1, 1, 3)),
                             position=jnp.full((1, 1, 3), -1, jnp.int32), recent=1)
    extend = jax.jit(heavy_hitter.extend, static_argnames="scale")  # one compile, not one per op
    _, cache = extend(as_heads(query[:t]), as_heads(keys[:t]), as_heads(values[:t]), cache,
                                   jnp.arange(t)[None], jnp.zeros((1,), jnp.int32), jnp.ones((1, t), bool), scale=1.0)
    np.testing.assert_array_equal(np.asarray(cache.position)[0, 0], [0, 2, 5])
    np.testing.assert_allclose(np.asarray(cache.score)[0, 0], [1.5, 4.0, 0.0], atol=2e-3)
    np.testing.assert_array_equal(np.asarray(cache.v)[0, 0], values[[0, 2, 5]])
    _, cache = extend(as_heads(query[t:]), as_heads(keys[t:]), as_heads(values[t:]), cache,
                                   jnp.asarray([[t]]), jnp.asarray([t]), jnp.ones((1, 1), bool), scale=1.0)
    np.testing.assert_array_equal(np.asarray(cache.position)[0, 0], [0, 2, 6])  # 6 took the evicted slot
    np.testing.assert_array_equal(np.asarray(cache.k)[0, 0], keys[[0, 2, 6]])


@pytest.mark.parametrize("kv_budget", [(0, 0), (4, 5), (4, -1), (4,), [8, 2], (8.0, 2), (True, 0)])
def test_bad_budgets_name_the_value(kv_budget):
    with pytest.raises(InputError, match="kv_budget="):
        heavy_hitter.check_kv_budget(kv_budget)
