"""Logical-axis sharding rules: from named array dimensions to PartitionSpecs and NamedShardings.

Rules are (logical_axis, mesh_axes) pairs, as in `config.mesh.rules`; mesh_axes is a mesh axis name, a tuple
of them, or None (replicated). Parameters get their logical axes from PARAM_LOGICAL_AXES, a table of
(path regex, logical axes) entries matched against the "/"-joined parameter path; extend the table to teach
it new parameter names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxspec.errors import InputError
from jaxspec.parallel.mesh import DEFAULT_RULES, axis_size

LogicalAxes = tuple[str | None, ...]

# First entry whose regex matches the path and whose length equals the parameter's rank wins. A parameter one
# rank larger than a matching entry is treated as stacked over layers (nn.scan) and gets "layers" in front.
# Unmatched parameters (norm scales, small vectors, unknown names) are replicated.
PARAM_LOGICAL_AXES: tuple[tuple[str, LogicalAxes], ...] = (
    (r"(^|/)embedding$", ("vocab", "embed")),
    (r"(^|/)q_proj/kernel$", ("embed", "heads")),  # heads * head_dim columns
    (r"(^|/)q_proj/bias$", ("heads",)),
    (r"(^|/)(k_proj|v_proj)/kernel$", ("embed", "kv_heads")),
    (r"(^|/)(k_proj|v_proj)/bias$", ("kv_heads",)),
    (r"(^|/)o_proj/kernel$", ("heads", "embed")),
    # FFN weights appear both as Dense kernels and as raw params (MatFormerFFN slices them).
    (r"(^|/)(gate|up)(_proj)?(/kernel)?$", ("embed", "mlp")),
    (r"(^|/)down(_proj)?(/kernel)?$", ("mlp", "embed")),
    # Mamba: only the model dimension is split (its inner width is cut into x/z halves and conv channels).
    (r"(^|/)in_proj/kernel$", ("embed", None)),
    (r"(^|/)out_proj/kernel$", (None, "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)head_\d+_out/kernel$", ("embed", "vocab")),  # Medusa heads' own vocabulary projections
    # The decode layout (models/decode_layout.py): kernel_t [out, in], float32 or int8 with a scale per output
    # row; q, k and v (and gate and up) are fused along the output.
    (r"(^|/)qkv/kernel_t$", ("heads", "embed")),
    (r"(^|/)qkv/(bias|scale)$", ("heads",)),
    (r"(^|/)o_proj/kernel_t$", ("embed", "heads")),
    (r"(^|/)gate_up/kernel_t$", ("mlp", "embed")),
    (r"(^|/)gate_up/scale$", ("mlp",)),
    (r"(^|/)(o_proj|down_proj)/scale$", ("embed",)),
    (r"(^|/)down_proj/kernel_t$", ("embed", "mlp")),
    (r"(^|/)lm_head/kernel_t$", ("vocab", "embed")),
    (r"(^|/)(lm_head|embed)/scale$", ("vocab",)),
)


def _rules_table(rules: Iterable[tuple[str, object]]) -> dict[str, tuple[str, ...]]:
    """Rules as {logical axis: tuple of mesh axes} (empty tuple = replicated)."""
    table = {}
    for entry in rules:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise InputError(f"sharding rule {entry!r}: expected a (logical_axis, mesh_axes) pair.")
        logical, mesh_axes = entry
        if mesh_axes is None:
            table[logical] = ()
        elif isinstance(mesh_axes, str):
            table[logical] = (mesh_axes,)
        elif isinstance(mesh_axes, (tuple, list)) and all(isinstance(a, str) for a in mesh_axes):
            table[logical] = tuple(mesh_axes)
        else:
            raise InputError(
                f"sharding rule for {logical!r} maps to {mesh_axes!r}: allowed are a mesh axis name, "
                "a tuple of names, or None."
            )
    return table


def _spec_entry(mesh_axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    if not mesh_axes:
        return None
    return mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def _dim_mesh_axes(logical_axes: LogicalAxes, rules) -> list[tuple[str, ...]]:
    """Mesh axes per dimension; a mesh axis already used by an earlier dimension is dropped.

    Dropping keeps e.g. activations [batch, length, embed] valid under the default rules, where batch takes
    ("data", "fsdp") and embed would take "fsdp" again (a mesh axis may shard only one dimension).
    """
    table = _rules_table(rules)
    used: set[str] = set()
    per_dim = []
    for logical in logical_axes:
        if logical is None:
            per_dim.append(())
            continue
        if logical not in table:
            raise InputError(f"logical axis {logical!r} has no sharding rule; known axes: {sorted(table)}.")
        axes = tuple(a for a in table[logical] if a not in used)
        used.update(axes)
        per_dim.append(axes)
    return per_dim


def logical_to_spec(logical_axes: LogicalAxes, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have the given logical names (None: replicated)."""
    return PartitionSpec(*(_spec_entry(axes) for axes in _dim_mesh_axes(logical_axes, rules)))


def logical_to_sharding(
    logical_axes: LogicalAxes, shape: tuple[int, ...], mesh: jax.sharding.Mesh, rules=DEFAULT_RULES
) -> NamedSharding:
    """NamedSharding for an array of `shape`; a dimension its mesh axes do not divide is replicated."""
    if len(logical_axes) != len(shape):
        raise InputError(f"logical axes {logical_axes} do not match the rank of shape {tuple(shape)}.")
    entries = []
    for dim, axes in zip(shape, _dim_mesh_axes(logical_axes, rules)):
        entries.append(_spec_entry(axes) if dim % axis_size(mesh, axes) == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*entries))


def path_to_name(path) -> str:
    """'a/b/kernel' from a jax tree path of dict keys (or other key kinds)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def param_logical_axes(name: str, ndim: int, table=PARAM_LOGICAL_AXES) -> LogicalAxes:
    """Logical axes of the parameter at path `name` with rank `ndim`, by the name-convention table."""
    matches = [axes for pattern, axes in table if re.search(pattern, name)]
    for axes in matches:
        if len(axes) == ndim:
            return axes
    for axes in matches:
        if len(axes) + 1 == ndim:
            return ("layers", *axes)
    return (None,) * ndim


def param_shardings(params, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES, table=PARAM_LOGICAL_AXES):
    """A pytree of NamedSharding matching `params` (a flax linen params dict, arrays or ShapeDtypeStructs)."""

    def sharding_of(path, leaf):
        axes = param_logical_axes(path_to_name(path), len(leaf.shape), table)
        return logical_to_sharding(axes, tuple(leaf.shape), mesh, rules)

    return jax.tree_util.tree_map_with_path(sharding_of, params)


def batch_sharding(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for [batch, length] token arrays."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))
