"""Tree attention: the Pallas kernel (interpret mode on CPU) against the plain-jnp reference."""

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import cache_block, choose_blocks_per_split
from pallas_kernels.tree_attention import (
    STREAMING_MAX_ROWS,
    cached_chain_attention,
    tree_attention,
    tree_attention_reference,
    tree_attention_streaming,
)


def ancestor_mask(parents):
    """[K, K] bool: mask[i, j] = node j is node i or one of its ancestors (parents[i] < i, -1 = root)."""
    k = len(parents)
    mask = np.eye(k, dtype=bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


def padded_shapes(jaxpr) -> list[tuple]:
    """Shapes of the arrays that `pad` ops take, in a jaxpr and every jaxpr nested in it."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pad":
            shapes.append(tuple(eqn.invars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes.extend(padded_shapes(sub))
    return shapes


def random_parents(rng, k):
    return np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, k)])


def make_inputs(rng, b, h, hkv, k, d, cache_len):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return dict(q=normal(b, h, k, d), k_tree=normal(b, hkv, k, d), v_tree=normal(b, hkv, k, d),
                k_cache=normal(b, hkv, cache_len, d), v_cache=normal(b, hkv, cache_len, d))


@functools.partial(jax.jit, static_argnames=("implementation", "block_sizes", "window"))
def run(x, lengths, tree_mask, implementation, block_sizes=(), window=0):
    return tree_attention(x["q"], x["k_cache"], x["v_cache"], lengths, x["k_tree"], x["v_tree"], tree_mask,
                          implementation=implementation, window=window, **dict(block_sizes))


CASES = [
    # (name, batch, heads, kv heads, tree, head dim, cache length, lengths, block sizes)
    ("decode_mha", 3, 2, 2, "decode", 8, 24, [0, 5, 24], {"block_k": 16, "num_splits": 2}),
    ("chain_gqa2", 3, 4, 2, "chain", 8, 40, [40, 0, 17], {"block_k": 16}),
    ("tree_gqa4_row_tiles", 2, 8, 2, "tree", 12, 33, [33, 9],
     {"block_k": 16, "block_rows": 16, "num_splits": 3}),
    ("per_row_trees_default_blocks", 2, 4, 1, "per_row", 16, 50, [1, 50], {}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(case):
    _, b, h, hkv, tree, d, cache_len, lengths, block_sizes = case
    rng = np.random.default_rng(len(case[0]))
    k = {"decode": 1, "chain": 4, "tree": 7, "per_row": 5}[tree]
    if tree == "per_row":
        tree_mask = np.stack([ancestor_mask(random_parents(rng, k)) for _ in range(b)])
    elif tree == "tree":
        tree_mask = ancestor_mask(random_parents(rng, k))
    else:
        tree_mask = ancestor_mask(np.arange(k) - 1)  # a chain; K = 1 is plain decoding
    x = make_inputs(rng, b, h, hkv, k, d, cache_len)
    lengths = jnp.asarray(lengths, jnp.int32)
    tree_mask = jnp.asarray(tree_mask)
    expected = run(x, lengths, tree_mask, "xla")
    got = run(x, lengths, tree_mask, "pallas", tuple(block_sizes.items()))
    assert got.shape == (b, h, k, d)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def windowed_attention_numpy(x, lengths, parents, window):
    """Attention of each node over the keys it sees, written out: cache entry c at position c, node i at
    length + depth(i); key position j visible to query position i iff i - window < j <= i."""
    q, kc, vc, kt, vt = (np.asarray(x[n], np.float64) for n in ("q", "k_cache", "v_cache", "k_tree", "v_tree"))
    b, h, k, d = q.shape
    group = h // kc.shape[1]
    out = np.zeros_like(q)
    for row in range(b):
        pars = parents[row]
        for i in range(k):
            chain = [i]
            while pars[chain[-1]] >= 0:
                chain.append(pars[chain[-1]])
            depth = {node: len(chain) - 1 - n for n, node in enumerate(chain)}
            pos = lengths[row] + depth[i]
            cols = [c for c in range(lengths[row]) if c > pos - window]
            nodes = [j for j in chain if lengths[row] + depth[j] > pos - window]
            for head in range(h):
                n = head // group
                keys = np.concatenate([kc[row, n, cols], kt[row, n, nodes]])
                values = np.concatenate([vc[row, n, cols], vt[row, n, nodes]])
                scores = keys @ q[row, head, i] / np.sqrt(d)
                p = np.exp(scores - scores.max())
                out[row, head, i] = p @ values / p.sum()
    return out


WINDOW_CASES = [
    # (name, batch, heads, kv heads, nodes, head dim, cache length, lengths, window, block sizes)
    ("decode_window_inside_cache", 3, 2, 1, 1, 8, 64, [0, 20, 64], 7, {"block_k": 16, "num_splits": 2}),
    ("tree_window_shorter_than_depth", 2, 4, 2, 9, 8, 48, [30, 3], 3, {"block_k": 16, "block_rows": 16}),
    ("chain_window_one", 2, 2, 2, 4, 8, 40, [17, 0], 1, {"block_k": 16}),
    ("window_longer_than_context", 2, 8, 2, 5, 16, 33, [33, 9], 100, {"block_k": 16, "num_splits": 3}),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_sliding_window_kernel_and_reference_match_attention_written_out(case):
    _, b, h, hkv, k, d, cache_len, lengths, window, block_sizes = case
    rng = np.random.default_rng(len(case[0]))
    parents = np.stack([random_parents(rng, k) for _ in range(b)])
    if case[0].startswith("chain"):
        parents[:] = np.arange(k) - 1
    x = make_inputs(rng, b, h, hkv, k, d, cache_len)
    tree_mask = jnp.asarray(np.stack([ancestor_mask(p) for p in parents]))
    want = windowed_attention_numpy(x, lengths, parents, window)
    lengths = jnp.asarray(lengths, jnp.int32)
    expected = run(x, lengths, tree_mask, "xla", window=window)
    np.testing.assert_allclose(expected, want, atol=1e-5, rtol=1e-5)
    got = run(x, lengths, tree_mask, "pallas", tuple(block_sizes.items()), window=window)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def testcache_blocks_before_the_window_are_never_read():
    """NaN in every whole block before the window of all of a row's nodes: the kernel skips them."""
    rng = np.random.default_rng(8)
    b, h, hkv, d, cache_len, block_k, window = 2, 4, 2, 8, 96, 16, 20
    parents = np.array([-1, 0, 0, 1])  # depths 0, 1, 1, 2
    x = make_inputs(rng, b, h, hkv, len(parents), d, cache_len)
    lengths = jnp.asarray([90, 37], jnp.int32)
    tree_mask = jnp.asarray(ancestor_mask(parents))
    expected = run(x, lengths, tree_mask, "xla", window=window)
    # The shallowest node (position = length) sees columns from length - window + 1 on.
    first_read = (np.array([90, 37]) - window + 1) // block_k * block_k
    positions = np.arange(cache_len)[None, None, :, None]
    poison = positions < first_read[:, None, None, None]
    assert poison.any(axis=(1, 2, 3)).all()
    x["k_cache"] = jnp.where(poison, jnp.nan, x["k_cache"])
    x["v_cache"] = jnp.where(poison, jnp.nan, x["v_cache"])
    got = run(x, lengths, tree_mask, "pallas", (("block_k", block_k), ("num_splits", 2)), window=window)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_chain_mask_is_lower_triangular_and_tree_masks_are_ancestor_closed():
    assert (ancestor_mask(np.arange(5) - 1) == np.tril(np.ones((5, 5), bool))).all()
    rng = np.random.default_rng(3)
    parents = random_parents(rng, 9)
    mask = ancestor_mask(parents)
    for i, parent in enumerate(parents):
        expected = np.eye(9, dtype=bool)[i] | (mask[parent] if parent >= 0 else False)
        assert (mask[i] == expected).all()


def testcache_blocks_past_length_are_never_read():
    """NaN in every whole block past a row's length: the kernel skips those blocks, so no NaN leaks."""
    rng = np.random.default_rng(7)
    b, h, hkv, k, d, cache_len, block_k = 2, 4, 2, 3, 8, 64, 16
    x = make_inputs(rng, b, h, hkv, k, d, cache_len)
    lengths = jnp.asarray([16, 40], jnp.int32)
    tree_mask = jnp.asarray(ancestor_mask(np.array([-1, 0, 0])))
    expected = run(x, lengths, tree_mask, "xla")
    first_unread = np.array([16, 48])  # lengths rounded up to block_k
    positions = np.arange(cache_len)[None, None, :, None]
    poison = positions >= first_unread[:, None, None, None]
    x["k_cache"] = jnp.where(poison, jnp.nan, x["k_cache"])
    x["v_cache"] = jnp.where(poison, jnp.nan, x["v_cache"])
    got = run(x, lengths, tree_mask, "pallas", (("block_k", block_k), ("num_splits", 2)))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_default_implementation_on_cpu_is_xla_streaming_for_few_rows_and_the_reference_beyond():
    rng = np.random.default_rng(1)
    x = make_inputs(rng, 1, 2, 1, 2, 8, 8)
    args = (x["q"], x["k_cache"], x["v_cache"], jnp.asarray([3]), x["k_tree"], x["v_tree"],
            jnp.asarray(ancestor_mask(np.array([-1, 0]))))
    np.testing.assert_array_equal(tree_attention(*args), tree_attention_streaming(*args))
    np.testing.assert_allclose(tree_attention(*args), tree_attention_reference(*args), atol=1e-6, rtol=1e-6)
    k = STREAMING_MAX_ROWS // 2 + 1  # 2 query heads per KV head: 2k rows, one more than streams
    x = make_inputs(rng, 1, 2, 1, k, 8, 8)
    args = (x["q"], x["k_cache"], x["v_cache"], jnp.asarray([3]), x["k_tree"], x["v_tree"],
            jnp.asarray(ancestor_mask(np.arange(k) - 1)))
    np.testing.assert_array_equal(tree_attention(*args), tree_attention_reference(*args))


STREAMING_CASES = [
    # (name, batch, heads, kv heads, parents, head dim, cache length, lengths, window)
    ("decode_gqa3", 2, 6, 2, [-1], 8, 24, [0, 24], 0),
    ("chain_mha", 3, 2, 2, [-1, 0, 1, 2], 8, 40, [40, 0, 17], 0),
    ("tree_window", 2, 4, 2, [-1, 0, 0, 1, 1, 2], 16, 48, [30, 3], 3),
    ("per_row_trees", 2, 4, 1, None, 8, 33, [1, 33], 0),
]


@pytest.mark.parametrize("case", STREAMING_CASES, ids=[c[0] for c in STREAMING_CASES])
def test_streaming_xla_path_matches_reference(case):
    _, b, h, hkv, parents, d, cache_len, lengths, window = case
    rng = np.random.default_rng(len(case[0]))
    if parents is None:
        tree_mask = jnp.asarray(np.stack([ancestor_mask(random_parents(rng, 5)) for _ in range(b)]))
        k = 5
    else:
        tree_mask, k = jnp.asarray(ancestor_mask(np.array(parents))), len(parents)
    x = make_inputs(rng, b, h, hkv, k, d, cache_len)
    args = (x["q"], x["k_cache"], x["v_cache"], jnp.asarray(lengths, jnp.int32), x["k_tree"], x["v_tree"], tree_mask)
    got = jax.jit(functools.partial(tree_attention_streaming, scale=0.3, window=window))(*args)
    expected = tree_attention_reference(*args, scale=0.3, window=window)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 3])
