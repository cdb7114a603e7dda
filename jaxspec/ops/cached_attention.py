"""Attention of a few new nodes over a KV cache (and a block of tree nodes): a CPU kernel and its jnp references.

    out = cached_chain_attention(q, k_cache, v_cache, positions, scale=s, window=w)
    out == pallas_kernels.tree_attention.cached_chain_attention(...)      (up to float summation order)
    out = cached_tree_attention(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, scale=s, window=w)
    out == pallas_kernels.tree_attention.tree_attention_reference(...)

The chain form is every decode step (K = 1) and a chain extend: q [B, H, K, D], caches [B, Hkv, L, D] that already
hold the nodes, positions [B, K]; node i of row b sees the cache columns <= its position (and within the window).
The tree form is a tree forward (verification): the cache is read up to each row's length and the K nodes' own
keys/values [B, Hkv, K, D] are seen under tree_mask [B, K, K] (ancestors), as in pallas_kernels.tree_attention.

Why a kernel of our own: XLA's CPU program for these is a dozen small ops per layer (the chain form transposes a
copy of the keys; both reduce, mask and normalise apart), ~4.6 ms of a 30 ms SmolLM2 step
(benchmarks/step_profile.py) over ~9 MB of cache. The C++ kernel beside this file (cached_attention.cc, an XLA FFI
custom call, built by jaxspec.ops.cpu_build) reads each row's visible keys and values once, and not the padded
tail of the cache.

Both also take the caches of a scanned layer stack, [G, B, Hkv, L, D] with `index` (an int32 scalar): the layer
index's caches, which the kernel reads in place (a slice inside a scan over layers is a copy per layer and step).

Both take the kernel on the CPU backend with float32 operands when it builds (`available()`), else the
reference. Gradients go through a plain-jnp form of the same computation (a custom JVP); vmap runs one batch
member at a time.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import InputError
from jaxspec.ops import cpu_build
from pallas_kernels._common import kernel_platform
from pallas_kernels.tree_attention import cached_chain_attention as cached_chain_attention_reference
from pallas_kernels.tree_attention import node_depths, tree_attention_reference, windowed_tree_mask

_TARGET = "jaxspec_cached_attention"


def _build() -> pathlib.Path:
    return cpu_build.build()


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA's CPU backend (False, logged once, when it cannot be
    built; False without a try when JAXSPEC_CPU_KERNELS leaves it out or the CPU lacks AVX2/FMA)."""
    return cpu_build.enabled("cached_attention") and cpu_build.load(_build, "JaxspecCachedAttention", _TARGET)


@functools.partial(jax.custom_jvp, nondiff_argnums=(9, 10))
def _kernel(q, k_cache, v_cache, last, positions, k_tree, v_tree, tree_visible, index, scale, window):
    """The custom call: row (b, i) sees cache columns <= last[b, i] (and > positions[b, i] - window with a window)
    and tree nodes j with tree_visible[b, i, j]; caches [G, B, Hkv, L, D] are read at `index`. Its JVP is the
    plain-jnp form's, so reverse mode transposes it."""
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k_cache, v_cache, last, positions, k_tree, v_tree, tree_visible, index, scale=np.float32(scale),
                window=np.int64(window))


