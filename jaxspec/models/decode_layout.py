"""The decode layout: parameters rearranged once so that a decode step does fewer, fused products.

    model, params = for_decoding(model, params)     # once (a decode loop does it outside its while_loop)
    model.apply({"params": params}, tokens, state=state, ...)  == the standard model's logits

Per attention layer and FFN (standard -> decode):

    attn/{q,k,v}_proj/kernel [d, n] (+ bias)  ->  attn/qkv/kernel_t [n_q + 2 n_kv, d] (+ bias): one product
    attn/o_proj/kernel [n_q, d]               ->  attn/o_proj/kernel_t [d, n_q]
    ffn/gate_proj, ffn/up_proj [d, d_ff]       ->  ffn/gate_up/kernel_t [2 d_ff, d]: gate rows, then up rows
    ffn/down_proj [d_ff, d]                    ->  ffn/down_proj/kernel_t [d, d_ff]
    lm_head/kernel [d, V] (untied)             ->  lm_head/kernel_t [V, d], the layout of a tied embedding

Every such kernel is stored transposed, [out, in]: one row per output, which the CPU kernel for a few rows
(jaxspec.ops.small_rows_matmul) reads once for all the rows of a tree forward. Everything else (norms, the
embedding, linear-attention and Mamba mixers, q/k norms) keeps its standard form. With
`model.weight_dtype = "int8"` each `kernel_t` is int8 with a float32 `scale` per output row (weight-only,
symmetric: w ~ int8 * scale), and so is a tied embedding (it is the LM head). models/layers.py says how each
form streams on CPU.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax.core import unfreeze

from jaxspec import config as config_lib
from jaxspec.config import MixerKind
from jaxspec.errors import InputError
from jaxspec.models import layer_scan
from jaxspec.models.layers import quantize_int8, weight_dtype_of
from jaxspec.models.lm import DecoderLM, has_ffn


def _layer(params, name: str, where: str) -> dict:
    if name not in params:
        raise InputError(f"{where}: params has no {name!r}; do they belong to this model config?")
    return params[name]


def _kernel_entry(kernel, weight_dtype: str, bias=None) -> dict:
    """A Linear's params ([out, in]) from a float [in, out] kernel."""
    entry = _rows_entry(jnp.asarray(kernel).T, weight_dtype)
    if bias is not None:
        entry["bias"] = bias
    return entry


def _rows_entry(kernel_t, weight_dtype: str) -> dict:
    """The params of an [out, in] projection (the vocabulary head) from a float [out, in] matrix."""
    if weight_dtype == "int8":
        q, scale = quantize_int8(kernel_t)
        return {"kernel_t": q, "scale": scale}
    return {"kernel_t": kernel_t}


def _no_int8(entry: dict, where: str) -> None:
    if "scale" in entry:
        raise InputError(f"{where}: int8 weights cannot be turned back into the standard layout exactly; keep "
                         "the float parameters they were quantised from")


def _check_standard(params, model_cfg, where: str) -> None:
    first_attn = next((i for i, k in enumerate(config_lib.layer_kinds(model_cfg)) if k == MixerKind.ATTENTION), None)
    if first_attn is not None and "qkv" in _layer(params, f"layer_{first_attn}", where).get("attn", {}):
        raise InputError(f"{where}: params are already in the decode layout")


def to_decode_layout(params, model_cfg):
    """Standard params of a DecoderLM for `model_cfg` -> the decode layout (see the module docstring)."""
    where = "to_decode_layout"
    _check_standard(params, model_cfg, where)
    weight_dtype = weight_dtype_of(model_cfg)
    out = unfreeze(params)  # fresh nested dicts; leaves are shared, never modified
    for i, kind in enumerate(config_lib.layer_kinds(model_cfg)):
        layer = _layer(out, f"layer_{i}", where)
        if kind == MixerKind.ATTENTION:
            attn = layer["attn"]
            parts = [attn.pop(n) for n in ("q_proj", "k_proj", "v_proj")]
            kernel = jnp.concatenate([p["kernel"] for p in parts], axis=1)
            bias = jnp.concatenate([p["bias"] for p in parts]) if model_cfg.qkv_bias else None
            attn["qkv"] = _kernel_entry(kernel, weight_dtype, bias)
            attn["o_proj"] = _kernel_entry(attn["o_proj"]["kernel"], weight_dtype)
        if has_ffn(model_cfg, kind):
            ffn = layer["ffn"]
            gate, up, down = ffn.pop("gate_proj"), ffn.pop("up_proj"), ffn.pop("down_proj")
            ffn["gate_up"] = _kernel_entry(jnp.concatenate([gate, up], axis=1), weight_dtype)
            ffn["down_proj"] = _kernel_entry(down, weight_dtype)
    if model_cfg.tie_embeddings:
        if weight_dtype == "int8":
            q, scale = quantize_int8(out["embed"]["embedding"])
            out["embed"] = {"embedding": q, "scale": scale}
    else:
        out["lm_head"] = _rows_entry(_layer(out, "lm_head", where)["kernel"].T, weight_dtype)
    return out


