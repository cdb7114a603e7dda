"""Causal GQA attention with RoPE: full forward, extend (prefill/append) and tree verify.

A layer may attend through a sliding window (key position j is visible to query position i iff
i - window < j <= i, as transformers' Gemma/Mistral), with its own RoPE base; queries and keys may be
RMS-normalised per head before RoPE (qk_norm), and scores may use a configured scale (query_scale).

Extend and tree verify are one computation: the new nodes attend to the committed cache plus the nodes
their mask allows (causal for extend, ancestors for a tree), through `pallas_kernels.tree_attention`.
Extend writes the new keys/values into the cache at once; a tree forward returns them as pending.
Under a mesh with a "sequence" axis of size > 1 (see `jaxspec.parallel.context`) the full forward is
sequence-parallel: LASP-2H all-gathers keys and values and each device attends with its own query chunk.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxspec import config as config_lib
from jaxspec.models.layers import RMSNorm, apply_rope, dtype_of
from jaxspec.models.step import Step
from jaxspec.parallel.context import SEQUENCE_AXIS, sequence_parallel_mesh
from jaxspec.parallel.lasp2 import lasp2h_attention
from jaxspec.state import KVCache, write_kv
from pallas_kernels.tree_attention import tree_attention


def causal_attention(q, k, v, *, model_cfg, mesh=None, window: int = 0):
    """Full causal attention over [B, H, T, D] (GQA: k/v [B, Hkv, T, D]) for training and plain forwards.

    `mesh`: a mesh whose "sequence" axis splits T (sequence parallelism through LASP-2H), or None.
    `window` > 0: each query sees only the `window` latest positions up to its own.
    """
    at = model_cfg.attention
    scale = model_cfg.query_scale or None  # None: 1/sqrt(head_dim)
    if mesh is not None:
        if at.prefill == "block_sparse":  # its block selection is approximate: no exact sharded equivalent
            raise ValueError("model.attention.prefill='block_sparse' is not supported with config.mesh.sequence > 1; "
                             "use prefill='dense'.")
        if window:
            raise ValueError(f"model.layer_windows: a sliding window ({window}) is not supported with "
                             "config.mesh.sequence > 1 (LASP-2H attends globally); use mesh.sequence=1.")
        if scale is not None:  # LASP-2H scores with 1/sqrt(head_dim): fold the configured scale into q
            q = (q * (scale * q.shape[-1] ** 0.5)).astype(q.dtype)
        return lasp2h_attention(q, k, v, mesh=mesh, axis=SEQUENCE_AXIS, causal=True)
    if at.prefill == "block_sparse":  # validate_model_config refuses it together with windows
        from pallas_kernels.block_sparse_attention import block_sparse_attention, three_state_block_mask
        from pallas_kernels.xattention import xattention_block_mask

        keep = xattention_block_mask(q, k, block_size=at.block_size, stride=at.xattention_stride,
                                     threshold=at.xattention_threshold, causal=True)
        mask = three_state_block_mask(keep, causal=True, block_q=at.block_size, block_k=at.block_size,
                                      q_len=q.shape[2], k_len=k.shape[2])
        return block_sparse_attention(q, k, v, mask, causal=True, block_q=at.block_size,
                                      block_k=at.block_size, scale=scale, implementation=at.implementation)
    # jax's window (left, right) keeps key j for query i iff i - left <= j <= i + right.
    local = (window - 1, 0) if window else None
    out = jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), scale=scale,
                                       is_causal=True, local_window_size=local)
    return out.swapaxes(1, 2)


class Attention(nn.Module):
    model_cfg: Any
    window: int = 0  # sliding window of this layer (0: global)
    rope_theta: float | None = None  # RoPE base of this layer (None: model_cfg.rope_theta)

    @nn.compact
    def __call__(self, x, step: Step, cache: KVCache | None):
        cfg = self.model_cfg
        b, t, _ = x.shape
        hd = config_lib.head_dim(cfg)
        dtype = dtype_of(cfg)
        theta = cfg.rope_theta if self.rope_theta is None else self.rope_theta
        dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=dtype, name=name)
        split = lambda y, n: y.reshape(b, t, n, hd).transpose(0, 2, 1, 3)
        q = split(dense(cfg.n_heads * hd, "q_proj", cfg.qkv_bias)(x), cfg.n_heads)
        k = split(dense(cfg.n_kv_heads * hd, "k_proj", cfg.qkv_bias)(x), cfg.n_kv_heads)
        v = split(dense(cfg.n_kv_heads * hd, "v_proj", cfg.qkv_bias)(x), cfg.n_kv_heads)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_eps, name="q_norm")(q)
            k = RMSNorm(cfg.rms_eps, name="k_norm")(k)
        q = apply_rope(q, step.positions, theta)
        k = apply_rope(k, step.positions, theta)
        if step.mode == "full":
            # init only shapes the parameters: its dummy sequence need not split over the mesh
            mesh = None if self.is_initializing() else sequence_parallel_mesh(t, layer="attention layer")
            out, new = causal_attention(q, k, v, model_cfg=cfg, mesh=mesh, window=self.window), None
        elif step.fresh:  # prefill into an empty cache: plain causal attention over the new tokens
            out = causal_attention(q, k, v, model_cfg=cfg, window=self.window)
            new = KVCache(write_kv(cache.k, k, step.lengths), write_kv(cache.v, v, step.lengths))
        else:
            out = tree_attention(q, cache.k, cache.v, step.lengths, k, v, step.mask, scale=cfg.query_scale or None,
                                 window=self.window, implementation=cfg.attention.implementation)
            if step.mode == "extend":
                new = KVCache(write_kv(cache.k, k, step.lengths), write_kv(cache.v, v, step.lengths))
            else:
                new = KVCache(k.astype(cache.k.dtype), v.astype(cache.v.dtype))
        out = out.transpose(0, 2, 1, 3).reshape(b, t, cfg.n_heads * hd)
        return dense(cfg.d_model, "o_proj", False)(out), new
