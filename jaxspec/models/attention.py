"""Causal GQA attention with RoPE: full forward, extend (prefill/append) and tree verify.

A layer may attend through a sliding window (key position j is visible to query position i iff
i - window < j <= i, as transformers' Gemma/Mistral), with its own RoPE base; queries and keys may be
RMS-normalised per head before RoPE (qk_norm), and scores may use a configured scale (query_scale).

Extend and tree verify are one computation: the new nodes attend to the committed cache plus the nodes
their mask allows (causal for extend, ancestors for a tree), through `pallas_kernels.tree_attention`.
Extend writes the new keys/values into the cache first and then reads it, so inside a decode loop the cache
is updated in place and never copied: on the XLA path each new node attends to the cache up to its own
position (`jaxspec.ops.cached_attention`: a CPU kernel where it builds, else XLA's ops), on the kernel path to
the committed entries plus the nodes as the tree block. A tree forward only reads the cache and returns its
keys/values as pending.
In the decode layout (see models/decode_layout.py) q, k and v come from one fused projection.
Under a mesh with a "sequence" axis of size > 1 (see `jaxspec.parallel.context`) the full forward is
sequence-parallel: LASP-2H all-gathers keys and values and each device attends with its own query chunk.
With a budgeted cache in the state (`state.HeavyHitterCache`, DecoderLM's `kv_budget` option) extend and tree
attend to the kept keys only (`jaxspec.ops.heavy_hitter`: H2O eviction). With a shared-prefix cache
(`state.SharedPrefixCache`: prompts that share a beginning, `api.generate(shared_prefix=True)`) they attend to the one
prefix, read once for all rows, and to each row's suffix (`pallas_kernels.shared_prefix_attention`, Hydragen).
Inside a scan over layers (models/layer_scan.py) a KVCache's k and v may be `LayerRows` views of the scanned
layers' cache stacks: extend writes its rows into the stack and the CPU attention kernel reads the layer where it
lies, so no layer's cache is copied out of the stack or back.
The mixer contract (modes, the KVCache it keeps, what commit does with its pending keys/values) is
`jaxspec.models.mixer.Mixer`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspec import config as config_lib
from jaxspec.errors import InputError
from jaxspec.models.layer_scan import LayerRows
from jaxspec.models.layers import Linear, RMSNorm, apply_rope, dtype_of, weight_dtype_of
from jaxspec.models.step import Mode, Step
from jaxspec.ops import cached_attention, heavy_hitter
from jaxspec.ops.cached_attention import cached_chain_attention
from jaxspec.parallel.context import SEQUENCE_AXIS, sequence_parallel_mesh
from jaxspec.parallel.lasp2 import lasp2h_attention
from jaxspec.state import HeavyHitterCache, KVCache, SharedPrefixCache, write_kv
from pallas_kernels._common import resolve_implementation
from pallas_kernels.shared_prefix_attention import shared_prefix_attention
from pallas_kernels.tree_attention import STREAMING_MAX_ROWS, tree_attention


def causal_attention(q, k, v, *, model_cfg, mesh=None, window: int = 0, lengths=None):
    """Full causal attention over [B, H, T, D] (GQA: k/v [B, Hkv, T, D]) for training and plain forwards.

    `mesh`: a mesh whose "sequence" axis splits T (sequence parallelism through LASP-2H), or None.
    `window` > 0: each query sees only the `window` latest positions up to its own.
    `lengths` [B]: each row's real positions when rows are right-padded (None: all T); FlexPrefill estimates
    from each row's last real queries (causal masking already keeps padding out of every real output).
    """
    at = model_cfg.attention
    scale = model_cfg.query_scale or None  # None: 1/sqrt(head_dim)
    if mesh is not None:
        if at.prefill != "dense":  # block selection is approximate: no exact sharded equivalent
            raise InputError(f"model.attention.prefill={at.prefill!r} is not supported with config.mesh.sequence > 1; "
                             "use prefill='dense'.")
        if window:
            raise InputError(f"model.layer_windows: a sliding window ({window}) is not supported with "
                             "config.mesh.sequence > 1 (LASP-2H attends globally); use mesh.sequence=1.")
        if scale is not None:  # LASP-2H scores with 1/sqrt(head_dim): fold the configured scale into q
            q = (q * (scale * q.shape[-1] ** 0.5)).astype(q.dtype)
        return lasp2h_attention(q, k, v, mesh=mesh, axis=SEQUENCE_AXIS, causal=True)
    if at.prefill != "dense":  # block-sparse; validate_model_config refuses it together with windows
        from pallas_kernels.block_sparse_attention import block_sparse_attention, three_state_block_mask
        from pallas_kernels.flexprefill import flexprefill_block_mask
        from pallas_kernels.xattention import xattention_block_mask

        if at.prefill == "flexprefill":
            keep = flexprefill_block_mask(q, k, block_size=at.block_size, gamma=at.flexprefill_gamma,
                                          tau=at.flexprefill_tau, scale=scale, lengths=lengths)
        else:  # "xattention" (or its earlier name "block_sparse")
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


def _operand(cache):
    """(array, stack index or None) of a cache's k or v: a LayerRows view passes its whole stack and the layer."""
    return (cache.stack, cache.index) if isinstance(cache, LayerRows) else (cache, None)


