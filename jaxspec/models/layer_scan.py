"""Scanned layers: one compiled body per period of a stack's layer pattern, run over the period's repeats.

An unrolled stack of n layers puts n copies of the block into the program, so compile time grows with depth.
With `model.scan_layers`, DecoderLM gives each layer a static signature (its mixer kind, window, RoPE base and
FFN widths, and the apply-time options that touch it: granularity, skip_layers, skip_ffn), finds the smallest
period p of that sequence, and runs the first (n // p) * p layers as one `jax.lax.scan` over n // p groups of p
blocks; the remaining n % p layers run unrolled (MaxText's `scan_layers`, generalised to repeated groups:
Gemma 3's five sliding-window layers and one global layer scan as groups of six).

Parameters stay stored per layer, so checkpoints, conversions and layouts are unchanged: each forward stacks
them per position of the period, and stacks the decode state's cache entries alike. Both are copies, and on a
backend that does not fuse a dynamic slice into the product that reads it (XLA's CPU backend), so is every
layer's slice of the stack inside the scan. A scanned stack therefore trades step time for compile time;
docs/benchmarks.md ("Scanned layers") has both, measured side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


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


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Any, count: int) -> list:
    return [jax.tree.map(lambda leaf, g=g: leaf[g], tree) for g in range(count)]


def scan_layers(apply_position: Callable, period: int, groups: int, params: Sequence[Any], caches: Sequence[Any],
                gates: Sequence[Any], x: jax.Array) -> tuple[jax.Array, list, list]:
    """Run layers [0, period * groups) as a scan over groups.

    apply_position(j, params, x, cache, gate) -> (x, new): position j of a period (0 <= j < period) applied to
    one layer's params, cache entry and gate (each possibly None). params, caches and gates hold one entry per
    layer of the scanned part, in layer order; entries of one position must share their tree structure.
    Returns (x, new entry per layer, residual stream after each layer).
    """
    def position(seq, j):
        return _stack([seq[g * period + j] for g in range(groups)])

    xs = [(position(params, j), position(caches, j), position(gates, j)) for j in range(period)]

    def body(x, xs_group):
        news, hiddens = [], []
        for j, (layer_params, cache, gate) in enumerate(xs_group):
            x, new = apply_position(j, layer_params, x, cache, gate)
            news.append(new)
            hiddens.append(x)
        return x, (news, hiddens)

    x, (news, hiddens) = jax.lax.scan(body, x, xs)
    per_position_new = [_unstack(n, groups) for n in news]
    per_position_hidden = [_unstack(h, groups) for h in hiddens]
    order = [(g, j) for g in range(groups) for j in range(period)]
    return (x, [per_position_new[j][g] for g, j in order], [per_position_hidden[j][g] for g, j in order])