def test_cached_chain_attention_equals_tree_attention_before_the_write(window):
    """An extend written into the cache first, then attended there, is tree attention over the cache before the
    write with the nodes as a causal tree block (ragged lengths, GQA, a window shorter than the chain)."""
    rng = np.random.default_rng(5 + window)
    b, h, hkv, k, d, cache_len = 3, 6, 2, 4, 8, 24
    x = make_inputs(rng, b, h, hkv, k, d, cache_len)
    lengths = jnp.asarray([0, 9, 20], jnp.int32)
    chain = jnp.asarray(ancestor_mask(np.arange(k) - 1))
    expected = tree_attention_reference(x["q"], x["k_cache"], x["v_cache"], lengths, x["k_tree"], x["v_tree"], chain,
                                        scale=0.4, window=window)
    slots = lengths[:, None] + jnp.arange(k)
    rows = jnp.arange(b)[:, None]
    written = [c.at[rows, :, slots].set(t.swapaxes(1, 2)) for c, t in ((x["k_cache"], x["k_tree"]),
                                                                        (x["v_cache"], x["v_tree"]))]
    got = jax.jit(functools.partial(cached_chain_attention, scale=0.4, window=window))(x["q"], *written, slots)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="positions must be"):
        cached_chain_attention(x["q"], *written, slots[:, :2])


