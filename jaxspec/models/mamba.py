"""Mamba-1 selective SSM mixer.

Parameter names and shapes follow Hugging Face `MambaMixer` (in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj) so its checkpoints map onto them. Full sequences use `jax.lax.associative_scan`; decoding keeps
the causal conv window and the SSM state; a tree forward computes each node's state from its parent's.
The mixer contract (modes, the MambaState it keeps, what commit does with its per-node states) is
`jaxspec.models.mixer.Mixer`.

Sequence parallelism (full forward under a mesh with a "sequence" axis of size > 1, see
`jaxspec.parallel.context`), the LASP-2 way: the recurrence h_t = a_t h_{t-1} + b_t is associative, so each
device scans its own chunk from zero, which also gives the chunk as one affine map h -> A h + B (A the
product of its decays, B its final state from zero; [B, d_inner, d_state] each, independent of T). One
all-gather of these summaries lets every device combine the maps of the chunks before it into its starting
state, and finish its chunk from there. The causal conv needs the last d_conv - 1 inputs of the previous
chunk: one `ppermute` of that halo.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxspec import config as config_lib
from jaxspec.models.layers import dtype_of
from jaxspec.models.step import Mode, Step
from jaxspec.parallel.context import SEQUENCE_AXIS, sequence_parallel_mesh
from jaxspec.parallel.lasp2 import outer_spec_entries
from jaxspec.state import MambaState


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def selective_scan(decay, inputs, h0):
    """h_t = decay_t * h_{t-1} + inputs_t over axis 1, from h0 [B, ...]. Returns all h [B, T, ...]."""
    a_cum, b_cum = jax.lax.associative_scan(_combine, (decay, inputs), axis=1)
    return a_cum * h0[:, None] + b_cum


def causal_conv(stream, conv_w, conv_b):
    """Depthwise causal conv. stream [B, d_conv - 1 + T, d]: the d_conv - 1 inputs before the T new ones,
    then those; conv_w [d, d_conv] (oldest tap first), conv_b [d]. Returns [B, T, d]."""
    d_conv = conv_w.shape[1]
    t = stream.shape[1] - (d_conv - 1)
    frames = jnp.stack([stream[:, i:i + t] for i in range(d_conv)], axis=2)  # [B, T, d_conv, d]
    return jnp.einsum("btjd,dj->btd", frames, conv_w) + conv_b


def selective_scan_sequential(decay, inputs, h0):
    """Reference recurrence of `selective_scan`, one step at a time."""

    def step(h, xs):
        h = xs[0] * h + xs[1]
        return h, h

    _, hs = jax.lax.scan(step, h0, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(inputs, 1, 0)))
    return jnp.moveaxis(hs, 0, 1)


def tree_selective_scan(decay, inputs, h0, parents):
    """Per-node states: h_i = decay_i * h_parent(i) + inputs_i (h_-1 = h0), parents [B, K] topological."""
    k = decay.shape[1]
    states = jnp.zeros_like(inputs)

    def node(i, states):
        p = parents[:, i]
        parent_state = jnp.take_along_axis(states, jnp.maximum(p, 0).reshape((-1,) + (1,) * (states.ndim - 1)),
                                           axis=1)[:, 0]
        parent_state = jnp.where((p >= 0).reshape((-1,) + (1,) * (h0.ndim - 1)), parent_state, h0)
        return states.at[:, i].set(decay[:, i] * parent_state + inputs[:, i])

    return jax.lax.fori_loop(0, k, node, states)


def tree_ancestor_table(parents, n: int):
    """[B, K, n]: entry j is the ancestor j steps above each node (j = 0 is the node), -1 past the root."""
    table = [jnp.broadcast_to(jnp.arange(parents.shape[1]), parents.shape)]
    for _ in range(n - 1):
        up = table[-1]
        table.append(jnp.where(up >= 0, jnp.take_along_axis(parents, jnp.maximum(up, 0), axis=1), -1))
    return jnp.stack(table, axis=-1)


# ------------------------------------------------------------------------- sequence parallelism


def chunk_start_state(chunk_decays, chunk_finals, index):
    """The state entering chunk `index` of a sequence whose state starts at zero.

    chunk_decays, chunk_finals [P, B, ...]: each chunk as the map h -> decay * h + final. The chunks before
    `index` are composed (an inclusive associative scan over P, then the entry before `index`).
    """
    _, finals = jax.lax.associative_scan(_combine, (chunk_decays, chunk_finals), axis=0)
    return jnp.where(index > 0, finals[jnp.maximum(index - 1, 0)], 0.0)


def _channel_specs(mesh, batch: int, channels: int, trailing: int) -> tuple[PartitionSpec, PartitionSpec]:
    """Specs of [B, T, d, *trailing] activations (batch over data/fsdp, T over sequence, d over tensor when
    it divides) and of the [d, ...] / [d] conv parameters."""
    batch_axes, channel_axis = outer_spec_entries(mesh, SEQUENCE_AXIS, batch, (channels,))
    return PartitionSpec(batch_axes, SEQUENCE_AXIS, channel_axis, *(None,) * trailing), PartitionSpec(channel_axis)


def _conv_chunk(xs, conv_w, conv_b, *, shards: int):
    n_conv = conv_w.shape[1] - 1
    # Each device passes its last n_conv inputs on to the next; the first device gets zeros (an empty window).
    halo = jax.lax.ppermute(xs[:, xs.shape[1] - n_conv:], SEQUENCE_AXIS, [(i, i + 1) for i in range(shards - 1)])
    return causal_conv(jnp.concatenate([halo, xs], axis=1), conv_w, conv_b)


def sequence_parallel_causal_conv(xs, conv_w, conv_b, *, mesh):
    """`causal_conv` of xs [B, T, d] after an empty window, with T split over the mesh's "sequence" axis."""
    act, chan = _channel_specs(mesh, xs.shape[0], xs.shape[2], trailing=0)
    body = functools.partial(_conv_chunk, shards=mesh.shape[SEQUENCE_AXIS])
    return jax.shard_map(body, mesh=mesh, in_specs=(act, chan, chan), out_specs=act)(xs, conv_w, conv_b)


