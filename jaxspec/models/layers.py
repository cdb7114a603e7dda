"""Building blocks: RMSNorm, rotary embeddings, the gated FFN (SwiGLU or GeGLU) with MatFormer nesting, and the
projections of the decode layout (fused; every kernel stored [out, in], float32 or int8 per output channel).

How `matmul_t` runs a product over an [out, in] kernel on XLA's CPU backend (measured on 2-core CPUs, see
benchmarks/step_cost.py):
  * One row, float32: a contraction on the stored rows' axis (einsum), which streams [out, in] as fast as
    XLA's product over [in, out]; `x @ w.T` (a transpose, then a product) ran ~1.6x slower on the layer kernels.
  * One row, int8: `x @ w.T` becomes one loop over the stored rows with the transpose and the int8 conversion
    fused into it, so int8 streams a quarter of the bytes.
  * 2..SMALL_ROWS rows: XLA's matmul packs the whole weight matrix first, about twice the time of one row
    although both read the same bytes. Where it builds (x86-64, AVX2), the CPU kernel of
    jaxspec.ops.small_rows_matmul reads each [out, in] row once for all input rows (int8 widened in
    registers): 1.2-1.6x faster than XLA's products at 2-8 rows. Elsewhere, a multiply-and-sum over the input
    dimension does the same in XLA, less fast.
  * Any other dot over an int8 kernel converts all of it to float first, so many rows dequantise explicitly.
  * The cheap ops producing a one-row input are fused into that loop and rerun for every output row, so what
    feeds these products should end in a reduction (see the extend attention in pallas_kernels.tree_attention).
  * Inside a scan over layers a kernel arrives as LayerRows (models/layer_scan.py): the CPU kernel reads the
    layer's rows in place for 1..SMALL_ROWS rows; any other product slices the stack first (a copy on CPU).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspec.errors import InputError
from jaxspec.models.layer_scan import LayerRows
from jaxspec.ops import small_rows_matmul

Dtype = jnp.dtype

# Row counts (tokens x batch) up to which a CPU product over an [out, in] kernel multiplies and sums.
SMALL_ROWS = 16


def dtype_of(model_cfg) -> Dtype:
    return jnp.dtype(model_cfg.dtype)


def weight_dtype_of(model_cfg) -> str:
    """Storage of the decode layout's projection weights: "float32" or "int8" (configs saved before the key
    existed are float32)."""
    return model_cfg.get("weight_dtype", "float32")


def streams_rows(rows: int, dtype, fewest: int = 2) -> bool:
    """Whether a product of `rows` input rows over an [out, in] kernel takes the few-rows path (CPU, float32,
    fewest..SMALL_ROWS rows): the CPU kernel where it builds, else XLA's multiply-and-sum."""
    return fewest <= rows <= SMALL_ROWS and jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu"


def _on_cpu_kernel(rows: int, dtype, kernel_t, fewest: int = 2) -> bool:
    """Whether the CPU kernel of jaxspec.ops.small_rows_matmul takes this product (see `streams_rows`)."""
    return (streams_rows(rows, dtype, fewest) and kernel_t.dtype in (jnp.float32, jnp.int8)
            and small_rows_matmul.available())