def _value(cache):
    """A cache's k or v as the layer's array (sliced out of the stack for a LayerRows view: a copy)."""
    return cache.value() if isinstance(cache, LayerRows) else cache


def _write(cache, new, start):
    """write_kv into a cache's k or v, a LayerRows view written into its stack in place."""
    array, index = _operand(cache)
    written = write_kv(array, new, start, index)
    return written if index is None else LayerRows(written, index)


class Attention(nn.Module):
    model_cfg: Any
    window: int = 0  # sliding window of this layer (0: global)
    rope_theta: float | None = None  # RoPE base of this layer (None: model_cfg.rope_theta)
    layout: str = "standard"  # "decode": fused qkv and o_proj as decode-layout Linear projections

    def _project_qkv(self, x):
        """q [B, T, H*hd], k and v [B, T, Hkv*hd]."""
        cfg = self.model_cfg
        hd = config_lib.head_dim(cfg)
        n_q, n_kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
        if self.layout == "decode":
            qkv = Linear(cfg.d_model, n_q + 2 * n_kv, use_bias=cfg.qkv_bias, weight_dtype=weight_dtype_of(cfg),
                         dtype=dtype_of(cfg), name="qkv")(x)
            return qkv[..., :n_q], qkv[..., n_q:n_q + n_kv], qkv[..., n_q + n_kv:]
        dense = lambda n, name: nn.Dense(n, use_bias=cfg.qkv_bias, dtype=dtype_of(cfg), name=name)
        return dense(n_q, "q_proj")(x), dense(n_kv, "k_proj")(x), dense(n_kv, "v_proj")(x)

    def _project_out(self, out):
        cfg = self.model_cfg
        if self.layout == "decode":
            return Linear(out.shape[-1], cfg.d_model, weight_dtype=weight_dtype_of(cfg), dtype=dtype_of(cfg),
                          name="o_proj")(out)
        return nn.Dense(cfg.d_model, use_bias=False, dtype=dtype_of(cfg), name="o_proj")(out)

    def _few_rows_off_pallas(self, q, k) -> bool:
        """Whether attention takes the few-rows forms (decode steps, verification) rather than the Pallas kernel."""
        few_rows = q.shape[1] // k.shape[1] * q.shape[2] <= STREAMING_MAX_ROWS
        return few_rows and resolve_implementation("tree_attention", self.model_cfg.attention.implementation) == "xla"

    def _attend_extend(self, q, k, v, written: KVCache, step: Step):
        """Attention of extend nodes over the cache they were just written into. The few-rows path reads only the
        cache (the nodes are in it); the Pallas path takes the nodes as its tree block."""
        cfg = self.model_cfg
        scale = cfg.query_scale or None
        if self._few_rows_off_pallas(q, k):
            (k_cache, index), (v_cache, _) = _operand(written.k), _operand(written.v)
            return cached_chain_attention(q, k_cache, v_cache, step.positions, scale=scale, window=self.window,
                                          index=index)
        return tree_attention(q, _value(written.k), _value(written.v), step.lengths, k, v, step.mask, scale=scale,
                              window=self.window, implementation=cfg.attention.implementation)

    def _attend_tree(self, q, k, v, cache: KVCache, step: Step):
        """Attention of tree nodes over the committed cache and their ancestors among the nodes."""
        cfg = self.model_cfg
        scale = cfg.query_scale or None
        if cache.k.shape[2] and self._few_rows_off_pallas(q, k) and cached_attention.uses_kernel(q, cache.k, k):
            (k_cache, index), (v_cache, _) = _operand(cache.k), _operand(cache.v)
            return cached_attention.cached_tree_attention(q, k_cache, v_cache, step.lengths, k, v, step.mask,
                                                          scale=scale, window=self.window, index=index)
        return tree_attention(q, _value(cache.k), _value(cache.v), step.lengths, k, v, step.mask, scale=scale,
                              window=self.window, implementation=cfg.attention.implementation)

    def _attend_shared_prefix(self, q, k, v, cache: SharedPrefixCache, step: Step):
        """Extend or tree nodes over the shared prefix (read once for all rows) and each row's own suffix; the
        new nodes are the tree block. Extend writes them into the suffix; a tree returns them as pending."""
        cfg = self.model_cfg
        if self.window:
            raise InputError(f"a shared-prefix cache needs global attention; this layer has a sliding window of "
                             f"{self.window}")
        if step.fresh:
            raise InputError("a shared-prefix cache is made from a prefilled row (state.share_prefix), not "
                             "prefilled itself")
        suffix_lengths = step.lengths - cache.prefix_len
        out = shared_prefix_attention(q, cache.k_prefix, cache.v_prefix, cache.prefix_len, cache.suffix.k,
                                      cache.suffix.v, suffix_lengths, k, v, step.mask,
                                      scale=cfg.query_scale or None, implementation=cfg.attention.implementation)
        suffix = cache.suffix
        if step.mode == Mode.EXTEND:
            written = KVCache(write_kv(suffix.k, k, suffix_lengths), write_kv(suffix.v, v, suffix_lengths))
            return out, cache.replace(suffix=written)
        return out, KVCache(k.astype(suffix.k.dtype), v.astype(suffix.v.dtype))

    @nn.compact
    def __call__(self, x, step: Step, cache: KVCache | None):
        cfg = self.model_cfg
        b, t, _ = x.shape
        hd = config_lib.head_dim(cfg)
        theta = cfg.rope_theta if self.rope_theta is None else self.rope_theta
        split = lambda y, n: y.reshape(b, t, n, hd).transpose(0, 2, 1, 3)
        q, k, v = self._project_qkv(x)
        q, k, v = split(q, cfg.n_heads), split(k, cfg.n_kv_heads), split(v, cfg.n_kv_heads)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_eps, name="q_norm")(q)
            k = RMSNorm(cfg.rms_eps, name="k_norm")(k)
        q = apply_rope(q, step.positions, theta)
        k = apply_rope(k, step.positions, theta)
        if step.mode == Mode.FULL:
            # init only shapes the parameters: its dummy sequence need not split over the mesh
            mesh = None if self.is_initializing() else sequence_parallel_mesh(t, layer="attention layer")
            out, new = causal_attention(q, k, v, model_cfg=cfg, mesh=mesh, window=self.window), None
        elif isinstance(cache, SharedPrefixCache):  # one prompt's cache shared by every row (Hydragen)
            out, new = self._attend_shared_prefix(q, k, v, cache, step)
        elif isinstance(cache, HeavyHitterCache):  # a budgeted cache (DecoderLM's kv_budget option)
            if self.window:
                raise InputError(f"kv_budget: a layer with a sliding window ({self.window}) already keeps a bounded "
                                 "cache; a budgeted cache is for global attention layers only")
            scale = cfg.query_scale or hd**-0.5
            if step.mode == Mode.EXTEND:
                out, new = heavy_hitter.extend(q, k, v, cache, step.positions, step.lengths, step.valid, scale=scale)
            else:
                out, new = heavy_hitter.tree(q, k, v, cache, step.mask, scale=scale)
        elif step.fresh:  # prefill into an empty cache: plain causal attention over the new tokens
            out = causal_attention(q, k, v, model_cfg=cfg, window=self.window,
                                   lengths=jnp.sum(step.valid, axis=-1, dtype=jnp.int32))
            new = KVCache(_write(cache.k, k, step.lengths), _write(cache.v, v, step.lengths))
        elif step.mode == Mode.EXTEND:  # write first: the attention below reads the updated cache (see above)
            new = KVCache(_write(cache.k, k, step.lengths), _write(cache.v, v, step.lengths))
            out = self._attend_extend(q, k, v, new, step)
        else:
            if cache is None:  # a tree with no committed context (lm.context_free_tree_step): an empty cache
                empty = jnp.zeros((b, cfg.n_kv_heads, 0, hd), k.dtype)
                cache = KVCache(empty, empty)
            new = KVCache(k.astype(cache.k.dtype), v.astype(cache.v.dtype))
            out = self._attend_tree(q, k, v, cache, step)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, cfg.n_heads * hd)
        return self._project_out(out), new