def to_standard_layout(params, model_cfg):
    """Float decode-layout params -> the standard layout (exactly; int8 params raise)."""
    where = "to_standard_layout"
    out = layer_scan.without_stacks(unfreeze(params))
    hd = config_lib.head_dim(model_cfg)
    splits = [model_cfg.n_heads * hd, (model_cfg.n_heads + model_cfg.n_kv_heads) * hd]
    for i, kind in enumerate(config_lib.layer_kinds(model_cfg)):
        layer = _layer(out, f"layer_{i}", where)
        if kind == MixerKind.ATTENTION:
            attn = layer["attn"]
            if "qkv" not in attn:
                raise InputError(f"{where}: layer_{i}/attn has no fused 'qkv'; are these params in the decode layout?")
            qkv = attn.pop("qkv")
            _no_int8(qkv, f"{where}: layer_{i}/attn/qkv")
            biases = jnp.split(qkv["bias"], splits) if "bias" in qkv else (None,) * 3
            for name, k, b in zip(("q_proj", "k_proj", "v_proj"), jnp.split(qkv["kernel_t"].T, splits, axis=1),
                                  biases, strict=True):
                attn[name] = {"kernel": k} if b is None else {"kernel": k, "bias": b}
            _no_int8(attn["o_proj"], f"{where}: layer_{i}/attn/o_proj")
            attn["o_proj"] = {"kernel": attn["o_proj"]["kernel_t"].T}
        if has_ffn(model_cfg, kind):
            ffn = layer["ffn"]
            gate_up = ffn.pop("gate_up")
            _no_int8(gate_up, f"{where}: layer_{i}/ffn/gate_up")
            ffn["gate_proj"], ffn["up_proj"] = jnp.split(gate_up["kernel_t"].T, 2, axis=1)
            _no_int8(ffn["down_proj"], f"{where}: layer_{i}/ffn/down_proj")
            ffn["down_proj"] = ffn["down_proj"]["kernel_t"].T
    if model_cfg.tie_embeddings:
        _no_int8(out["embed"], f"{where}: embed")
    else:
        head = _layer(out, "lm_head", where)
        _no_int8(head, f"{where}: lm_head")
        out["lm_head"] = {"kernel": head["kernel_t"].T}
    return out


def in_decode_form(model: DecoderLM, params) -> bool:
    """Whether `for_decoding(model, params)` would return them as they are: decode-layout params, with the stacks
    of the scanned layers where the model scans."""
    period, groups = layer_scan.model_plan(model.model_cfg)
    return model.layout == "decode" and (not groups or layer_scan.stored_stacks(params, period, groups) is not None)


def for_decoding(model: DecoderLM, params) -> tuple[DecoderLM, dict]:
    """(decode-layout model, its params). Params already in the decode layout (with a decode-layout model)
    pass through, so a caller may convert once and hand the result to every decode call. With
    `model.scan_layers` the params hold the scanned layers as their stacks instead of per layer
    (layer_scan.with_stacks: the weights once), made here once rather than by every forward."""
    if model.layout != "decode":
        model, params = model.clone(layout="decode"), to_decode_layout(params, model.model_cfg)
    period, groups = layer_scan.model_plan(model.model_cfg)
    if groups and layer_scan.stored_stacks(params, period, groups) is None:
        params = layer_scan.with_stacks(layer_scan.without_stacks(params), period, groups)
    return model, params
