"""Shared-prefix (Hydragen) attention: the reference is tree attention over the concatenated cache
[prefix | row cache]; the "xla" path and the Pallas prefix kernel (interpret mode on CPU) match it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_tree_attention import ancestor_mask, random_parents  # the numpy tree helpers of the tree kernel's tests

from pallas_kernels._common import target_platform
from pallas_kernels.shared_prefix_attention import (
    BlockSizes,
    merge_partials,
    prefix_attention_partials,
    shared_prefix_attention,
    shared_prefix_attention_reference,
    suffix_attention_partials,
)
from pallas_kernels.tree_attention import tree_attention_reference

# What stands in the padding of the prefix (past prefix_len) and of each row cache (past its length): keys and
# values large enough that any leak into the result would show.
POISON = 50.0


def tree_masks(rng, tree, b, k):
    if tree == "per_row":
        return jnp.asarray(np.stack([ancestor_mask(random_parents(rng, k)) for _ in range(b)]))
    if tree == "tree":
        return jnp.asarray(ancestor_mask(np.array([-1, 0, 0, 1, 1, 2, 0][:k])))  # branches: not a chain
    return jnp.asarray(ancestor_mask(np.arange(k) - 1))  # a chain; K = 1 is plain decoding


def make_inputs(rng, b, h, hkv, k, d, prefix_size, prefix_len, cache_len, lengths, dtype=jnp.float32):
    """Random inputs whose prefix and row caches hold POISON past their valid lengths."""
    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    k_prefix, v_prefix = normal(hkv, prefix_size, d), normal(hkv, prefix_size, d)
    k_prefix[:, prefix_len:] = v_prefix[:, prefix_len:] = POISON
    k_cache, v_cache = normal(b, hkv, cache_len, d), normal(b, hkv, cache_len, d)
    for row, length in enumerate(lengths):
        k_cache[row, :, length:] = v_cache[row, :, length:] = POISON
    x = dict(q=normal(b, h, k, d), k_prefix=k_prefix, v_prefix=v_prefix, k_cache=k_cache, v_cache=v_cache,
             k_tree=normal(b, hkv, k, d), v_tree=normal(b, hkv, k, d))
    return {name: jnp.asarray(value, dtype) for name, value in x.items()}


def arguments(x, prefix_len, lengths, tree_mask):
    return (x["q"], x["k_prefix"], x["v_prefix"], prefix_len, x["k_cache"], x["v_cache"], lengths, x["k_tree"],
            x["v_tree"], tree_mask)


@functools.partial(jax.jit, static_argnames=("implementation", "block_sizes", "scale"))
def run(x, prefix_len, lengths, tree_mask, implementation, block_sizes=None, scale=None):
    return shared_prefix_attention(*arguments(x, prefix_len, lengths, tree_mask), implementation=implementation,
                                   block_sizes=block_sizes, scale=scale)


@functools.partial(jax.jit, static_argnames=("scale",))
def reference(x, prefix_len, lengths, tree_mask, scale=None):
    return shared_prefix_attention_reference(*arguments(x, prefix_len, lengths, tree_mask), scale=scale)


CASES = [
    # (name, batch, heads, kv heads, tree, nodes, head dim, prefix size P, prefix_len, cache length, lengths,
    #  block sizes)
    ("decode_mha_ragged_suffix", 3, 2, 2, "chain", 1, 8, 64, 64, 24, [0, 5, 24], BlockSizes(block_k=16, num_splits=2)),
    ("decode_gqa3_prefix_padding", 4, 6, 2, "chain", 1, 8, 40, 29, 16, [16, 0, 7, 1], BlockSizes(block_k=16)),
    ("chain_gqa3_short_prefix", 2, 6, 2, "chain", 4, 16, 64, 37, 16, [16, 3], BlockSizes(block_k=16, num_splits=2)),
    ("tree_gqa4_row_tiles_empty_suffix", 3, 8, 2, "tree", 5, 12, 50, 33, 20, [0, 0, 0],
     BlockSizes(block_k=16, block_rows=16, num_splits=3)),
    ("per_row_trees_default_blocks", 2, 4, 1, "per_row", 5, 16, 300, 300, 8, [8, 1], None),
    ("no_prefix", 2, 4, 2, "tree", 3, 8, 32, 0, 8, [8, 2], BlockSizes(block_k=16)),
]


def case_inputs(case, dtype=jnp.float32):
    name, b, h, hkv, tree, k, d, prefix_size, prefix_len, cache_len, lengths, block_sizes = case
    rng = np.random.default_rng(len(name))
    x = make_inputs(rng, b, h, hkv, k, d, prefix_size, prefix_len, cache_len, lengths, dtype)
    return x, jnp.int32(prefix_len), jnp.asarray(lengths, jnp.int32), tree_masks(rng, tree, b, k), block_sizes


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_is_tree_attention_over_the_explicit_concatenation(case):
    x, prefix_len, lengths, tree_mask, _ = case_inputs(case)
    b, hkv, cache_len, d = x["k_cache"].shape
    size = x["k_prefix"].shape[1]
    keys, values = np.zeros((2, b, hkv, size + cache_len, d), np.float32)
    for row, length in enumerate(np.asarray(lengths)):
        for cat, prefix, cache in ((keys, x["k_prefix"], x["k_cache"]), (values, x["v_prefix"], x["v_cache"])):
            cat[row, :, :prefix_len + length] = np.concatenate([prefix[:, :prefix_len], cache[row, :, :length]], 1)
    expected = jax.jit(tree_attention_reference)(x["q"], jnp.asarray(keys), jnp.asarray(values), prefix_len + lengths,
                                        x["k_tree"], x["v_tree"], tree_mask)
    np.testing.assert_array_equal(reference(x, prefix_len, lengths, tree_mask), expected)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_implementations_match_reference(case, implementation):
    x, prefix_len, lengths, tree_mask, block_sizes = case_inputs(case)
    got = run(x, prefix_len, lengths, tree_mask, implementation, block_sizes)
    assert got.shape == x["q"].shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference(x, prefix_len, lengths, tree_mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_explicit_scale_and_a_prefix_len_past_the_prefix(implementation):
    """scale multiplies the scores of both parts; a prefix_len above P is clipped to P."""
    x, _, lengths, tree_mask, block_sizes = case_inputs(CASES[0])  # prefix_len = P = 64
    got = run(x, jnp.int32(1000), lengths, tree_mask, implementation, block_sizes, scale=0.3)
    expected = reference(x, jnp.int32(64), lengths, tree_mask, scale=0.3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not np.allclose(expected, reference(x, jnp.int32(64), lengths, tree_mask), atol=1e-3)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_bfloat16_inputs_match_reference(implementation):
    x, prefix_len, lengths, tree_mask, block_sizes = case_inputs(CASES[2], jnp.bfloat16)
    got = run(x, prefix_len, lengths, tree_mask, implementation, block_sizes)
    assert got.dtype == jnp.bfloat16
    expected = reference(x, prefix_len, lengths, tree_mask)
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=2e-2, rtol=2e-2)


def softmax_parts_numpy(q, keys, values, visible):
    """float64 (out [K, D], lse [K]) of one head's queries q [K, D] over keys/values [N, D] where visible [K, N]."""
    scores = np.where(visible, q @ keys.T / np.sqrt(q.shape[-1]), -np.inf)
    peak = scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores - peak)
    total = probs.sum(axis=-1, keepdims=True)
    return probs @ values / total, (peak + np.log(total))[:, 0]


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("case", CASES[2:4], ids=[c[0] for c in CASES[2:4]])
def test_partials_and_their_merge_equal_one_softmax_over_the_concatenation(case, implementation):
    x, prefix_len, lengths, tree_mask, block_sizes = case_inputs(case)
    b, h, k, d = x["q"].shape
    group = h // x["k_prefix"].shape[0]
    n = {name: np.asarray(value, np.float64) for name, value in x.items()}
    size = int(prefix_len)
    mask = np.broadcast_to(np.asarray(tree_mask), (b, k, k))
    want = {name: np.zeros((b, h, k) + tail) for name, tail in
            (("out_p", (d,)), ("lse_p", ()), ("out_s", (d,)), ("lse_s", ()), ("out", (d,)))}
    for row in range(b):
        length = int(lengths[row])
        for head in range(h):
            kv, q = head // group, n["q"][row, head]
            prefix = (n["k_prefix"][kv, :size], n["v_prefix"][kv, :size])
            suffix = tuple(np.concatenate([n[f"{c}_cache"][row, kv, :length], n[f"{c}_tree"][row, kv]]) for c in "kv")
            suffix_visible = np.concatenate([np.ones((k, length), bool), mask[row]], axis=1)
            slot = (row, head)
            want["out_p"][slot], want["lse_p"][slot] = softmax_parts_numpy(q, *prefix, np.ones((k, size), bool))
            want["out_s"][slot], want["lse_s"][slot] = softmax_parts_numpy(q, *suffix, suffix_visible)
            everything = [np.concatenate([p, s]) for p, s in zip(prefix, suffix)]
            visible = np.concatenate([np.ones((k, size), bool), suffix_visible], axis=1)
            want["out"][slot] = softmax_parts_numpy(q, *everything, visible)[0]

    prefix_partials = jax.jit(functools.partial(prefix_attention_partials, implementation=implementation,
                                                block_sizes=block_sizes))
    out_p, lse_p = prefix_partials(x["q"], x["k_prefix"], x["v_prefix"], prefix_len)
    out_s, lse_s = jax.jit(suffix_attention_partials)(x["q"], x["k_cache"], x["v_cache"], lengths, x["k_tree"],
                                                      x["v_tree"], tree_mask)
    for name, got in (("out_p", out_p), ("lse_p", lse_p), ("out_s", out_s), ("lse_s", lse_s)):
        np.testing.assert_allclose(got, want[name], atol=1e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(merge_partials(out_p, lse_p, out_s, lse_s), want["out"], atol=1e-5, rtol=1e-5)


def test_merge_of_a_side_that_sees_nothing():
    rng = np.random.default_rng(4)
    out, lse = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32), jnp.asarray([0.5, -40.0, 90.0], jnp.float32)
    nothing, none_seen = jnp.zeros((3, 8)), jnp.full((3,), -jnp.inf)
    np.testing.assert_array_equal(merge_partials(out, lse, nothing, none_seen), out)
    np.testing.assert_array_equal(merge_partials(nothing, none_seen, out, lse), out)
    np.testing.assert_array_equal(merge_partials(nothing, none_seen, nothing, none_seen), nothing)
    x, _, _, _, _ = case_inputs(CASES[0])
    prefix_partials = jax.jit(functools.partial(prefix_attention_partials, implementation="pallas"))
    out_p, lse_p = prefix_partials(x["q"], x["k_prefix"], x["v_prefix"], 0)
    assert np.all(np.asarray(lse_p) == -np.inf) and not np.any(out_p)


