"""Shared plumbing for the Pallas kernels: implementation choice, block-size checks, padding, matmul.

Every op takes `implementation=None | "xla" | "pallas"`. None picks the fastest path the backend runs:
the Pallas kernel on GPU and TPU, the plain-jnp reference on CPU (where the kernel only runs in
interpret mode, which is for testing, not speed). An explicit "pallas" on CPU runs the kernel with
`interpret=True`.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

IMPLEMENTATIONS = (None, "xla", "pallas")

# Finite stand-in for -inf in masked scores: exp(MASK_VALUE - m) underflows to 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def resolve_implementation(op: str, implementation: str | None) -> str:
    """Returns "xla" or "pallas" for `implementation`, choosing by backend when it is None."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{op}: unknown implementation {implementation!r}; allowed: None, 'xla', 'pallas'")
    if implementation is None:
        return "xla" if kernel_platform() == "cpu" else "pallas"
    return implementation


_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)
TARGET_PLATFORMS = ("cpu", "gpu", "tpu")


@contextlib.contextmanager
def target_platform(platform: str):
    """Builds the kernels for `platform` instead of the default backend while tracing in this context.

    For ahead-of-time lowering from another host, e.g. checking on a CPU machine that the kernels lower
    through Triton: `with target_platform("gpu"): jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))`.
    It is read at trace time, so use a fresh jitted function inside the context.
    """
    if platform not in TARGET_PLATFORMS:
        raise ValueError(f"target_platform: unknown platform {platform!r}; allowed: {list(TARGET_PLATFORMS)}")
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def kernel_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform the kernels are built for (the default backend unless overridden)."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


def interpret_mode() -> bool:
    """Pallas kernels run through the interpreter on CPU; GPU (Triton) and TPU (Mosaic) compile them."""
    return kernel_platform() == "cpu"


def compiler_params(head_dim: int, num_stages: int = 2):
    """Backend compiler parameters: on GPU they select the Triton lowering (JAX's default is Mosaic GPU,
    whose warpgroup programming model these kernels are not written for). Wide heads get 8 warps."""
    if kernel_platform() == "gpu":
        num_warps = 4 if head_dim <= 64 else 8
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return None


def scalar_table_spec() -> pl.BlockSpec:
    """Whole-array spec for small int tables (lengths, block schedules) read one scalar at a time.

    On TPU they live in SMEM; on GPU they stay in global memory and are read through the cache.
    """
    if kernel_platform() == "tpu":
        from jax.experimental.pallas import tpu as pl_tpu

        return pl.BlockSpec(memory_space=pl_tpu.SMEM)
    return pl.BlockSpec()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def padded_head_dim(d: int) -> int:
    """Head dim the kernels compute in: a power of two >= 16 (Triton dot tiles); zero columns are inert."""
    return max(16, next_power_of_2(d))


def check_block_size(op: str, name: str, value) -> int:
    """Block sizes are static powers of two; GPU tiles (Triton dots) need at least 16."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise ValueError(f"{op}: {name}={value!r} must be a positive power-of-two int")
    if kernel_platform() == "gpu" and value < 16:
        raise ValueError(f"{op}: {name}={value} must be >= 16 on GPU (Triton dot tiles)")
    return value


def check_block_size_keys(op: str, block_sizes: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(block_sizes) - set(allowed))
    if unknown:
        raise ValueError(f"{op}: unknown block-size keyword(s) {unknown}; allowed: {list(allowed)}")


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pads `x` with `value` at the end of `axis` up to `size` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra < 0:
        raise ValueError(f"pad_axis: axis {axis} has size {x.shape[axis]} > target {size}")
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """2-D matmul with float32 accumulation; transposes are folded into the contraction dims."""
    contract_a = 0 if transpose_a else 1
    contract_b = 1 if transpose_b else 0
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32)


def online_softmax_step(carry, scores, visible, v):
    """One flash-attention update of (acc, m, l) with a [rows, cols] score tile and its value tile.

    Masked entries contribute exactly zero probability, so a row that never sees a key keeps l = 0
    (its output is defined as zeros by the callers) instead of averaging masked values.
    """
    acc, m, l = carry
    scores = jnp.where(visible, scores, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    correction = jnp.exp(m - m_new)
    p = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
    l_new = correction * l + jnp.sum(p, axis=1)
    acc_new = correction[:, None] * acc + matmul(p.astype(v.dtype), v)
    return acc_new, m_new, l_new


def init_softmax_carry(rows: int, dim: int):
    return (jnp.zeros((rows, dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def safe_denominator(l: jax.Array) -> jax.Array:
    """Rows that saw no key (l == 0) divide by 1 so their all-zero accumulator gives a zero output."""
    return jnp.where(l == 0.0, 1.0, l)


# Programs the default split count aims for: about one wave of a large GPU.
TARGET_PROGRAMS = 128


def default_num_splits(num_blocks: int, programs: int) -> int:
    """Splits of a row's key blocks so that `programs` programs times the splits fill about one wave of a
    large GPU (TARGET_PROGRAMS), at least one and at most one per block."""
    return max(1, min(num_blocks, TARGET_PROGRAMS // max(programs, 1)))


def cache_block(cache_len: int, block_k: int) -> int:
    """block_k, halved (not below 16) until it divides cache_len, so the cache needs no padding copy."""
    while cache_len % block_k and block_k > 16:
        block_k //= 2
    return block_k


def choose_blocks_per_split(num_blocks: int, num_splits: int) -> int:
    """Blocks per split for at most `num_splits` splits: the smallest divisor of num_blocks that is enough,
    so the splits tile the blocks exactly."""
    need = pl.cdiv(num_blocks, min(num_splits, num_blocks))
    return next(n for n in range(need, num_blocks + 1) if num_blocks % n == 0)
