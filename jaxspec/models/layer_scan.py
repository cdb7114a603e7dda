"""Scanned layers: one compiled body per period of a stack's layer pattern, run over the period's repeats.

An unrolled stack of n layers puts n copies of the block into the program, so compile time grows with depth.
With `model.scan_layers`, DecoderLM gives each layer a static signature (its mixer kind, window, RoPE base and
FFN widths, and the apply-time options that touch it: granularity, skip_layers, skip_ffn), finds the smallest
period p of that sequence, and runs the first (n // p) * p layers as one `jax.lax.scan` over n // p groups of p
blocks; the remaining n % p layers run unrolled (MaxText's `scan_layers`, generalised to repeated groups:
Gemma 3's five sliding-window layers and one global layer scan as groups of six).

Parameters stay stored per layer, so checkpoints, conversions and layouts are unchanged. The scan reads them
stacked per position of the period: `with_stacks` adds those stacks to the params once (decode_layout's
`for_decoding` does, so every decode loop stacks outside its while loop), and a forward given params without
them stacks the layers itself, on every call (XLA hoists that out of a plain loop, not out of a speculative
loop's branches). The decode state's cache entries are stacked on every forward.

A scan hands its body a slice of each stacked array, and on a backend that does not fuse a dynamic slice into
the product that reads it (XLA's CPU backend) that slice is a copy: every weight byte read twice and written once
per step. So the decode layout's projection kernels (`kernel_t`, models/decode_layout.py) reach the body as
`LayerRows`, the stack and the layer's index, which the CPU kernel of jaxspec.ops.small_rows_matmul reads in
place (models/layers.py, `matmul_t`); other backends, and products the kernel does not take, slice the stack as
before. docs/benchmarks.md ("Scanned layers") has the compile and step times, measured side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LayerRows:
    """One layer's [out, in] projection kernel inside a scan over layers: stack[index] of `stack` [G, out, in], the
    kernels of one position of the period in every group, left unsliced so that a product can read it in place."""

    stack: jax.Array
    index: jax.Array  # int32 scalar, the scan's group counter

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[1:]

    @property
    def dtype(self):
        return self.stack.dtype

    def value(self) -> jax.Array:
        """The layer's kernel as an array (a copy on XLA's CPU backend)."""
        return self.stack[self.index]


def _in_place(path, leaf) -> bool:
    """Whether a stacked parameter reaches the body as LayerRows: the decode layout's projection kernels."""
    return getattr(path[-1], "key", None) == "kernel_t" and leaf.ndim == 3


def layer_params(stacked, index):
    """One group's params of one position, from the position's stacked params: LayerRows for the projection
    kernels, a slice for everything else."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: LayerRows(leaf, index) if _in_place(path, leaf) else leaf[index], stacked)


def smallest_period(signatures: Sequence[Any]) -> int:
    """The smallest p with signatures[i] == signatures[i + p] for every i (the length itself if none is smaller)."""
    n = len(signatures)
    return next(p for p in range(1, n + 1) if all(signatures[i] == signatures[i + p] for i in range(n - p)))


def scan_plan(signatures: Sequence[Any]) -> tuple[int, int]:
    """(period, groups) of the scanned part: layers [0, period * groups) scan, the rest run unrolled. groups is 0
    when fewer than two periods fit (nothing to share)."""
    period = smallest_period(signatures)
    groups = len(signatures) // period
    return (period, groups) if groups >= 2 else (period, 0)


# The params key of the scanned layers' stacks (`with_stacks`): {"position_<j>": layers j, j + period, ... stacked}.
STACKS = "layer_stacks"


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Any, count: int) -> list:
    return [jax.tree.map(lambda leaf, g=g: leaf[g], tree) for g in range(count)]


def stack_positions(per_layer: Sequence[Any], period: int, groups: int) -> list:
    """Per position j of the period, the entries of layers j, j + period, ... stacked on a leading group axis."""
    return [_stack([per_layer[g * period + j] for g in range(groups)]) for j in range(period)]


def with_stacks(params, period: int, groups: int) -> dict:
    """`params` (a DecoderLM's) plus the stacks of its layers [0, period * groups) under STACKS, which a scanned
    forward with that plan reads instead of stacking the layers itself (a copy of their weights per call)."""
    per_layer = [params[f"layer_{i}"] for i in range(period * groups)]
    stacks = stack_positions(per_layer, period, groups)
    return {**params, STACKS: {f"position_{j}": stack for j, stack in enumerate(stacks)}}


def stored_stacks(params, period: int, groups: int) -> list | None:
    """The per-position stacks `with_stacks` stored in `params` for this plan, or None (none stored, or stored for
    another plan: apply-time options such as skip_layers can change the period)."""
    stacks = params.get(STACKS)
    if stacks is None or len(stacks) != period:
        return None
    leaves = jax.tree.leaves(stacks["position_0"])
    return [stacks[f"position_{j}"] for j in range(period)] if leaves and leaves[0].shape[0] == groups else None


def without_stacks(params) -> dict:
    """`params` without the stacks of `with_stacks` (the per-layer entries are the stored parameters)."""
    return {k: v for k, v in params.items() if k != STACKS}


def scan_layers(apply_position: Callable, stacked_params: Sequence[Any], groups: int, caches: Sequence[Any],
                gates: Sequence[Any], x: jax.Array) -> tuple[jax.Array, list, list]:
    """Run layers [0, period * groups) as a scan over groups, period = len(stacked_params).

    apply_position(j, params, x, cache, gate) -> (x, new): position j of a period (0 <= j < period) applied to
    one layer's params, cache entry and gate (each possibly None). stacked_params holds each position's params
    stacked over the groups (`stack_positions`; None for a skipped position); caches and gates hold one entry per
    layer of the scanned part, in layer order; entries of one position must share their tree structure.
    Returns (x, new entry per layer, residual stream after each layer).
    """
    period = len(stacked_params)
    entries = list(zip(stack_positions(caches, period, groups), stack_positions(gates, period, groups)))
    xs = (jnp.arange(groups, dtype=jnp.int32), entries)

    def body(x, xs_group):
        index, group_entries = xs_group
        news, hiddens = [], []
        for j, (cache, gate) in enumerate(group_entries):
            x, new = apply_position(j, layer_params(stacked_params[j], index), x, cache, gate)
            news.append(new)
            hiddens.append(x)
        return x, (news, hiddens)

    x, (news, hiddens) = jax.lax.scan(body, x, xs)
    per_position_new = [_unstack(n, groups) for n in news]
    per_position_hidden = [_unstack(h, groups) for h in hiddens]
    order = [(g, j) for g in range(groups) for j in range(period)]
    return (x, [per_position_new[j][g] for g, j in order], [per_position_hidden[j][g] for g, j in order])
