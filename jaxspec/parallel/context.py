"""Is the model running under sequence parallelism? The answer comes from the ambient mesh.

A forward is sequence-parallel when it is traced under a mesh whose "sequence" axis has more than one
device. The mesh is the one set by the caller around the jitted call,

    with jax.set_mesh(mesh):
        loss, grads = train_step(params, batch)

and is read inside the trace with `jax.sharding.get_abstract_mesh()`. jit keys its cache on that mesh, so
the same function traced with and without it compiles twice, each version correct for its context. Model
code therefore needs no mesh argument: full-mode mixers ask `sequence_parallel_mesh(T)` and pick LASP-2 /
LASP-2H (or the chunked Mamba scan) when it returns a mesh. Decoding never enters a mesh context, so it is
unaffected. `jax.set_mesh` (not `jax.sharding.use_abstract_mesh`) is the supported entry point: it also
provides the concrete devices that `jax.shard_map` over the abstract mesh lowers to.
"""

from __future__ import annotations

import jax
from jax.sharding import AbstractMesh, AxisType

from jaxspec.errors import InputError

SEQUENCE_AXIS = "sequence"


def sequence_parallel_mesh(seq_len: int, *, layer: str, min_tokens_per_device: int = 1,
                           axis: str = SEQUENCE_AXIS) -> AbstractMesh | None:
    """The ambient mesh if it splits `axis` over more than one device, else None.

    When it does, `seq_len` (the global length of the forward) must split into equal chunks of at least
    `min_tokens_per_device` tokens; otherwise an InputError names `layer`, the length and `config.mesh.<axis>`.
    Calling this inside a `jax.shard_map` that has already split `axis` is an error: the mixer would only see
    its local chunk.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(axis, 1) == 1:
        return None
    shards = mesh.shape[axis]
    if dict(zip(mesh.axis_names, mesh.axis_types))[axis] == AxisType.Manual:
        raise InputError(
            f"{layer}: mesh axis {axis!r} is already split by an enclosing jax.shard_map; call the model on "
            f"global arrays under jax.set_mesh(mesh) and it splits the sequence itself."
        )
    if seq_len % shards:
        raise InputError(
            f"{layer}: sequence length {seq_len} is not divisible by config.mesh.{axis}={shards}; use a "
            f"sequence length (data.seq_len) that is a multiple of it."
        )
    if seq_len // shards < min_tokens_per_device:
        raise InputError(
            f"{layer}: sequence length {seq_len} over config.mesh.{axis}={shards} leaves {seq_len // shards} "
            f"tokens per device; this layer needs at least {min_tokens_per_device}."
        )
    return mesh