def test_prefix_blocks_past_prefix_len_are_never_read():
    """NaN in every whole prefix block past prefix_len: the kernel skips those blocks, so no NaN leaks."""
    case = CASES[2]  # prefix_len 37 of 64, block_k 16: blocks from 48 on are never loaded
    x, prefix_len, lengths, tree_mask, block_sizes = case_inputs(case)
    expected = run(x, prefix_len, lengths, tree_mask, "xla")
    poison = (np.arange(x["k_prefix"].shape[1]) >= 48)[None, :, None]
    x["k_prefix"] = jnp.where(poison, jnp.nan, x["k_prefix"])
    x["v_prefix"] = jnp.where(poison, jnp.nan, x["v_prefix"])
    got = run(x, prefix_len, lengths, tree_mask, "pallas", block_sizes)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_prefix_is_read_once_for_all_batch_rows():
    """"xla": the prefix meets the stacked queries of all B rows in one product per KV head (no batch axis);
    "pallas": the grid is (KV head, row tile, split), with the B*G*K stacked rows tiled, no batch axis."""
    b, h, hkv, k, d, size = 8, 6, 2, 2, 16, 64
    q, prefix = jnp.zeros((b, h, k, d)), jnp.zeros((hkv, size, d))
    stacked = b * (h // hkv) * k  # 48

    def eqns(implementation, name, block_sizes=None):
        jaxpr = jax.make_jaxpr(lambda q, kp, vp: prefix_attention_partials(
            q, kp, vp, 5, implementation=implementation, block_sizes=block_sizes))(q, prefix, prefix)
        return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == name]

    operands = [[tuple(v.aval.shape) for v in eqn.invars] for eqn in eqns("xla", "dot_general")]
    assert operands == [[(hkv, stacked, d), (hkv, size, d)],  # scores: stacked queries @ prefix keys^T
                        [(hkv, stacked, size), (hkv, size, d)]]  # probabilities @ prefix values
    (call,) = eqns("pallas", "pallas_call", BlockSizes(block_k=16, block_rows=16, num_splits=2))
    assert tuple(call.params["grid_mapping"].grid) == (hkv, stacked // 16, 2)


def test_default_implementation_on_cpu_is_xla():
    x, prefix_len, lengths, tree_mask, _ = case_inputs(CASES[1])
    np.testing.assert_array_equal(run(x, prefix_len, lengths, tree_mask, None),
                                  run(x, prefix_len, lengths, tree_mask, "xla"))


def test_bad_arguments_raise_value_errors():
    x, prefix_len, lengths, tree_mask, _ = case_inputs(CASES[1])  # B=4, H=6, Hkv=2, K=1, D=8, P=40, L=16
    good = dict(zip(["q", "k_prefix", "v_prefix", "prefix_len", "k_cache", "v_cache", "lengths", "k_tree", "v_tree",
                     "tree_mask"], arguments(x, prefix_len, lengths, tree_mask)))

    def call(**changes):
        return shared_prefix_attention(**{**good, **changes})

    bad = [
        (dict(q=x["q"][0]), r"q must be \[B, H, K, D\], got shape \(6, 1, 8\)"),
        (dict(k_prefix=x["k_cache"], v_prefix=x["v_cache"]), r"k_prefix/v_prefix must both be \[Hkv, P, D=8\]"),
        (dict(v_prefix=x["v_prefix"][:, :20]), r"got \(2, 40, 8\) and \(2, 20, 8\)"),
        (dict(k_prefix=x["k_prefix"][:1].repeat(4, 0), v_prefix=x["v_prefix"][:1].repeat(4, 0)),
         "query heads 6 .* not a multiple of kv heads 4"),
        (dict(prefix_len=jnp.asarray([3])), r"prefix_len must be an int32 scalar \(rank 0\), got shape \(1,\)"),
        (dict(prefix_len=jnp.float32(3)), "prefix_len must be an int32 scalar .* dtype float32"),
        (dict(prefix_len=True), "prefix_len must be an integer scalar"),
        (dict(k_cache=x["k_cache"][:, :1], v_cache=x["v_cache"][:, :1]), r"k_cache/v_cache must both be \[B=4, Hkv=2"),
        (dict(lengths=lengths[:2]), r"lengths must be \[B=4\], got \(2,\)"),
        (dict(k_tree=x["k_tree"][:, :, :, :4]), r"k_tree/v_tree must both be \[4, 2, 1, 8\]"),
        (dict(tree_mask=jnp.ones((2, 2), bool)), r"tree_mask must be \[1, 1\] or \[4, 1, 1\], got \(2, 2\)"),
        (dict(implementation="triton"), "unknown implementation"),
        (dict(implementation="pallas", block_sizes={"block_k": 16}), "block_sizes must be a BlockSizes"),
        (dict(implementation="pallas", block_sizes=BlockSizes(block_k=24)), "block_k=24 must be a positive power"),
        (dict(implementation="pallas", block_sizes=BlockSizes(num_splits=0)), "num_splits=0 must be a positive"),
    ]
    for changes, message in bad:
        with pytest.raises(ValueError, match=message):
            call(**changes)
    with pytest.raises(ValueError, match="k_prefix/v_prefix must both be"):
        shared_prefix_attention_reference(**{**good, "k_prefix": x["k_cache"], "v_prefix": x["v_cache"]})
    suffix = [good[name] for name in ("q", "k_cache", "v_cache", "lengths", "k_tree", "v_tree", "tree_mask")]
    with pytest.raises(ValueError, match=r"q and k_cache must be .* got \(6, 1, 8\)"):
        suffix_attention_partials(x["q"][0], *suffix[1:])
    wide = x["k_cache"].repeat(2, axis=1)  # 4 KV heads for 6 query heads
    with pytest.raises(ValueError, match="query heads 6 .* not a multiple of kv heads 4"):
        suffix_attention_partials(suffix[0], wide, wide, *suffix[3:])
    with pytest.raises(TypeError, match="window"):  # sliding windows are out of scope: no such argument
        call(window=4)


def test_prefix_kernel_lowers_for_triton():
    """Ahead-of-time lowering through Pallas-Triton for CUDA on this host (no GPU needed; nothing runs)."""
    pytest.importorskip("jax._src.pallas.triton.lowering", reason="jaxlib without Triton lowering bindings")
    b, h, hkv, k, d, size = 8, 9, 3, 1, 64, 2048
    bf16 = jax.ShapeDtypeStruct
    args = (bf16((b, h, k, d), jnp.bfloat16), bf16((hkv, size, d), jnp.bfloat16), bf16((hkv, size, d), jnp.bfloat16),
            bf16((), jnp.int32))
    fn = functools.partial(prefix_attention_partials, implementation="pallas")
    with target_platform("gpu"):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
