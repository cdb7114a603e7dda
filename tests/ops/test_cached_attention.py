"""The CPU cached attention against its jnp references. The chain form: GQA groups, 1..5 chain nodes, head dims
that are not multiples of the 8-lane vector, sliding windows, positions before the cache or past it (every column
masked: the reference's uniform softmax). The tree form: random trees per batch row, lengths from 0 to the whole
cache, windows. Both inside jit, under grad and vmap; a row's result does not depend on the other rows of the
call; a scanned layer stack's caches read at a traced layer index; the fallback when the kernel cannot be built;
and a decoder's extend and tree forward through the kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.errors import InputError
from jaxspec.ops import cached_attention as kernel_lib
from jaxspec.ops.cached_attention import cached_chain_attention, cached_chain_attention_reference, cached_tree_attention
from pallas_kernels.tree_attention import tree_attention_reference

pytestmark = pytest.mark.skipif(not kernel_lib.available(), reason="the CPU kernel needs x86-64 with AVX2/FMA and "
                                "a C++ compiler")


def operands(batch, heads, kv_heads, nodes, cache_len, dim, seed=0, low=0, high=None):
    kq, kk, kv, kp = jax.random.split(jax.random.key(seed), 4)
    high = cache_len if high is None else high
    return (jax.random.normal(kq, (batch, heads, nodes, dim), jnp.float32),
            jax.random.normal(kk, (batch, kv_heads, cache_len, dim), jnp.float32),
            jax.random.normal(kv, (batch, kv_heads, cache_len, dim), jnp.float32),
            jax.random.randint(kp, (batch, nodes), low, high, jnp.int32))


def reference(q, k, v, positions, window=0, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return cached_chain_attention_reference(q, k, v, positions, scale=scale, window=window)


@pytest.mark.parametrize("batch,heads,kv_heads,nodes,cache_len,dim", [
    (1, 9, 3, 1, 384, 64),  # SmolLM2's decode step
    (2, 4, 2, 3, 50, 37),   # a head dim with a tail past the vector
    (2, 4, 1, 5, 64, 256),  # Gemma 3's head dim, one KV head for four query heads
    (3, 2, 2, 2, 16, 8),
])
@pytest.mark.parametrize("window", [0, 7])
def test_equals_the_reference(batch, heads, kv_heads, nodes, cache_len, dim, window):
    q, k, v, positions = operands(batch, heads, kv_heads, nodes, cache_len, dim, seed=nodes + window)
    got = jax.jit(lambda *a: cached_chain_attention(*a, window=window))(q, k, v, positions)
    np.testing.assert_allclose(got, reference(q, k, v, positions, window), rtol=1e-5, atol=1e-5)


def test_positions_outside_the_cache_match_the_reference():
    # Past the cache: every column is visible (up to the window); before it, or a window wholly past it: no
    # column is, and the reference's masked softmax weighs all columns equally.
    q, k, v, _ = operands(2, 4, 2, 4, 24, 16, seed=3)
    positions = jnp.array([[-1, 30, 23, 0], [-5, 40, 100, 12]], jnp.int32)
    for window in (0, 5):
        got = cached_chain_attention(q, k, v, positions, window=window)
        np.testing.assert_allclose(got, reference(q, k, v, positions, window), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1, :, 2], jnp.broadcast_to(v[1].mean(axis=1).repeat(2, 0), (4, 16)), rtol=1e-5,
                               atol=1e-5)


def ancestor_mask(parents):
    """[K, K] bool: node j is node i or one of its ancestors."""
    mask = np.zeros((len(parents), len(parents)), bool)
    for i in range(len(parents)):
        j = i
        while j >= 0:
            mask[i, j], j = True, parents[j]
    return mask


def tree_operands(batch, heads, kv_heads, cache_len, dim, parents_per_row, seed):
    nodes = len(parents_per_row[0])
    kq, kk, kv, kkt, kvt, kl = jax.random.split(jax.random.key(seed), 6)
    lengths = jax.random.randint(kl, (batch,), 0, cache_len + 1).at[0].set(cache_len)
    cache, tree = (batch, kv_heads, cache_len, dim), (batch, kv_heads, nodes, dim)
    return (jax.random.normal(kq, (batch, heads, nodes, dim)), jax.random.normal(kk, cache),
            jax.random.normal(kv, cache), lengths, jax.random.normal(kkt, tree), jax.random.normal(kvt, tree),
            jnp.asarray(np.stack([ancestor_mask(p) for p in parents_per_row])))


TREES = ([-1, 0, 0, 1, 1, 2, 3, 5], [-1, 0, 1, 2, 3, 4, 5, 6], [-1, 0, 0, 0, 1, 2, 3, 3])


@pytest.mark.parametrize("batch,heads,kv_heads,cache_len,dim", [(3, 9, 3, 64, 64), (2, 4, 2, 50, 37),
                                                                 (1, 4, 1, 16, 256)])
@pytest.mark.parametrize("window", [0, 3])
def test_tree_form_equals_the_reference(batch, heads, kv_heads, cache_len, dim, window):
    args = tree_operands(batch, heads, kv_heads, cache_len, dim, TREES[:batch], seed=dim + window)
    got = jax.jit(lambda *a: cached_tree_attention(*a, window=window))(*args)
    np.testing.assert_allclose(got, tree_attention_reference(*args, window=window), rtol=1e-5, atol=1e-5)


def test_tree_forms_rows_are_independent_and_its_gradients_follow_the_reference():
    q, k, v, lengths, kt, vt, mask = tree_operands(2, 4, 2, 24, 8, TREES[:2], seed=12)
    together = np.asarray(cached_tree_attention(q, k, v, lengths, kt, vt, mask))
    for b in range(2):
        alone = cached_tree_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], lengths[b:b + 1], kt[b:b + 1],
                                      vt[b:b + 1], mask[b:b + 1])
        np.testing.assert_array_equal(together[b], np.asarray(alone)[0])
    loss = lambda f: lambda q, k, v, kt, vt: jnp.sum(f(q, k, v, lengths, kt, vt, mask, window=5) ** 2)
    got = jax.grad(loss(cached_tree_attention), argnums=range(5))(q, k, v, kt, vt)
    want = jax.grad(loss(tree_attention_reference), argnums=range(5))(q, k, v, kt, vt)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_both_forms_read_a_layer_of_a_cache_stack_in_place():
    # Caches [G, B, Hkv, L, D] of a scanned layer stack, the layer a traced index (as inside a scan over layers):
    # bit for bit the result on that layer's caches alone, for the chain and the tree form, with gradients.
    q, k, v, positions = operands(2, 4, 2, 3, 24, 16, seed=13)
    stack_k = jnp.stack([k * (g + 1) for g in range(3)])
    stack_v = jnp.stack([v - g for g in range(3)])
    chain = jax.jit(lambda i: cached_chain_attention(q, stack_k, stack_v, positions, window=5, index=i))
    tq, _, _, lengths, kt, vt, mask = tree_operands(2, 4, 2, 24, 16, TREES[:2], seed=14)
    tree = jax.jit(lambda i: cached_tree_attention(tq, stack_k, stack_v, lengths, kt, vt, mask, index=i))
    for g in range(3):
        np.testing.assert_array_equal(chain(jnp.int32(g)), cached_chain_attention(q, stack_k[g], stack_v[g],
                                                                                  positions, window=5))
        np.testing.assert_array_equal(tree(jnp.int32(g)), cached_tree_attention(tq, stack_k[g], stack_v[g], lengths,
                                                                                kt, vt, mask))
    loss = lambda sk: jnp.sum(cached_chain_attention(q, sk, stack_v, positions, index=jnp.int32(1)) ** 2)
    grad = jax.grad(loss)(stack_k)
    want = jax.grad(lambda k1: jnp.sum(reference(q, k1, stack_v[1], positions) ** 2))(stack_k[1])
    np.testing.assert_allclose(grad[1], want, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(grad[0])) and not np.any(np.asarray(grad[2]))


def test_a_cache_stack_needs_a_scalar_index_in_range():
    q, k, v, positions = operands(1, 4, 2, 2, 16, 8, seed=15)
    stack_k, stack_v = k[None].repeat(2, 0), v[None].repeat(2, 0)
    with pytest.raises(InputError, match="need an index into their stack"):
        cached_chain_attention(q, stack_k, stack_v, positions)
    with pytest.raises(InputError, match="need no index"):
        cached_chain_attention(q, k, v, positions, index=0)
    with pytest.raises(InputError, match="must be a scalar"):
        cached_chain_attention(q, stack_k, stack_v, positions, index=jnp.zeros((2,), jnp.int32))
    with pytest.raises(Exception, match="stack index out of range"):
        jax.block_until_ready(cached_chain_attention(q, stack_k, stack_v, positions, index=jnp.int32(2)))


# 40: scores spread over hundreds, so most weights underflow (the kernel's exp flushes below e^-87, as XLA's does).
# A score near 600 holds ~6e-5 of float32 rounding, which its weight inherits whatever the order of summation:
# hence the wider tolerance there.
@pytest.mark.parametrize("scale,tolerance", [(0.7, 1e-5), (40.0, 1e-3)])
def test_a_configured_scale_is_used(scale, tolerance):
    q, k, v, positions = operands(1, 4, 2, 2, 32, 16, seed=4)
    got = cached_chain_attention(q, k, v, positions, scale=scale)
    np.testing.assert_allclose(got, reference(q, k, v, positions, scale=scale), rtol=tolerance, atol=tolerance)


def test_a_rows_result_does_not_depend_on_the_other_rows():
    q, k, v, positions = operands(2, 6, 3, 4, 40, 24, seed=5)
    together = np.asarray(jax.jit(cached_chain_attention)(q, k, v, positions))
    for b in range(2):
        for i in range(4):
            alone = cached_chain_attention(q[b:b + 1, :, i:i + 1], k[b:b + 1], v[b:b + 1], positions[b:b + 1, i:i + 1])
            np.testing.assert_array_equal(together[b, :, i], np.asarray(alone)[0, :, 0])


def test_gradients_and_vmap_follow_the_reference():
    q, k, v, positions = operands(1, 4, 2, 3, 20, 8, seed=6)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, positions, window=6) ** 2)
    want = jax.grad(loss(lambda *a, **kw: reference(*a, **kw)), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(cached_chain_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    qs, ks, vs, ps = operands(3, 4, 2, 3, 20, 8, seed=7)
    got = jax.jit(jax.vmap(lambda *a: cached_chain_attention(*(x[None] for x in a))[0]))(qs, ks, vs, ps)
    np.testing.assert_allclose(got, reference(qs, ks, vs, ps), rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_the_reference():
    q, k, v, positions = operands(1, 4, 2, 1, 16, 8, seed=8)
    assert kernel_lib.uses_kernel(q, k, v)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    assert not kernel_lib.uses_kernel(q16, k16, v16)
    got = cached_chain_attention(q16, k16, v16, positions)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, reference(q16, k16, v16, positions))


@pytest.mark.parametrize("shapes,match", [
    (((1, 4, 2, 8), (1, 3, 16, 8), (1, 3, 16, 8), (1, 2)), "not a multiple of kv heads 3"),
    (((1, 4, 2, 8), (1, 2, 16, 8), (1, 2, 12, 8), (1, 2)), r"caches must be .* alike"),
    (((1, 4, 2, 8), (1, 2, 16, 6), (1, 2, 16, 6), (1, 2)), r"D=8"),
    (((1, 4, 2, 8), (1, 2, 16, 8), (1, 2, 16, 8), (1, 3)), r"positions must be \[B=1, K=2\]"),
])
def test_bad_shapes_are_named(shapes, match):
    q, k, v, positions = (jnp.zeros(s, jnp.int32 if i == 3 else jnp.float32) for i, s in enumerate(shapes))
    with pytest.raises(InputError, match=match):
        cached_chain_attention(q, k, v, positions)


def test_a_failed_build_is_logged_and_leaves_xla_attention(failed_build):
    with failed_build(kernel_lib):
        q, k, v, positions = operands(1, 4, 2, 2, 16, 8, seed=9)
        assert not kernel_lib.uses_kernel(q, k, v)
        np.testing.assert_array_equal(cached_chain_attention(q, k, v, positions), reference(q, k, v, positions))


def test_a_decoders_extend_through_the_kernel_equals_xlas(monkeypatch):
    """Prefill, a 3-token extend, a 1-token step and a 4-node tree forward of a tiny GQA decoder with a
    sliding-window layer: the same logits and caches with the kernel as with XLA's attention, in both layouts."""
    from configs import lm
    from jaxspec.models.decode_layout import for_decoding
    from jaxspec.models.lm import build_model, init_params
    from jaxspec.state import init_decode_state

    cfg = lm.get_config("tiny").model
    cfg.update(dict(n_layers=2, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2, vocab_size=40, max_len=32,
                    layer_windows=(4, 0)))
    tokens = jax.random.randint(jax.random.key(10), (2, 10), 0, 40)

    def run(layout):
        model = build_model(cfg)
        params = init_params(model, jax.random.key(11))
        if layout == "decode":
            model, params = for_decoding(model, params)
        state = init_decode_state(cfg, 2, 32)
        outputs = []
        for lo, hi in ((0, 6), (6, 9), (9, 10)):
            logits, state = model.apply({"params": params}, tokens[:, lo:hi], state=state)
            outputs.append(logits)
        tree = model.apply({"params": params}, tokens[:, :4], state=state, parents=jnp.array([-1, 0, 0, 1]))
        return outputs, state, tree

    for layout in ("standard", "decode"):
        monkeypatch.undo()
        with_kernel = run(layout)
        monkeypatch.setattr(kernel_lib, "available", lambda: False)
        without = run(layout)
        for a, b in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
