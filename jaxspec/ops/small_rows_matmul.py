"""A CPU product for a few input rows over an [out, in] weight matrix (float32 or int8 per output row), and its
jnp reference.

    y = small_rows_matmul(x, kernel_t, scale)          # x [rows, in] -> y [rows, out], float32
    y == small_rows_matmul_reference(x, kernel_t, scale)   (up to float summation order)

Why a kernel of our own: a tree forward over K <= 16 nodes streams the same weights as a one-token step, but
XLA's CPU matmul packs the whole weight matrix for a multi-row product and runs it at a fifth of the machine's
arithmetic rate, so cost(K=8) was ~2.5x cost(1) (docs/benchmarks.md, "Where cost(K) goes"). The C++ kernel
beside this file (small_rows_matmul.cc, an XLA FFI custom call) reads each weight row once for all input rows
and splits the output rows over threads of its own: one per CPU this process may use (the caller's included),
or JAXSPEC_CPU_KERNEL_THREADS.

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


def small_rows_matmul_reference(x, kernel_t, scale=None):
    """x [rows, in] times kernel_t [out, in] transposed (times scale [out]): float32 [rows, out]."""
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


@jax.custom_jvp
def _product(x, kernel_t, scale):
    """The custom call; `scale` is [out] or _UNSCALED. Its JVP is linear in the reference, so reverse mode
    transposes the reference."""
    out = jax.ShapeDtypeStruct((x.shape[0], kernel_t.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")
    return call(x, kernel_t, scale, scaled=scale.shape[0] > 0)


@_product.defjvp
def _product_jvp(primals, tangents):
    x, kernel_t, scale = primals
    dx, dkernel, dscale = tangents
    scaled = scale.shape[0] > 0
    dy = small_rows_matmul_reference(dx, kernel_t, scale if scaled else None)
    if jnp.issubdtype(kernel_t.dtype, jnp.floating):  # int8 weights have no tangent
        dy = dy + small_rows_matmul_reference(x, dkernel, scale if scaled else None)
    if scaled:
        dy = dy + small_rows_matmul_reference(x, kernel_t) * dscale
    return _product(x, kernel_t, scale), dy


def small_rows_matmul(x, kernel_t, scale=None):
    """x [rows, in] float32 times kernel_t [out, in] (float32, or int8 with scale [out]) transposed:
    float32 [rows, out], on the CPU kernel. Callers check `available()` first."""
    if x.ndim != 2 or kernel_t.ndim != 2 or x.shape[1] != kernel_t.shape[1]:
        raise InputError(f"small_rows_matmul: expected x [rows, in] and kernel_t [out, in], got {x.shape} and "
                         f"{kernel_t.shape}")
    if kernel_t.dtype not in (np.float32, np.int8):
        raise InputError(f"small_rows_matmul: kernel_t must be float32 or int8, got {kernel_t.dtype}")
    if scale is not None and scale.shape != (kernel_t.shape[0],):
        raise InputError(f"small_rows_matmul: scale has shape {scale.shape}, expected ({kernel_t.shape[0]},)")
    scale = _UNSCALED if scale is None else scale.astype(jnp.float32)
    return _product(x.astype(jnp.float32), kernel_t, scale)
