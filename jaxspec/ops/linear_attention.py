"""Linear attention's math, with no layer around it: the chunked parallel form, its step-by-step reference, and
the exact per-node states of a token tree. The model's layer (jaxspec/models/linear_attention.py) and LASP-2
(jaxspec/parallel/lasp2.py) both build on it.

Recurrence per head: S_t = exp(log_decay_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t  (state d_k x d_v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _full_log_decay(log_decay, b, h, t):
    if log_decay is None:
        return jnp.zeros((b, h, t), jnp.float32)
    return jnp.broadcast_to(jnp.asarray(log_decay, jnp.float32), (b, h, t))


def _zero_state(k, v):
    """Zeros [B, H, dk, dv] computed from k and v (an empty sum), so inside `jax.shard_map` the scan carry
    varies over the same mesh axes as its inputs."""
    return jnp.einsum("bhtd,bhte->bhde", k[:, :, :0].astype(jnp.float32), v[:, :, :0].astype(jnp.float32))


def chunked_linear_attention(q, k, v, log_decay=None, initial_state=None, *, chunk_size=64):
    """q, k [B, H, T, dk], v [B, H, T, dv], log_decay None or [B, H, T] (<= 0) -> (o [B,H,T,dv], S [B,H,dk,dv])."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    a = _full_log_decay(log_decay, b, h, t)
    pad4 = ((0, 0), (0, 0), (0, pad), (0, 0))
    # Zero keys/values and zero log-decay on padding leave the state untouched.
    qc, kc, vc = (jnp.pad(x.astype(jnp.float32), pad4).reshape(b, h, n, c, -1).transpose(2, 0, 1, 3, 4)
                  for x in (q, k, v))
    ac = jnp.pad(a, ((0, 0), (0, 0), (0, pad))).reshape(b, h, n, c).transpose(2, 0, 1, 3)
    s0 = _zero_state(k, v) if initial_state is None else initial_state.astype(jnp.float32)
    causal = jnp.tril(jnp.ones((c, c), bool))

    def chunk(state, inputs):
        qi, ki, vi, ai = inputs
        cum = jnp.cumsum(ai, axis=-1)  # [B, H, C] log-decay from chunk start through t
        diff = jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf)
        scores = jnp.einsum("bhtd,bhsd->bhts", qi, ki) * jnp.exp(diff)
        out = scores @ vi + jnp.exp(cum)[..., None] * (qi @ state)
        tail = jnp.exp(cum[..., -1:] - cum)  # decay from s to the chunk's end
        state = jnp.exp(cum[..., -1])[..., None, None] * state + jnp.einsum("bhs,bhsd,bhse->bhde", tail, ki, vi)
        return state, out

    state, out = jax.lax.scan(chunk, s0, (qc, kc, vc, ac))
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, n * c, dv)[:, :, :t]
    return out, state


def recurrent_linear_attention(q, k, v, log_decay=None, initial_state=None, *, chunk_size=None):
    """Step-by-step reference of `chunked_linear_attention` (same signature; chunk_size ignored)."""
    b, h, t, _ = q.shape
    a = _full_log_decay(log_decay, b, h, t)
    s0 = _zero_state(k, v) if initial_state is None else initial_state.astype(jnp.float32)

    def step(state, inputs):
        qt, kt, vt, at = inputs
        state = jnp.exp(at)[..., None, None] * state + kt[..., :, None] * vt[..., None, :]
        return state, jnp.einsum("bhd,bhde->bhe", qt, state)

    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 2, 0) for x in (q, k, v, a))
    state, out = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(out, 0, 2), state


def tree_linear_attention(q, k, v, head_log_decay, initial_state, ancestor_mask):
    """Per-node exact states for tree nodes: S_i = g^(d_i+1) S_ctx + sum_{j anc i} g^(d_i-d_j) k_j^T v_j.

    q, k [B, H, K, dk], v [B, H, K, dv], head_log_decay [H] (log g, <= 0), initial_state [B, H, dk, dv],
    ancestor_mask [B, K, K]. Returns (o [B, H, K, dv], node_states [B, K, H, dk, dv]).
    """
    depth = (jnp.sum(ancestor_mask, -1) - 1).astype(jnp.float32)  # [B, K]
    g = head_log_decay[None, :, None, None]  # [1, H, 1, 1]
    rel = depth[:, None, :, None] - depth[:, None, None, :]  # [B, 1, K, K]
    weights = jnp.where(ancestor_mask[:, None], jnp.exp(g * jnp.where(ancestor_mask[:, None], rel, 0.0)), 0.0)
    ctx_decay = jnp.exp(g[..., 0] * (depth[:, None, :] + 1))  # [B, H, K]
    states = (ctx_decay.transpose(0, 2, 1)[..., None, None] * initial_state[:, None]
              + jnp.einsum("bhij,bhjd,bhje->bihde", weights, k.astype(jnp.float32), v.astype(jnp.float32)))
    out = jnp.einsum("bhid,bihde->bhie", q.astype(jnp.float32), states)
    return out, states
