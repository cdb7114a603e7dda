"""Scanned layers: one compiled body per period of a stack's layer pattern, run over the period's repeats.

An unrolled stack of n layers puts n copies of the block into the program, so compile time grows with depth.
With `model.scan_layers`, DecoderLM gives each layer a static signature (its mixer kind, window, RoPE base and
FFN widths, and the apply-time options that touch it: granularity, skip_layers, skip_ffn), finds the smallest
period p of that sequence, and runs the first (n // p) * p layers as one `jax.lax.scan` over n // p groups of p
blocks; the remaining n % p layers run unrolled (MaxText's `scan_layers`, generalised to repeated groups:
Gemma 3's five sliding-window layers and one global layer scan as groups of six).

Parameters are stored per layer, so checkpoints, conversions and layouts are unchanged. The scan reads them
stacked per position of the period: `with_stacks` turns the scanned layers' entries into those stacks once
(decode_layout's `for_decoding` does, so every decode loop stacks outside its while loop; the weights are then
held once, in the stacks, and a forward of another plan or an unrolled layer reads a layer from its stack in
place, `stored_layer`), and a forward given per-layer params stacks the layers itself, on every call (XLA
hoists that out of a plain loop, not out of a speculative loop's branches). The decode state of a scanned model
holds the scanned layers' entries stacked the same way (`jaxspec.state.init_decode_state`), so a forward reads
and returns them without stacking or unstacking its caches; a state in per-layer form (or stacked for another
plan) is stacked for the scan on every forward.

A scan hands its body a slice of each stacked array, and on a backend that does not fuse a dynamic slice into
the product that reads it (XLA's CPU backend) that slice is a copy: every weight byte read twice and written once
per step. So the decode layout's projection kernels (`kernel_t`, models/decode_layout.py) reach the body as
`LayerRows`, the stack and the layer's index, which the CPU kernel of jaxspec.ops.small_rows_matmul reads in
place (models/layers.py, `matmul_t`); other backends, and products the kernel does not take, slice the stack as
before. The KV caches alike: they stay whole in the scan's carry, and attention gets each layer's as LayerRows
views, writes its new rows into the stack in place and reads the layer with the CPU attention kernel
(jaxspec.ops.cached_attention) where it lies. docs/benchmarks.md ("Scanned layers") has the compile and step
times, measured side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec import config as config_lib
from jaxspec.errors import InputError


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


def layer_signatures(model_cfg, per_layer=None, skip=(), no_ffn=()) -> tuple:
    """Per layer, everything static that shapes its block in a forward with these options (equal signatures
    compile alike): granularity per layer, skipped layers, layers without FFN."""
    kinds = config_lib.layer_kinds(model_cfg)
    return tuple(("skipped",) if i in skip else
                 (kinds[i], config_lib.layer_window(model_cfg, i), config_lib.layer_rope_theta(model_cfg, i),
                  config_lib.ffn_hidden_sizes(model_cfg, i), None if per_layer is None else per_layer[i],
                  i in no_ffn)
                 for i in range(model_cfg.n_layers))


def model_plan(model_cfg, per_layer=None, skip=(), no_ffn=()) -> tuple[int, int]:
    """(period, groups) of the layers a forward with these options scans: layers [0, period * groups) run as one
    scan; groups is 0 without `model.scan_layers` or a period that repeats."""
    if not model_cfg.get("scan_layers", False):
        return 1, 0
    return scan_plan(layer_signatures(model_cfg, per_layer, skip, no_ffn))


# The params key of the scanned layers' stacks (`with_stacks`): {"position_<j>": layers j, j + period, ... stacked}.
STACKS = "layer_stacks"


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Any, count: int) -> list:
    return [jax.tree.map(lambda leaf, g=g: leaf[g], tree) for g in range(count)]


def stack_positions(per_layer: Sequence[Any], period: int, groups: int) -> list:
    """Per position j of the period, the entries of layers j, j + period, ... stacked on a leading group axis."""
    return [_stack([per_layer[g * period + j] for g in range(groups)]) for j in range(period)]


def unstack_positions(per_position: Sequence[Any], groups: int) -> list:
    """The inverse of `stack_positions`: one entry per layer, in layer order (a None position gives None)."""
    per_group = [_unstack(stacked, groups) for stacked in per_position]
    return [per_group[j][g] for g in range(groups) for j in range(len(per_position))]


def with_stacks(params, period: int, groups: int) -> dict:
    """`params` (a DecoderLM's) with its layers [0, period * groups) held only as the stacks under STACKS, which
    a scanned forward with that plan reads instead of stacking the layers itself (a copy of their weights per
    call). The per-layer entries of those layers are left out, so the weights are held once; a forward that
    needs one layer (another plan, an unrolled layer) reads it from its stack (`stored_layer`)."""
    names = [f"layer_{i}" for i in range(period * groups)]
    stacks = stack_positions([params[name] for name in names], period, groups)
    kept = {k: v for k, v in params.items() if k not in names}
    return {**kept, STACKS: {f"position_{j}": stack for j, stack in enumerate(stacks)}}


def stored_plan(params) -> tuple[int, int] | None:
    """(period, groups) of the stacks `with_stacks` stored in `params`, or None."""
    stacks = params.get(STACKS)
    leaves = jax.tree.leaves(stacks["position_0"]) if stacks else []
    return (len(stacks), leaves[0].shape[0]) if leaves else None


def stored_stacks(params, period: int, groups: int) -> list | None:
    """The per-position stacks `with_stacks` stored in `params` for this plan, or None (none stored, or stored for
    another plan: apply-time options such as skip_layers can change the period)."""
    if stored_plan(params) != (period, groups):
        return None
    return [params[STACKS][f"position_{j}"] for j in range(period)]


def stored_layer(params, i: int):
    """Layer i's params: its own entry, or, where `with_stacks` holds the layer only in a stack, the layer read
    from there (LayerRows views for the projection kernels, which a product reads in place; slices for the rest)."""
    name = f"layer_{i}"
    if name in params:
        return params[name]
    plan = stored_plan(params)
    if plan is None or i >= plan[0] * plan[1]:
        raise InputError(f"params have no {name!r}, in their own entry or in the stacks of {STACKS!r}; do they belong "
                         "to this model?")
    period, _ = plan
    return layer_params(params[STACKS][f"position_{i % period}"], jnp.asarray(i // period, jnp.int32))


def without_stacks(params) -> dict:
    """`params` with every layer in its own entry again and no stacks: the stored parameters of `with_stacks`."""
    plan = stored_plan(params)
    if plan is None:
        return {k: v for k, v in params.items() if k != STACKS}
    period, groups = plan
    stacks = [params[STACKS][f"position_{j}"] for j in range(period)]
    layers = {f"layer_{i}": entry for i, entry in enumerate(unstack_positions(stacks, groups))}
    return {**{k: v for k, v in params.items() if k != STACKS}, **layers}


def _views(stacks, index):
    """An entry whose arrays are LayerRows views of `stacks` at layer `index`."""
    return jax.tree.map(lambda stack: LayerRows(stack, index), stacks)


def _is_layer_rows(leaf) -> bool:
    return isinstance(leaf, LayerRows)


def _is_view(entry) -> bool:
    """Whether `entry` holds LayerRows views only."""
    leaves = jax.tree.leaves(entry, is_leaf=_is_layer_rows)
    return bool(leaves) and all(isinstance(leaf, LayerRows) for leaf in leaves)


def scan_layers(apply_position: Callable, stacked_params: Sequence[Any], groups: int, stacked_entries: Sequence[Any],
                stacked_gates: Sequence[Any], x: jax.Array, in_place: Callable[[Any], bool] = lambda entry: False
                ) -> tuple[jax.Array, list, list]:
    """Run layers [0, period * groups) as a scan over groups, period = len(stacked_params).

    apply_position(j, params, x, entry, gate) -> (x, new): position j of a period (0 <= j < period) applied to
    one layer's params, decode-state entry and gate (each possibly None). stacked_params, stacked_entries and
    stacked_gates hold, per position, the layers' params, entries and gates stacked over the groups
    (`stack_positions`; None for a position without any).

    Entries for which `in_place(entry)` holds (KV caches) stay whole in the scan's carry: the body gets an entry of
    LayerRows views of them, and a new entry of such views (an extend's written cache) goes back into the carry,
    so no layer's entry is copied out of its stack or into a new one. Other new entries (recurrent states, a tree
    forward's pending keys and values) are stacked as the scan's outputs.
    Returns (x, the new entries stacked per position, residual stream after each layer in layer order).
    """
    carried = [entry if entry is not None and in_place(entry) else None for entry in stacked_entries]
    sliced = [None if stack is not None else entry for stack, entry in zip(carried, stacked_entries, strict=True)]
    written = [False] * len(stacked_params)  # per position: whether its new entry came back as views (traced once)
    xs = (jnp.arange(groups, dtype=jnp.int32), list(zip(sliced, stacked_gates, strict=True)))

    def body(carry, xs_group):
        x, stacks = carry
        stacks = list(stacks)
        index, group_entries = xs_group
        news, hiddens = [], []
        for j, (entry, gate) in enumerate(group_entries):
            if stacks[j] is not None:
                entry = _views(stacks[j], index)
            x, new = apply_position(j, layer_params(stacked_params[j], index), x, entry, gate)
            if stacks[j] is not None and _is_view(new):
                stacks[j] = jax.tree.map(lambda view: view.stack, new, is_leaf=_is_layer_rows)
                new, written[j] = None, True
            news.append(new)
            hiddens.append(x)
        return (x, stacks), (news, hiddens)

    (x, stacks), (news, hiddens) = jax.lax.scan(body, (x, carried), xs)
    news = [stack if done else new for stack, new, done in zip(stacks, news, written, strict=True)]
    return x, news, unstack_positions(hiddens, groups)
