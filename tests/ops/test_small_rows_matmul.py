"""The CPU small-rows product against its jnp reference: float32 and int8 weights, 1..16 rows, feature counts
that are not multiples of the 8-lane vector, odd output counts, inside jit, under grad and vmap; and the
rows' independence (a row's result does not depend on the other rows of the call); a stack of matrices read at
a traced index (as a scan over layers reads its layer's weights); calls from several threads at once; the
thread-count setting."""

from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.errors import InputError
from jaxspec.models.layers import quantize_int8
from jaxspec.ops import small_rows_matmul as kernel_lib
from jaxspec.ops.small_rows_matmul import available, small_rows_matmul, small_rows_matmul_reference

pytestmark = pytest.mark.skipif(not available(), reason="the CPU kernel needs x86-64 with AVX2/FMA and a C++ "
                                "compiler")


def operands(rows, d_in, d_out, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, (rows, d_in), jnp.float32),
            jax.random.normal(kw, (d_out, d_in), jnp.float32) / d_in**0.5)


# (1543, 70): 8 or more rows of 1543 features exceed the kernel's L1 share, so the features are cut into tiles;
# 20 rows take two passes of at most 16.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16, 20])
@pytest.mark.parametrize("d_in,d_out", [(64, 96), (37, 11), (8, 1), (200, 513), (1543, 70)])
def test_float32_equals_the_reference(rows, d_in, d_out):
    x, w = operands(rows, d_in, d_out)
    got = jax.jit(small_rows_matmul)(x, w)
    np.testing.assert_allclose(got, small_rows_matmul_reference(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 7, 16])
