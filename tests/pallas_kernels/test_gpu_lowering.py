"""The kernels lower through Pallas-Triton for CUDA, checked ahead of time on a CPU-only host.

This catches constructs Triton cannot lower (non-static shapes, unsupported ops, bad block specs)
without a GPU; it does not compile to PTX or run the kernels.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels._common import target_platform
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.tree_attention import tree_attention

pytest.importorskip("jax._src.pallas.triton.lowering", reason="jaxlib without Triton lowering bindings")

ARRAY = jax.ShapeDtypeStruct


def lower_for_cuda(fn, *args):
    with target_platform("gpu"):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


@pytest.mark.parametrize("window", [0, 100], ids=["global", "sliding_window"])
def test_tree_attention_lowers_for_triton(window):
    b, h, hkv, k, d, cache_len = 2, 8, 2, 5, 64, 300
    bf16 = jnp.bfloat16
    args = (ARRAY((b, h, k, d), bf16), ARRAY((b, hkv, cache_len, d), bf16), ARRAY((b, hkv, cache_len, d), bf16),
            ARRAY((b,), jnp.int32), ARRAY((b, hkv, k, d), bf16), ARRAY((b, hkv, k, d), bf16),
            ARRAY((k, k), bool))
    text = lower_for_cuda(lambda *a: tree_attention(*a, implementation="pallas", block_k=64, window=window), *args)
    assert "__gpu$xla.gpu.triton" in text


def test_block_sparse_forward_and_backward_lower_for_triton():
    b, h, hkv, t, d, block = 1, 4, 2, 200, 64, 64

    def loss(q, k, v, mask):
        out = block_sparse_attention(q, k, v, mask, causal=True, block_q=block, block_k=block,
                                     implementation="pallas")
        return jnp.sum(out.astype(jnp.float32))

    bf16 = jnp.bfloat16
    args = (ARRAY((b, h, t, d), bf16), ARRAY((b, hkv, t, d), bf16), ARRAY((b, hkv, t, d), bf16),
            ARRAY((h, 4, 4), jnp.int8))
    text = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), *args)
    # Forward, dq and dk/dv kernels.
    assert text.count("__gpu$xla.gpu.triton") >= 3