def matmul_t(x, kernel_t, scale=None, dtype=jnp.float32):
    """x [..., in] times kernel_t [out, in] transposed: [..., out] in `dtype`.

    `kernel_t` may be int8 with `scale` [out] (per output channel), and a LayerRows (a scanned layer's kernel in
    its stack). See the module docstring for the forms.
    """
    if x.shape[-1] != kernel_t.shape[1]:
        raise InputError(f"matmul_t: input has {x.shape[-1]} features, kernel_t {kernel_t.shape} expects "
                         f"{kernel_t.shape[1]}")
    if isinstance(kernel_t, LayerRows):
        rows = math.prod(x.shape[:-1])
        if _on_cpu_kernel(rows, dtype, kernel_t, fewest=1):  # one row too: a slice would be a copy
            y = small_rows_matmul.small_rows_matmul(x.reshape(rows, x.shape[-1]), kernel_t.stack, scale,
                                                    kernel_t.index)
            return y.reshape(*x.shape[:-1], kernel_t.shape[0])
        kernel_t = kernel_t.value()
    rows = math.prod(x.shape[:-1])
    if rows == 1 and scale is None and kernel_t.dtype == dtype:
        # A contraction on the stored rows' axis: XLA's one-row product streams [out, in] as fast as [in, out]
        # this way, while `x @ kernel_t.T` (a transpose, then a product) runs ~1.6x slower on the layer kernels.
        y = jnp.einsum("ri,oi->ro", x.reshape(1, x.shape[-1]).astype(dtype), kernel_t)
        y = y.reshape(*x.shape[:-1], kernel_t.shape[0])
    elif rows == 1:  # a 2-D product: XLA fuses the transpose and the int8 conversion into one pass (not for 3-D)
        y = x.reshape(1, x.shape[-1]).astype(dtype) @ kernel_t.astype(dtype).T
        y = y.reshape(*x.shape[:-1], kernel_t.shape[0])
    elif _on_cpu_kernel(rows, dtype, kernel_t):
        y = small_rows_matmul.small_rows_matmul(x.reshape(rows, x.shape[-1]), kernel_t, scale)
        return y.reshape(*x.shape[:-1], kernel_t.shape[0])
    elif streams_rows(rows, dtype):
        # The multiply-and-sum runs much slower on 5-7 or 9-15 rows than on a multiple of 8; zero rows cost a
        # little arithmetic while the weights stream once either way.
        padded = rows if rows <= 4 else -(-rows // 8) * 8
        x2 = jnp.pad(x.reshape(rows, x.shape[-1]).astype(dtype), ((0, padded - rows), (0, 0)))
        y = jnp.sum(x2[:, None, :] * kernel_t.astype(dtype)[None], axis=-1)[:rows]
        y = y.reshape(*x.shape[:-1], kernel_t.shape[0])
    else:
        weight = kernel_t.astype(dtype)
        if scale is not None:  # many rows: dequantise once (any other dot converts all of it anyway)
            weight, scale = weight * scale.astype(dtype)[:, None], None
        # No reshape of the leading axes: they keep their sharding (batch, and sequence under LASP-2).
        y = jnp.einsum("...i,oi->...o", x.astype(dtype), weight)
    if scale is not None:
        y = y * scale.astype(dtype)
    return y


def quantize_int8(kernel_t):
    """(int8 [out, in], scale [out] float32): symmetric per output row, scale = max |row| / 127 (1 for zero rows)."""
    w = jnp.asarray(kernel_t, jnp.float32)
    if w.ndim != 2:
        raise InputError(f"quantize_int8: expected a 2-D [out, in] kernel, got shape {w.shape}")
    peak = jnp.max(jnp.abs(w), axis=1)
    scale = jnp.where(peak > 0, peak / 127.0, 1.0)
    return jnp.clip(jnp.round(w / scale[:, None]), -127, 127).astype(jnp.int8), scale


class Linear(nn.Module):
    """Dense layer of the decode layout: y = x W (+ bias) for W [in_features, out_features], stored transposed.

    weight_dtype "float32": `kernel_t` [out, in] float32 (W = kernel_t.T). "int8": `kernel_t` [out, in] int8 and
    a float32 `scale` per output row (W = (kernel_t * scale[:, None]).T). [out, in] rows are what the CPU kernel
    of a few rows reads (see `matmul_t`). `outputs=(start, stop)` computes only those outputs and `in_prefix`
    uses only the first inputs (MatFormer granularities).
    """

    in_features: int
    out_features: int
    use_bias: bool = False
    weight_dtype: str = "float32"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, outputs: tuple[int, int] | None = None, in_prefix: int | None = None):
        lo, hi = (0, self.out_features) if outputs is None else outputs
        in_n = self.in_features if in_prefix is None else in_prefix
        if self.weight_dtype not in ("float32", "int8"):
            raise InputError(f"Linear: weight_dtype={self.weight_dtype!r} is not one of ('float32', 'int8')")
        int8 = self.weight_dtype == "int8"  # int8 weights are converted, not trained: zeros until loaded
        init = nn.initializers.zeros if int8 else nn.initializers.lecun_normal(in_axis=1, out_axis=0)
        shape = (self.out_features, self.in_features)
        kernel_t = self._kernel(init, shape, jnp.int8 if int8 else jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (self.out_features,), jnp.float32)[lo:hi] if int8 else None
        if (lo, hi, in_n) != (0, self.out_features, self.in_features):
            kernel_t = (kernel_t.value() if isinstance(kernel_t, LayerRows) else kernel_t)[lo:hi, :in_n]
        y = matmul_t(x, kernel_t, scale, self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.out_features,), jnp.float32)
            y = y + bias[lo:hi].astype(y.dtype)
        return y

    def _kernel(self, init, shape, dtype):
        """`kernel_t`: the stored array, or the LayerRows a scan over layers passes in its place (flax's `param`
        would check it against the array's shape, which a stack does not have)."""
        if self.has_variable("params", "kernel_t"):
            stored = self.get_variable("params", "kernel_t")
            if isinstance(stored, LayerRows):
                if stored.shape != shape:
                    raise InputError(f"Linear {self.name}: kernel_t has shape {stored.shape} in its layer stack, "
                                     f"expected {shape}")
                return stored
        return self.param("kernel_t", init, shape, dtype)