def test_cache_lengths_that_blocks_can_tile_are_not_padded():
    """block_k shrinks (down to 16) to divide the cache length and the splits tile its blocks exactly, so the
    kernel reads the cache in place; it still matches the reference."""
    assert [cache_block(n, 128) for n in (320, 256, 96, 48, 40)] == [64, 128, 32, 16, 16]
    assert [choose_blocks_per_split(n, s) for n, s in ((5, 2), (4, 3), (6, 4), (8, 8), (3, 1))] == [5, 2, 2, 1, 3]
    rng = np.random.default_rng(11)
    x = make_inputs(rng, 2, 4, 2, 3, 16, 96)  # head dim 16: a power of two >= 16 is not padded either
    lengths = jnp.asarray([96, 41], jnp.int32)
    tree_mask = jnp.asarray(ancestor_mask(np.array([-1, 0, 0])))
    blocks = (("block_k", 64), ("num_splits", 2))
    jaxpr = jax.make_jaxpr(lambda v: run(v, lengths, tree_mask, "pallas", blocks))(x)
    assert x["k_cache"].shape not in padded_shapes(jaxpr.jaxpr)
    got = run(x, lengths, tree_mask, "pallas", blocks)
    np.testing.assert_allclose(got, run(x, lengths, tree_mask, "xla"), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_value_errors():
    rng = np.random.default_rng(2)
    x = make_inputs(rng, 1, 3, 2, 2, 8, 8)
    mask = jnp.ones((2, 2), bool)
    args = (x["q"], x["k_cache"], x["v_cache"], jnp.asarray([3]), x["k_tree"], x["v_tree"], mask)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        tree_attention(*args)
    x = make_inputs(rng, 1, 2, 1, 2, 8, 8)
    args = (x["q"], x["k_cache"], x["v_cache"], jnp.asarray([3]), x["k_tree"], x["v_tree"], mask)
    with pytest.raises(ValueError, match="unknown implementation"):
        tree_attention(*args, implementation="triton")
    with pytest.raises(ValueError, match="unknown block-size keyword"):
        tree_attention(*args, implementation="pallas", block_q=16)
    with pytest.raises(ValueError, match="power-of-two"):
        tree_attention(*args, implementation="pallas", block_k=24)
    with pytest.raises(ValueError, match="tree_mask must be"):
        tree_attention(*args[:-1], jnp.ones((3, 3), bool))
    for window in (-1, 2.5, True):
        with pytest.raises(ValueError, match=f"window={window!r} must be a non-negative int"):
            tree_attention(*args, window=window)
