"""Device meshes from the `config.mesh` section.

The mesh always has the four axes ("data", "fsdp", "tensor", "sequence") in that order, so sharding rules can
name any of them whatever the sizes are (an axis of size 1 costs nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from jaxspec.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis -> mesh axis (None: replicated; tuple: sharded over several mesh axes, major first).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("state", None),
)


def default_mesh_config() -> ml_collections.ConfigDict:
    """The `config.mesh` section: axis sizes (one may be -1 = the remaining devices) and logical rules."""
    return ml_collections.ConfigDict(
        {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1, "rules": DEFAULT_RULES}
    )


def resolve_axis_sizes(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Axis sizes in MESH_AXES order with a -1 replaced by what is left of `num_devices`.

    `mesh_cfg` is a ConfigDict or dict; a missing axis counts as size 1.
    """
    sizes = []
    for name in MESH_AXES:
        size = mesh_cfg.get(name, 1)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise InputError(f"config.mesh.{name}={size!r}: allowed are positive integers or -1 (the rest).")
        sizes.append(int(size))
    named = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise InputError(f"config.mesh has more than one axis set to -1 ({named}); at most one may be -1.")
    if free:
        fixed = math.prod(s for s in sizes if s != -1)
        if num_devices % fixed:
            raise InputError(
                f"config.mesh sizes ({named}) cannot fill {num_devices} devices: {num_devices} is not a "
                f"multiple of the fixed sizes' product {fixed}."
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        named = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
        raise InputError(
            f"config.mesh sizes ({named}) multiply to {math.prod(sizes)}, "
            f"but there are {num_devices} devices."
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all devices) with axes MESH_AXES sized by `mesh_cfg`.

    Axes are `Auto` so that `jax.jit(..., in_shardings=..., out_shardings=...)` propagates shardings the
    classic way (the trainer relies on that) instead of sharding-in-types.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(mesh_cfg, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)


def axis_size(mesh: jax.sharding.Mesh, axes: str | tuple[str, ...] | None) -> int:
    """Number of devices along one mesh axis, a tuple of axes (product), or None (1)."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in names if a not in mesh.shape]
    if unknown:
        raise InputError(f"mesh axes {unknown} are not in the mesh; its axes are {tuple(mesh.axis_names)}.")
    return math.prod(mesh.shape[a] for a in names)
