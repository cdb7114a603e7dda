"""LASP-2 and LASP-2H sequence parallelism with `jax.shard_map`.

The sequence is split into one contiguous chunk per device along a mesh axis (default "sequence").

LASP-2 (linear attention). Each device runs chunked linear attention on its own chunk from a zero state,
which gives the intra-chunk output and the chunk's memory state M_c = sum_t exp(sum_{s>t} a_s) k_t^T v_t
(a = log-decay). The memory states and the chunks' total log-decays g_c are packed into one array and
exchanged with a single all-gather whose size is independent of the sequence length. Each device then forms
the state of everything before it, S_{<c} = sum_{j<c} exp(sum_{j<i<c} g_i) M_j, and adds the inter-chunk term
exp(cumsum(a)_t) q_t S_{<c}. By linearity this equals running the chunk from the initial state S_{<c}; doing
it as intra + inter lets the intra-chunk work run while the all-gather is in flight.

LASP-2H (softmax attention in hybrids). K and V are all-gathered (one packed collective) and each device's
query chunk attends to them with its global position offset.

Both take and return global arrays; batch is additionally split over ("data", "fsdp") and heads over
"tensor" when those mesh axes exist, are larger than 1 and divide the dimension.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxspec.errors import InputError
from jaxspec.ops.linear_attention import chunked_linear_attention

BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXIS = "tensor"


def _check_sequence_split(mesh: jax.sharding.Mesh, axis: str, seq_len: int) -> None:
    if axis not in mesh.shape:
        raise InputError(f"mesh axis {axis!r} is not in the mesh; its axes are {tuple(mesh.axis_names)}.")
    shards = mesh.shape[axis]
    if seq_len % shards:
        raise InputError(
            f"sequence length {seq_len} is not divisible by the size {shards} of mesh axis {axis!r}; "
            "pad the sequence to a multiple of it."
        )


def outer_spec_entries(mesh, axis: str, batch: int, head_counts: tuple[int, ...]):
    """PartitionSpec entries for the batch and head dimensions (None where they stay replicated)."""
    batch_axes = tuple(a for a in BATCH_MESH_AXES if a != axis and mesh.shape.get(a, 1) > 1)
    if batch % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = ()
    tensor = mesh.shape.get(HEAD_MESH_AXIS, 1) if axis != HEAD_MESH_AXIS else 1
    heads = HEAD_MESH_AXIS if tensor > 1 and all(n % tensor == 0 for n in head_counts) else None
    return (batch_axes or None), heads


def _check_rank(name: str, x, rank: int, layout: str):
    if x.ndim != rank:
        raise InputError(f"{name} has shape {tuple(x.shape)}; expected {layout}.")


# ----------------------------------------------------------------------------------------------- LASP-2


def chunk_memory_state(k, v, log_decay=None):
    """M = sum_t exp(sum_{s>t} a_s) k_t^T v_t over the time axis of k [B,H,T,dk], v [B,H,T,dv] (float32)."""
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    if log_decay is not None:
        a = log_decay.astype(jnp.float32)
        after = jnp.cumsum(a[..., ::-1], axis=-1)[..., ::-1] - a  # sum of log-decays strictly after t
        k = k * jnp.exp(after)[..., None]
    return jnp.einsum("bhtk,bhtv->bhkv", k, v)


def combine_chunk_states(memories, chunk_log_decays, upto):
    """State after chunks [0, upto): sum_{j<upto} exp(sum_{j<i<upto} g_i) M_j.

    memories [P, B, H, dk, dv], chunk_log_decays [P, B, H], upto a (traced) integer in [0, P].
    The decay between chunks is summed directly (no difference of cumulative sums) to keep it exact.
    """
    idx = jnp.arange(memories.shape[0])
    between = (idx[None, :] > idx[:, None]) & (idx[None, :] < upto)  # [j, i]: chunk i lies between j and upto
    log_weight = jnp.einsum("ji,ibh->jbh", between.astype(jnp.float32), chunk_log_decays)
    weight = jnp.where((idx < upto)[:, None, None], jnp.exp(log_weight), 0.0)
    return jnp.einsum("jbh,jbhkv->bhkv", weight, memories)


def _gather_chunk_summaries(memory, chunk_log_decay, axis: str):
    """Every chunk's (memory state, total log-decay) from one all-gather of a packed array."""
    b, h, dk, dv = memory.shape
    packed = jnp.concatenate([memory.reshape(b, h, dk * dv), chunk_log_decay[..., None]], axis=-1)
    gathered = jax.lax.all_gather(packed.astype(jnp.float32), axis)  # [P, B, H, dk*dv + 1]
    return gathered[..., :-1].reshape(-1, b, h, dk, dv), gathered[..., -1]


def _total_log_decay(log_decay, like):
    if log_decay is None:
        return jnp.zeros(like.shape[:2], jnp.float32)
    return jnp.sum(log_decay.astype(jnp.float32), axis=-1)


def _spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    """Mesh axes named anywhere in a PartitionSpec."""
    names = []
    for entry in spec:
        names.extend((entry,) if isinstance(entry, str) else (entry or ()))
    return tuple(names)