def test_int8_with_scale_equals_the_reference(rows):
    x, w = operands(rows, 72, 130, seed=1)
    q, scale = quantize_int8(w)
    got = jax.jit(small_rows_matmul)(x, q, scale)
    np.testing.assert_allclose(got, small_rows_matmul_reference(x, q, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_in", [96, 1000])  # 16 rows of 1000 features are summed in feature tiles, one is not
def test_a_row_does_not_depend_on_the_rows_beside_it(d_in):
    x, w = operands(16, d_in, 300, seed=2)
    together = np.asarray(jax.jit(small_rows_matmul)(x, w))
    for r in (0, 5, 15):
        alone = np.asarray(jax.jit(small_rows_matmul)(x[r:r + 1], w))
        np.testing.assert_array_equal(together[r], alone[0])  # bit for bit


def test_gradients_equal_the_reference():
    x, w = operands(3, 40, 24, seed=3)
    scale = jnp.linspace(0.5, 1.5, 24)

    def loss(fn):
        return lambda x, w, s: jnp.sum(jnp.sin(fn(x, w, s)))

    got = jax.grad(loss(small_rows_matmul), argnums=(0, 1, 2))(x, w, scale)
    want = jax.grad(loss(small_rows_matmul_reference), argnums=(0, 1, 2))(x, w, scale)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    gx = jax.grad(lambda x: jnp.sum(small_rows_matmul(x, w) ** 2))(x)  # unscaled
    np.testing.assert_allclose(gx, jax.grad(lambda x: jnp.sum(small_rows_matmul_reference(x, w) ** 2))(x),
                               rtol=1e-5, atol=1e-5)
    q, s = quantize_int8(w)  # int8 weights: gradients for the input and the scale only
    gx = jax.grad(lambda x: jnp.sum(small_rows_matmul(x, q, s) ** 2))(x)
    np.testing.assert_allclose(gx, jax.grad(lambda x: jnp.sum(small_rows_matmul_reference(x, q, s) ** 2))(x),
                               rtol=1e-5, atol=1e-5)


def test_vmap_over_a_batch_of_inputs():
    x, w = operands(4, 24, 40, seed=4)
    xs = jnp.stack([x, 2 * x, -x])
    got = jax.jit(jax.vmap(lambda x: small_rows_matmul(x, w)))(xs)
    np.testing.assert_allclose(got, jnp.einsum("bri,oi->bro", xs, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_a_stack_read_at_a_traced_index_equals_the_product_with_that_matrix(rows):
    x, _ = operands(rows, 40, 1, seed=8)
    stack = jax.random.normal(jax.random.key(9), (3, 52, 40), jnp.float32)

    def scanned(x, stack):  # the index is the scan's counter, as in a scan over layers
        return jax.lax.scan(lambda c, g: (c, small_rows_matmul(x, stack, None, g)), None, jnp.arange(3))[1]

    got = jax.jit(scanned)(x, stack)
    for g in range(3):
        np.testing.assert_array_equal(got[g], jax.jit(small_rows_matmul)(x, stack[g]))  # bit for bit
        np.testing.assert_allclose(got[g], small_rows_matmul_reference(x, stack, None, g), rtol=1e-5, atol=1e-5)


def test_an_int8_stack_with_its_layer_scale_equals_the_reference():
    x, _ = operands(4, 72, 1, seed=10)
    q, scale = quantize_int8(jax.random.normal(jax.random.key(11), (2 * 130, 72)))
    stack = q.reshape(2, 130, 72)
    got = jax.jit(small_rows_matmul)(x, stack, scale[130:], jnp.int32(1))
    np.testing.assert_allclose(got, small_rows_matmul_reference(x, q[130:], scale[130:]), rtol=1e-5, atol=1e-5)


def test_gradients_through_a_stack_equal_the_reference():
    x, _ = operands(3, 16, 1, seed=12)
    stack = jax.random.normal(jax.random.key(13), (2, 24, 16))
    scale = jnp.linspace(0.5, 1.5, 24)

    def loss(fn):
        return lambda x, w, s: jnp.sum(jnp.sin(fn(x, w, s, jnp.int32(1))))

    got = jax.grad(loss(small_rows_matmul), argnums=(0, 1, 2))(x, stack, scale)
    want = jax.grad(loss(small_rows_matmul_reference), argnums=(0, 1, 2))(x, stack, scale)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    assert not np.any(got[1][0])  # the other matrix of the stack gets no gradient


def test_an_index_outside_the_stack_fails_instead_of_reading_past_it():
    x, _ = operands(2, 16, 1)
    stack = jnp.ones((2, 8, 16))
    product = jax.jit(small_rows_matmul)
    for index in (2, -1):
        with pytest.raises(Exception, match="stack index out of range"):
            jax.block_until_ready(product(x, stack, None, jnp.int32(index)))


def test_a_stack_needs_a_scalar_index_and_an_index_needs_a_stack():
    with pytest.raises(InputError, match=r"index must be a scalar, got shape \(2,\)"):
        small_rows_matmul(jnp.ones((2, 8)), jnp.ones((3, 4, 8)), None, jnp.zeros(2, jnp.int32))
    with pytest.raises(InputError, match=r"\[G, out, in\] \(with an index\)"):
        small_rows_matmul(jnp.ones((2, 8)), jnp.ones((4, 8)), None, 0)
    with pytest.raises(InputError, match=r"expected x \[rows, in\] and kernel_t \[out, in\]"):
        small_rows_matmul(jnp.ones((2, 8)), jnp.ones((3, 4, 8)))


@pytest.mark.parametrize("x_shape,w_shape,dtype,match", [
    ((2, 8), (4, 9), jnp.float32, r"\(2, 8\) and \(4, 9\)"),
    ((2, 3, 8), (4, 8), jnp.float32, r"x \[rows, in\]"),
    ((2, 8), (4, 8), jnp.float16, "float32 or int8"),
])
def test_bad_operands_name_the_shape(x_shape, w_shape, dtype, match):
    with pytest.raises(InputError, match=match):
        small_rows_matmul(jnp.ones(x_shape), jnp.ones(w_shape, dtype))


def test_a_scale_of_the_wrong_length_is_named():
    with pytest.raises(InputError, match=r"scale has shape \(3,\), expected \(4,\)"):
        small_rows_matmul(jnp.ones((2, 8)), jnp.ones((4, 8), jnp.int8), jnp.ones(3))


def test_a_failed_build_is_logged_and_leaves_xla_products(failed_build):
    from jaxspec.models import layers

    with failed_build(kernel_lib):
        x, w = operands(4, 24, 40, seed=5)
        q, scale = quantize_int8(w)  # matmul_t then takes XLA's multiply-and-sum
        fresh = jax.jit(lambda x, q, s: layers.matmul_t(x, q, s))  # traced now, without the kernel
        np.testing.assert_allclose(fresh(x, q, scale), small_rows_matmul_reference(x, q, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_a_bad_thread_count_is_named(monkeypatch, value):
    monkeypatch.setenv("JAXSPEC_CPU_KERNEL_THREADS", value)
    with pytest.raises(InputError, match="JAXSPEC_CPU_KERNEL_THREADS"):
        kernel_lib.threads()


def test_the_thread_count_defaults_to_the_usable_cpus(monkeypatch):
    monkeypatch.delenv("JAXSPEC_CPU_KERNEL_THREADS", raising=False)
    assert kernel_lib.threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("JAXSPEC_CPU_KERNEL_THREADS", "3")
    assert kernel_lib.threads() == 3


def test_calls_from_several_threads_at_once_give_each_its_own_result():
    # Two Python threads run the kernel at the same time (jax releases the GIL while it runs): one call takes
    # the kernel's helper threads, the other runs alone; each result is bit for bit the one computed alone.
    operand_sets = [operands(8, 96, 1000, seed=s) for s in (6, 7)]
    product = jax.jit(small_rows_matmul)
    wanted = [np.asarray(product(x, w)) for x, w in operand_sets]
    failures = []

    def repeat(i):
        x, w = operand_sets[i]
        for _ in range(40):
            got = np.asarray(product(x, w))
            if not np.array_equal(got, wanted[i]):
                failures.append(i)

    workers = [threading.Thread(target=repeat, args=(i,)) for i in (0, 1, 0, 1)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failures
    np.testing.assert_allclose(wanted[0], small_rows_matmul_reference(*operand_sets[0]), rtol=1e-5, atol=1e-5)
