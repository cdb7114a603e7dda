"""Building blocks: RMSNorm, rotary embeddings, and the gated FFN (SwiGLU or GeGLU) with MatFormer nesting."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def dtype_of(model_cfg) -> Dtype:
    return jnp.dtype(model_cfg.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


def rope_frequencies(positions, head_dim: int, theta: float):
    """cos/sin tables [..., head_dim] for integer positions [...] (half-split layout, as Llama)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, positions, theta: float):
    """x [B, H, T, D] rotated by per-row positions [B, T]."""
    cos, sin = rope_frequencies(positions, x.shape[-1], theta)
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def gate_activation(name: str):
    """The FFN gate nonlinearity: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, gelu's tanh approximation)."""
    if name == "silu":
        return nn.silu
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"FFN activation {name!r} is not known; allowed: 'silu', 'gelu_tanh'")


class MatFormerFFN(nn.Module):
    """Gated FFN (act(x W_gate) * x W_up) W_down whose granularities are prefix slices of one set of weights.

    Granularity g uses the first `hidden_sizes[g]` rows of gate/up and columns of down, so every smaller
    FFN is nested inside the larger ones (MatFormer). With one granularity this is a plain gated FFN.
    """

    d_model: int
    hidden_sizes: tuple[int, ...]
    dtype: Dtype = jnp.float32
    activation: str = "silu"  # see gate_activation

    @nn.compact
    def __call__(self, x, granularity: int | None = None):
        d_ff = self.hidden_sizes[-1]
        init = nn.initializers.lecun_normal()
        gate = self.param("gate_proj", init, (self.d_model, d_ff), jnp.float32)
        up = self.param("up_proj", init, (self.d_model, d_ff), jnp.float32)
        down = self.param("down_proj", init, (d_ff, self.d_model), jnp.float32)
        h = self.hidden_sizes[-1 if granularity is None else granularity]
        x = x.astype(self.dtype)
        g = x @ gate[:, :h].astype(self.dtype)
        u = x @ up[:, :h].astype(self.dtype)
        return (gate_activation(self.activation)(g) * u) @ down[:h].astype(self.dtype)