def _kernel_jnp(q, k_cache, v_cache, last, positions, k_tree, v_tree, tree_visible, index, scale, window):
    """What the custom call computes, in jnp (for its derivatives): one softmax over [cache | tree] scores."""
    k_cache, v_cache = _layer(k_cache, index), _layer(v_cache, index)
    b, h, k, d = q.shape
    hkv = k_cache.shape[1]
    rows = q.reshape(b, hkv, h // hkv, k, d)
    cols = jnp.arange(k_cache.shape[2])[None, None, :]
    cache_visible = cols <= last[:, :, None]
    if window:
        cache_visible = cache_visible & (cols > positions[:, :, None] - window)
    visible = jnp.concatenate([cache_visible, tree_visible], axis=-1)[:, None, None]  # [B, 1, 1, K, L + T]
    keys = jnp.concatenate([k_cache, k_tree], axis=2)
    values = jnp.concatenate([v_cache, v_tree], axis=2)
    scores = jnp.einsum("bngkd,bnld->bngkl", rows, keys) * scale
    probs = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bngkl,bnld->bngkd", probs, values).reshape(b, h, k, d)


@_kernel.defjvp
def _kernel_jvp(scale, window, primals, tangents):
    q, k_cache, v_cache, last, positions, k_tree, v_tree, tree_visible, index = primals
    floats = lambda q, k, v, kt, vt: _kernel_jnp(q, k, v, last, positions, kt, vt, tree_visible, index, scale,
                                                 window)
    _, tangent = jax.jvp(floats, (q, k_cache, v_cache, k_tree, v_tree),
                         tuple(tangents[i] for i in (0, 1, 2, 5, 6)))
    return _kernel(*primals, scale, window), tangent


def uses_kernel(*arrays) -> bool:
    """Whether these operands (q, caches, tree keys/values) take the CPU kernel."""
    float32 = all(jnp.dtype(a.dtype) == jnp.float32 for a in arrays)
    return float32 and kernel_platform() == "cpu" and available()  # not when lowering for an accelerator


def _layer(cache, index):
    """The caches of one layer: `cache` itself, or cache[index] of a stack."""
    return cache if cache.ndim == 4 else cache[index]


def _check(name, q, k_cache, v_cache, index):
    """Shape checks; returns (the default scale, the int32 stack index operand)."""
    b, h, k, d = q.shape
    stacked = k_cache.ndim == 5
    if stacked != (index is not None):
        raise InputError(f"{name}: caches of shape {k_cache.shape} need "
                         f"{'an index into their stack' if stacked else 'no index (they are not stacked)'}")
    if stacked and jnp.shape(index) != ():
        raise InputError(f"{name}: the stack index must be a scalar, got shape {jnp.shape(index)}")
    layer = k_cache.shape[1:] if stacked else k_cache.shape
    if (k_cache.ndim not in (4, 5) or k_cache.shape != v_cache.shape or layer[0] != b or layer[3] != d):
        raise InputError(f"{name}: caches must be [B={b}, Hkv, L, D={d}] (or a stack [G, B, Hkv, L, D]) alike, got "
                         f"{k_cache.shape} and {v_cache.shape}")
    if h % layer[1]:
        raise InputError(f"{name}: query heads {h} not a multiple of kv heads {layer[1]}")
    return d**-0.5, jnp.asarray(0 if index is None else index, jnp.int32)


def cached_chain_attention(q, k_cache, v_cache, positions, *, scale=None, window=0, index=None):
    """q [B, H, K, D], caches [B, Hkv, L, D] holding the nodes (or a stack [G, ...] with `index`), positions
    [B, K] -> [B, H, K, D]."""
    default_scale, stack_index = _check("cached_chain_attention", q, k_cache, v_cache, index)
    b, _, k, d = q.shape
    if positions.shape != (b, k):
        raise InputError(f"cached_chain_attention: positions must be [B={b}, K={k}], got {positions.shape}")
    scale = default_scale if scale is None else scale
    if not uses_kernel(q, k_cache, v_cache):
        return cached_chain_attention_reference(q, _layer(k_cache, index), _layer(v_cache, index), positions,
                                                scale=scale, window=window)
    positions = positions.astype(jnp.int32)
    no_tree = jnp.zeros((b, k_cache.shape[-3], 0, d), jnp.float32)
    return _kernel(q, k_cache, v_cache, positions, positions, no_tree, no_tree, jnp.zeros((b, k, 0), bool),
                   stack_index, float(scale), int(window))


def cached_tree_attention(q, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask, *, scale=None, window=0,
                          index=None):
    """q [B, H, K, D] over caches [B, Hkv, L, D] (or a stack [G, ...] with `index`) valid on [0, lengths[b]) and
    the nodes' own k_tree/v_tree [B, Hkv, K, D] under tree_mask [K, K] or [B, K, K] (ancestors, self included)
    -> [B, H, K, D]."""
    default_scale, stack_index = _check("cached_tree_attention", q, k_cache, v_cache, index)
    b, _, k, d = q.shape
    hkv = k_cache.shape[-3]
    if k_tree.shape != (b, hkv, k, d) or v_tree.shape != k_tree.shape:
        raise InputError(f"cached_tree_attention: tree keys/values must be [B={b}, Hkv={hkv}, K={k}, "
                         f"D={d}], got {k_tree.shape} and {v_tree.shape}")
    if lengths.shape != (b,) or tree_mask.shape[-2:] != (k, k):
        raise InputError(f"cached_tree_attention: lengths must be [B={b}] and tree_mask [B, K={k}, K], got "
                         f"{lengths.shape} and {tree_mask.shape}")
    scale = default_scale if scale is None else scale
    if not uses_kernel(q, k_cache, v_cache, k_tree, v_tree):
        return tree_attention_reference(q, _layer(k_cache, index), _layer(v_cache, index), lengths, k_tree, v_tree,
                                        tree_mask, scale=scale, window=window)
    tree_mask = jnp.broadcast_to(tree_mask, (b, k, k)).astype(bool)
    lengths = lengths.astype(jnp.int32)
    positions = lengths[:, None] + node_depths(tree_mask)
    visible = windowed_tree_mask(tree_mask, window) if window else tree_mask
    last = jnp.broadcast_to(lengths[:, None] - 1, (b, k))
    return _kernel(q, k_cache, v_cache, last, positions, k_tree, v_tree, visible, stack_index, float(scale),
                   int(window))
