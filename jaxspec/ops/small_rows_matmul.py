"""A CPU product for a few input rows over an [out, in] weight matrix (float32 or int8 per output row), and its
jnp reference.

    y = small_rows_matmul(x, kernel_t, scale)          # x [rows, in] -> y [rows, out], float32
    y == small_rows_matmul_reference(x, kernel_t, scale)   (up to float summation order)
    small_rows_matmul(x, stack, scale, index)          # stack [G, out, in]: the product with stack[index]

Why a kernel of our own: a tree forward over K <= 16 nodes streams the same weights as a one-token step, but
XLA's CPU matmul packs the whole weight matrix for a multi-row product and runs it at a fifth of the machine's
arithmetic rate, so cost(K=8) was ~2.5x cost(1) (docs/benchmarks.md, "Where cost(K) goes"). The C++ kernel
beside this file (small_rows_matmul.cc, an XLA FFI custom call) reads each weight row once for all input rows
and splits the output rows over threads of its own: one per CPU this process may use (the caller's included),
or JAXSPEC_CPU_KERNEL_THREADS. Given a stack and an index it reads stack[index] where it lies: inside a scan over
layers (models/layer_scan.py) XLA's CPU backend would otherwise copy each layer's slice before its product.

It is compiled on first use (jaxspec.ops.cpu_build). `available()` is False (and the callers use XLA's
products) when the CPU lacks AVX2/FMA, no compiler is found, the build fails (logged once), or
JAXSPEC_CPU_KERNELS leaves it out. Gradients and batching go through the reference (a custom JVP; vmap runs the
rows one batch member at a time).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import InputError
from jaxspec.ops import cpu_build

_TARGET = "jaxspec_small_rows_matmul"


def small_rows_matmul_reference(x, kernel_t, scale=None, index=None):
    """x [rows, in] times kernel_t [out, in] transposed (times scale [out]): float32 [rows, out]. With `index`,
    kernel_t is a stack [G, out, in] and the product is with kernel_t[index]."""
    if index is not None:
        kernel_t = kernel_t[index]
    y = jnp.einsum("ri,oi->ro", x.astype(jnp.float32), kernel_t.astype(jnp.float32))
    return y if scale is None else y * scale.astype(jnp.float32)


def _build() -> pathlib.Path:
    return cpu_build.build()


threads = cpu_build.threads  # JAXSPEC_CPU_KERNEL_THREADS, shared by the kernels


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA's CPU backend (see the module docstring)."""
    return cpu_build.enabled("small_rows_matmul") and cpu_build.load(_build, "JaxspecSmallRowsMatmul", _TARGET)


_UNSCALED = np.zeros((0,), np.float32)  # the scale operand of an unscaled product
_UNSTACKED = np.zeros((), np.int32)  # the index operand of a product over one [out, in] matrix


@jax.custom_jvp
def _product(x, kernel_t, scale, index):
    """The custom call; `scale` is [out] or _UNSCALED, `index` (int32) picks a [G, out, in] stack's matrix. Its JVP
    is linear in the reference, so reverse mode transposes the reference."""
    out = jax.ShapeDtypeStruct((x.shape[0], kernel_t.shape[-2]), jnp.float32)
    call = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")
    return call(x, kernel_t, scale, index, scaled=scale.shape[0] > 0)


@_product.defjvp
def _product_jvp(primals, tangents):
    x, kernel_t, scale, index = primals
    dx, dkernel, dscale, _ = tangents
    scale = scale if scale.shape[0] > 0 else None
    index = index if kernel_t.ndim == 3 else None
    dy = small_rows_matmul_reference(dx, kernel_t, scale, index)
    if jnp.issubdtype(kernel_t.dtype, jnp.floating):  # int8 weights have no tangent
        dy = dy + small_rows_matmul_reference(x, dkernel, scale, index)
    if scale is not None:
        dy = dy + small_rows_matmul_reference(x, kernel_t, None, index) * dscale
    return _product(*primals), dy


def small_rows_matmul(x, kernel_t, scale=None, index=None):
    """x [rows, in] float32 times kernel_t [out, in] (float32, or int8 with scale [out]) transposed:
    float32 [rows, out], on the CPU kernel. With `index` (an int scalar, possibly traced), kernel_t is a stack
    [G, out, in] and the product is with kernel_t[index], read in place. Callers check `available()` first."""
    stacked = index is not None
    if x.ndim != 2 or kernel_t.ndim != 2 + stacked or x.shape[1] != kernel_t.shape[-1]:
        want = "[G, out, in] (with an index)" if stacked else "[out, in]"
        raise InputError(f"small_rows_matmul: expected x [rows, in] and kernel_t {want}, got {x.shape} and "
                         f"{kernel_t.shape}")
    if kernel_t.dtype not in (np.float32, np.int8):
        raise InputError(f"small_rows_matmul: kernel_t must be float32 or int8, got {kernel_t.dtype}")
    if scale is not None and scale.shape != (kernel_t.shape[-2],):
        raise InputError(f"small_rows_matmul: scale has shape {scale.shape}, expected ({kernel_t.shape[-2]},)")
    if stacked and jnp.shape(index) != ():
        raise InputError(f"small_rows_matmul: index must be a scalar, got shape {jnp.shape(index)}")
    scale = _UNSCALED if scale is None else scale.astype(jnp.float32)
    index = _UNSTACKED if index is None else jnp.asarray(index, jnp.int32)
    return _product(x.astype(jnp.float32), kernel_t, scale, index)