def _scan_chunk(decay, inputs):
    a_cum, b_cum = jax.lax.associative_scan(_combine, (decay, inputs), axis=1)
    summary = jnp.stack([a_cum[:, -1], b_cum[:, -1]])  # this chunk as the map h -> A h + B
    gathered = jax.lax.all_gather(summary, SEQUENCE_AXIS)  # [P, 2, B, d, s]: one message, independent of T
    h0 = chunk_start_state(gathered[:, 0], gathered[:, 1], jax.lax.axis_index(SEQUENCE_AXIS))
    return a_cum * h0[:, None] + b_cum


def sequence_parallel_selective_scan(decay, inputs, *, mesh):
    """`selective_scan(decay, inputs, 0)` of [B, T, d_inner, d_state] with T split over "sequence"."""
    act, _ = _channel_specs(mesh, decay.shape[0], decay.shape[2], trailing=1)
    return jax.shard_map(_scan_chunk, mesh=mesh, in_specs=(act, act), out_specs=act)(decay, inputs)


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """Mamba's init: softplus(bias) spans [1e-3, 1e-1] log-uniformly, so early steps neither vanish nor explode."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, jnp.log(1e-3), jnp.log(1e-1)))
    return dt + jnp.log(-jnp.expm1(-dt))


class Mamba(nn.Module):
    model_cfg: Any

    @nn.compact
    def __call__(self, x, step: Step, cache: MambaState | None):
        cfg = self.model_cfg
        mb = cfg.mamba
        b, t, _ = x.shape
        d_inner, dt_rank = config_lib.mamba_dims(cfg)
        n_conv = mb.d_conv - 1
        dtype = dtype_of(cfg)
        xz = nn.Dense(2 * d_inner, use_bias=False, dtype=dtype, name="in_proj")(x).astype(jnp.float32)
        xs, z = xz[..., :d_inner], xz[..., d_inner:]
        conv_w = self.param("conv1d_weight", nn.initializers.lecun_normal(in_axis=-1, out_axis=0),
                            (d_inner, mb.d_conv), jnp.float32)
        conv_b = self.param("conv1d_bias", nn.initializers.zeros, (d_inner,), jnp.float32)
        mesh = None
        if step.mode == Mode.FULL and not self.is_initializing():  # init only shapes the parameters
            mesh = sequence_parallel_mesh(t, layer="Mamba layer", min_tokens_per_device=n_conv)
        window = jnp.zeros((b, n_conv, d_inner), jnp.float32) if cache is None else cache.conv
        stream = jnp.concatenate([window, xs], axis=1)  # [B, n_conv + T, d_inner]
        if step.mode == Mode.TREE:
            # Conv taps of node i: its ancestors j steps up, then the committed window once the tree ends.
            parents = step.parents
            depth = jnp.sum(step.mask, -1) - 1  # [B, K]
            anc = tree_ancestor_table(parents, mb.d_conv)  # [B, K, d_conv], j steps up
            j = jnp.arange(mb.d_conv)
            taps = jnp.where(anc >= 0, n_conv + anc, n_conv - (j - depth[..., None]))  # index into stream
            taps = taps[..., ::-1]  # oldest first, matching the conv kernel's order
            gathered = jax.vmap(lambda s, idx: s[idx])(stream, taps)  # [B, K, d_conv, d_inner]
            conv = jnp.einsum("bkjd,dj->bkd", gathered, conv_w) + conv_b
            node_windows = gathered[:, :, 1:]  # the last n_conv inputs up to each node
        elif mesh is not None:
            conv = sequence_parallel_causal_conv(xs, conv_w, conv_b, mesh=mesh)
        else:
            conv = causal_conv(stream, conv_w, conv_b)
        u = jax.nn.silu(conv)
        proj = nn.Dense(dt_rank + 2 * mb.d_state, use_bias=False, dtype=dtype, name="x_proj")(u)
        proj = proj.astype(jnp.float32)
        dt_in, bmat, cmat = jnp.split(proj, [dt_rank, dt_rank + mb.d_state], axis=-1)
        dt = jax.nn.softplus(nn.Dense(d_inner, use_bias=True, dtype=jnp.float32, bias_init=_dt_bias_init,
                                      name="dt_proj")(dt_in))
        a_log = self.param("A_log", lambda _, s: jnp.log(jnp.broadcast_to(
            jnp.arange(1, s[1] + 1, dtype=jnp.float32), s)), (d_inner, mb.d_state))
        d_skip = self.param("D", nn.initializers.ones, (d_inner,), jnp.float32)
        if step.valid is not None:  # padding: dt = 0 makes the step the identity on the state
            dt = dt * step.valid[..., None]
        decay = jnp.exp(dt[..., None] * -jnp.exp(a_log))  # [B, T, d_inner, d_state]
        inputs = (dt * u)[..., None] * bmat[:, :, None, :]
        h0 = jnp.zeros((b, d_inner, mb.d_state), jnp.float32) if cache is None else cache.ssm
        if step.mode == Mode.TREE:
            hs = tree_selective_scan(decay, inputs, h0, parents)
            new = MambaState(conv=node_windows, ssm=hs)
        elif mesh is not None:
            hs, new = sequence_parallel_selective_scan(decay, inputs, mesh=mesh), None
        else:
            hs = selective_scan(decay, inputs, h0)
            new = None
            if step.mode == Mode.EXTEND:
                count = jnp.sum(step.valid, axis=1) if step.valid is not None else jnp.full((b,), t)
                last = jnp.take_along_axis(hs, jnp.maximum(count - 1, 0)[:, None, None, None], axis=1)[:, 0]
                ssm = jnp.where((count > 0)[:, None, None], last, h0)
                conv_window = jax.vmap(lambda s, c: jax.lax.dynamic_slice_in_dim(s, c, n_conv, axis=0))(
                    stream, count)
                new = MambaState(conv=conv_window, ssm=ssm)
        y = jnp.einsum("btds,bts->btd", hs, cmat) + d_skip * u
        y = y * jax.nn.silu(z)
        return nn.Dense(cfg.d_model, use_bias=False, dtype=dtype, name="out_proj")(y.astype(dtype)), new
