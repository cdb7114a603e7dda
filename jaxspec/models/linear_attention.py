"""Linear attention with optional per-head decay (RetNet / Lightning style): the layer. Its math is in
jaxspec/ops/linear_attention.py.

Recurrence per head: S_t = exp(log_decay_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t  (state d_k x d_v).
`chunked_linear_attention` computes it in parallel within chunks and carries S across chunks (training,
prefill); `recurrent_linear_attention` is the step-by-step reference; a tree forward computes every
node's state from its ancestors (exact, see `tree_linear_attention`). Under a mesh with a "sequence" axis
of size > 1 (see `jaxspec.parallel.context`) the full forward is sequence-parallel through LASP-2.
The mixer contract (modes, the LinearState it keeps, what commit does with its per-node states) is
`jaxspec.models.mixer.Mixer`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspec import config as config_lib
from jaxspec.models.layers import dtype_of
from jaxspec.models.step import Mode, Step
from jaxspec.ops.linear_attention import chunked_linear_attention, tree_linear_attention
from jaxspec.parallel.context import SEQUENCE_AXIS, sequence_parallel_mesh
from jaxspec.parallel.lasp2 import lasp2_linear_attention
from jaxspec.state import LinearState


def feature_map(x, kind: str):
    if kind == "elu1":
        return jax.nn.elu(x) + 1.0
    if kind == "relu":
        return jax.nn.relu(x)
    return x


def head_log_decays(model_cfg):
    """RetNet's fixed per-head decays gamma_h = 1 - 2^(-5-h), as logs; zeros when decay is off."""
    h = model_cfg.n_heads
    if model_cfg.linear_attention.decay == "none":
        return jnp.zeros((h,), jnp.float32)
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(h, dtype=jnp.float32))))


class LinearAttention(nn.Module):
    model_cfg: Any

    @nn.compact
    def __call__(self, x, step: Step, cache: LinearState | None):
        cfg = self.model_cfg
        la = cfg.linear_attention
        b, t, _ = x.shape
        h, hd = cfg.n_heads, config_lib.head_dim(cfg)
        dtype = dtype_of(cfg)
        proj = lambda name: nn.Dense(h * hd, use_bias=False, dtype=dtype, name=name)(x).reshape(
            b, t, h, hd).transpose(0, 2, 1, 3).astype(jnp.float32)
        q = feature_map(proj("q_proj"), la.feature_map) * hd**-0.5
        k = feature_map(proj("k_proj"), la.feature_map)
        v = proj("v_proj")
        log_g = head_log_decays(cfg)
        if step.mode == Mode.TREE:
            out, node_states = tree_linear_attention(q, k, v, log_g, cache.s, step.mask)
            new = LinearState(node_states)
        else:
            a = jnp.broadcast_to(log_g[None, :, None], (b, h, t))
            if step.valid is not None:  # padding must neither add to nor decay the state
                keep = step.valid[:, None, :]
                a, k, v = jnp.where(keep, a, 0.0), k * keep[..., None], v * keep[..., None]
            mesh = None
            if step.mode == Mode.FULL and not self.is_initializing():  # init only shapes the parameters
                mesh = sequence_parallel_mesh(t, layer="linear attention layer")
            if mesh is not None:

                out = lasp2_linear_attention(q, k, v, a, mesh=mesh, axis=SEQUENCE_AXIS, chunk_size=la.chunk_size)
                new = None
            else:
                init = None if cache is None else cache.s
                out, final = chunked_linear_attention(q, k, v, a, init, chunk_size=la.chunk_size)
                new = None if step.mode == Mode.FULL else LinearState(final)
        # Per-head RMS normalisation of the output (RetNet's group norm): keeps scales sane without decay.
        out = out.transpose(0, 2, 1, 3)
        out = out * jax.lax.rsqrt(jnp.mean(out * out, axis=-1, keepdims=True) + cfg.rms_eps)
        scale = self.param("out_norm", nn.initializers.ones, (h * hd,), jnp.float32)
        out = (out.reshape(b, t, h * hd) * scale).astype(dtype)
        return nn.Dense(cfg.d_model, use_bias=False, dtype=dtype, name="o_proj")(out), new