class VocabProjection(nn.Module):
    """The decode layout of an untied LM head: logits = x kernel_t^T, kernel_t [vocab, features] (float32, or
    int8 with a float32 `scale` per vocabulary row), stored as a tied embedding is."""

    features: int
    vocab_size: int
    weight_dtype: str = "float32"

    @nn.compact
    def __call__(self, hidden):
        shape = (self.vocab_size, self.features)
        if self.weight_dtype == "int8":
            kernel_t = self.param("kernel_t", nn.initializers.zeros, shape, jnp.int8)
            scale = self.param("scale", nn.initializers.ones, (self.vocab_size,), jnp.float32)
        else:
            kernel_t = self.param("kernel_t", nn.initializers.lecun_normal(in_axis=1, out_axis=0), shape,
                                  jnp.float32)
            scale = None
        return matmul_t(hidden, kernel_t, scale, jnp.float32)


class Embed(nn.Module):
    """Token embedding [vocab, features] that can also project onto the vocabulary (a tied LM head).

    Parameters as flax's nn.Embed ("embedding", float32); weight_dtype "int8" stores it as int8 with a
    float32 `scale` per vocabulary row (the decode layout of a tied head).
    """

    num_embeddings: int
    features: int
    weight_dtype: str = "float32"

    def setup(self):
        shape = (self.num_embeddings, self.features)
        if self.weight_dtype == "int8":
            self.embedding = self.param("embedding", nn.initializers.zeros, shape, jnp.int8)
            self.scale = self.param("scale", nn.initializers.ones, (self.num_embeddings,), jnp.float32)
        else:
            self.embedding = self.param("embedding", nn.initializers.normal(0.02), shape, jnp.float32)
            self.scale = None

    def __call__(self, tokens):
        rows = jnp.take(self.embedding, tokens, axis=0).astype(jnp.float32)
        if self.scale is None:
            return rows
        return rows * jnp.take(self.scale, tokens, axis=0)[..., None]

    def attend(self, hidden):
        """Logits [..., vocab] float32 of hidden states [..., features]."""
        return matmul_t(hidden, self.embedding, self.scale, jnp.float32)


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
    raise InputError(f"FFN activation {name!r} is not known; allowed: 'silu', 'gelu_tanh'")


class MatFormerFFN(nn.Module):
    """Gated FFN (act(x W_gate) * x W_up) W_down whose granularities are prefix slices of one set of weights.

    Granularity g uses the first `hidden_sizes[g]` rows of gate/up and columns of down, so every smaller
    FFN is nested inside the larger ones (MatFormer). With one granularity this is a plain gated FFN.

    layout "standard": gate_proj, up_proj [d_model, d_ff] and down_proj [d_ff, d_model].
    layout "decode": gate_up (Linear, d_model -> 2 d_ff: the gate's outputs, then the up projection's; the full
    width is one product, a smaller granularity two) and down_proj (Linear, d_ff -> d_model).
    """

    d_model: int
    hidden_sizes: tuple[int, ...]
    dtype: Dtype = jnp.float32
    activation: str = "silu"  # see gate_activation
    layout: str = "standard"
    weight_dtype: str = "float32"  # decode layout only

    @nn.compact
    def __call__(self, x, granularity: int | None = None):
        d_ff = self.hidden_sizes[-1]
        if self.layout == "decode":
            return self._decode(x, d_ff, self.hidden_sizes[-1 if granularity is None else granularity])
        init = nn.initializers.lecun_normal()
        gate = self.param("gate_proj", init, (self.d_model, d_ff), jnp.float32)
        up = self.param("up_proj", init, (self.d_model, d_ff), jnp.float32)
        down = self.param("down_proj", init, (d_ff, self.d_model), jnp.float32)
        h = self.hidden_sizes[-1 if granularity is None else granularity]
        x = x.astype(self.dtype)
        g = x @ gate[:, :h].astype(self.dtype)
        u = x @ up[:, :h].astype(self.dtype)
        return (gate_activation(self.activation)(g) * u) @ down[:h].astype(self.dtype)

    def _decode(self, x, d_ff: int, h: int):
        gate_up = Linear(self.d_model, 2 * d_ff, weight_dtype=self.weight_dtype, dtype=self.dtype, name="gate_up")
        if h == d_ff:
            both = gate_up(x)
            gate, up = both[..., :d_ff], both[..., d_ff:]
        else:
            gate, up = gate_up(x, outputs=(0, h)), gate_up(x, outputs=(d_ff, d_ff + h))
        down = Linear(d_ff, self.d_model, weight_dtype=self.weight_dtype, dtype=self.dtype, name="down_proj")
        return down(gate_activation(self.activation)(gate) * up, in_prefix=h)