def _lasp2_causal_chunk(q, k, v, log_decay, *, axis: str, chunk_size: int, varying: tuple[str, ...]):
    # The scan carry inside chunked_linear_attention must vary over the same mesh axes as q, k, v.
    zero = jnp.zeros((*q.shape[:2], q.shape[-1], v.shape[-1]), jnp.float32)
    zero = jax.lax.pcast(zero, varying, to="varying")
    intra, memory = chunked_linear_attention(q, k, v, log_decay, zero, chunk_size=chunk_size)
    memories, chunk_log_decays = _gather_chunk_summaries(memory, _total_log_decay(log_decay, q), axis)
    prefix = combine_chunk_states(memories, chunk_log_decays, jax.lax.axis_index(axis))
    inter = jnp.einsum("bhtk,bhkv->bhtv", q.astype(jnp.float32), prefix)
    if log_decay is not None:
        inter = inter * jnp.exp(jnp.cumsum(log_decay.astype(jnp.float32), axis=-1))[..., None]
    return intra + inter


def _lasp2_bidirectional_chunk(q, k, v, log_decay, *, axis: str, chunk_size: int, varying: tuple[str, ...]):
    del chunk_size, varying  # no intra-chunk scan
    memory = chunk_memory_state(k, v, log_decay)
    memories, chunk_log_decays = _gather_chunk_summaries(memory, _total_log_decay(log_decay, q), axis)
    total = combine_chunk_states(memories, chunk_log_decays, memories.shape[0])
    return jnp.einsum("bhtk,bhkv->bhtv", q.astype(jnp.float32), total)


def lasp2_linear_attention(q, k, v, log_decay=None, *, mesh, axis="sequence", causal=True, chunk_size=64):
    """Sequence-parallel linear attention; equals `chunked_linear_attention(q, k, v, log_decay)[0]`.

    q, k [B, H, T, dk] (feature-mapped), v [B, H, T, dv], log_decay None or [B, H, T] (<= 0); T must be a
    multiple of the size of mesh axis `axis`. causal=False gives o_t = q_t S_T, the query against the state
    of the whole sequence (with decay: each token's k^T v decayed to the end of the sequence).
    """
    _check_rank("q", q, 4, "[B, H, T, dk]")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or v.ndim != 4:
        raise InputError(
            f"k {tuple(k.shape)} must equal q {tuple(q.shape)}, and v {tuple(v.shape)} must be [B, H, T, dv]."
        )
    if log_decay is not None and log_decay.shape != q.shape[:3]:
        raise InputError(f"log_decay has shape {tuple(log_decay.shape)}; expected [B, H, T] = {q.shape[:3]}.")
    _check_sequence_split(mesh, axis, q.shape[2])
    batch, heads = outer_spec_entries(mesh, axis, q.shape[0], (q.shape[1],))
    spec = PartitionSpec(batch, heads, axis, None)
    body = _lasp2_causal_chunk if causal else _lasp2_bidirectional_chunk
    body = functools.partial(body, axis=axis, chunk_size=chunk_size, varying=_spec_axes(spec))
    if log_decay is None:
        run = lambda q, k, v: body(q, k, v, None)
        return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)
    decay_spec = PartitionSpec(batch, heads, axis)
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, decay_spec), out_specs=spec)
    return sharded(q, k, v, log_decay)


# ---------------------------------------------------------------------------------------------- LASP-2H


def _lasp2h_chunk(q, k, v, *, axis: str, causal: bool):
    head_dim = k.shape[-1]
    kv = jax.lax.all_gather(jnp.concatenate([k, v], axis=-1), axis, axis=2, tiled=True)
    keys, values = kv[..., :head_dim], kv[..., head_dim:]
    mask = None
    if causal:
        chunk = q.shape[2]
        query_pos = jax.lax.axis_index(axis) * chunk + jnp.arange(chunk)
        mask = (jnp.arange(keys.shape[2])[None, :] <= query_pos[:, None])[None, None]
    heads_last = lambda x: x.swapaxes(1, 2)  # dot_product_attention wants [B, T, heads, D]
    out = jax.nn.dot_product_attention(heads_last(q), heads_last(keys), heads_last(values), mask=mask)
    return heads_last(out)


def lasp2h_attention(q, k, v, *, mesh, axis="sequence", causal=True):
    """Sequence-parallel softmax attention (GQA); equals single-device `jax.nn.dot_product_attention`.

    q [B, H, T, D], k and v [B, Hkv, T, D] with H a multiple of Hkv; T a multiple of the size of `axis`.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_rank(name, x, 4, "[B, heads, T, D]")
    kv_matches_q = k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:]
    if k.shape != v.shape or not kv_matches_q or q.shape[1] % k.shape[1]:
        raise InputError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q [B, H, T, D] and "
            "k, v [B, Hkv, T, D] with H a multiple of Hkv."
        )
    _check_sequence_split(mesh, axis, q.shape[2])
    batch, heads = outer_spec_entries(mesh, axis, q.shape[0], (q.shape[1], k.shape[1]))
    spec = PartitionSpec(batch, heads, axis, None)
    body = functools.partial(_lasp2h_chunk, axis=axis, causal=causal)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)
