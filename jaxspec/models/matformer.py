"""MatFormer sub-models: a granularity of a nested-FFN model as a standalone dense model.

Granularity g of layer i uses the first `ffn_hidden_sizes(cfg, i)[g]` hidden units of that layer's FFN, so
the sub-model is the same network with each FFN's weights sliced to that prefix. A global granularity gives
one width for every layer; a per-layer (Mix'n'Match) choice gives per-layer widths (`d_ff_per_layer`).

    sub_params, sub_cfg = extract_submodel(params, cfg.model, granularity=(0, 2, 1, 1))
    build_model(sub_cfg).apply({"params": sub_params}, tokens)
        == build_model(cfg.model).apply({"params": params}, tokens, granularity=(0, 2, 1, 1))
"""

from __future__ import annotations

import jax
import ml_collections
from flax.core import unfreeze

from jaxspec import config as config_lib
from jaxspec.errors import InputError
from jaxspec.models.lm import build_model, count_params, has_ffn, init_params


def _layer_widths(model_cfg, granularity) -> tuple[int, ...]:
    """FFN hidden width each layer uses at `granularity` (None: the full model)."""
    per_layer = config_lib.validate_granularity(model_cfg, granularity)
    if per_layer is None:
        per_layer = (len(model_cfg.matformer_fractions) - 1,) * model_cfg.n_layers
    return tuple(config_lib.ffn_hidden_sizes(model_cfg, i)[g] for i, g in enumerate(per_layer))


def submodel_config(model_cfg, granularity) -> ml_collections.ConfigDict:
    """The dense model config of `granularity`: one FFN width per layer, no nesting left.

    Layers without an FFN (Mamba without `mamba.ffn`) take no part in the widths.
    """
    config_lib.validate_model_config(model_cfg)
    widths = _layer_widths(model_cfg, granularity)
    kinds = config_lib.layer_kinds(model_cfg)
    ffn_widths = [w for w, kind in zip(widths, kinds) if has_ffn(model_cfg, kind)]
    sub = ml_collections.ConfigDict(ml_collections.FrozenConfigDict(model_cfg))
    sub.matformer_fractions = (1.0,)
    if not ffn_widths:  # no layer has an FFN: nothing to slice
        sub.d_ff_per_layer = ()
        return sub
    sub.d_ff = max(ffn_widths)
    if len(set(ffn_widths)) == 1:
        sub.d_ff_per_layer = ()
    else:  # FFN-less layers get d_ff, which they never use
        sub.d_ff_per_layer = tuple(w if has_ffn(model_cfg, kind) else sub.d_ff for w, kind in zip(widths, kinds))
    return sub


def extract_submodel(params, model_cfg, granularity):
    """(sub_params, sub_cfg): the standalone model of `granularity` (an index, per-layer indices, or None).

    `build_model(sub_cfg)` with `sub_params` gives the logits of the full model applied with `granularity`,
    with only the parameters that granularity uses.
    """
    sub_cfg = submodel_config(model_cfg, granularity)
    widths = _layer_widths(model_cfg, granularity)
    sub_params = unfreeze(params)  # fresh nested dicts; leaves are shared, never modified
    for i, kind in enumerate(config_lib.layer_kinds(model_cfg)):
        if not has_ffn(model_cfg, kind):
            continue
        layer = f"layer_{i}"
        if layer not in sub_params or "ffn" not in sub_params[layer]:
            raise InputError(f"extract_submodel: params has no {layer}/ffn; do they belong to this model config?")
        ffn, w = sub_params[layer]["ffn"], widths[i]
        if "gate_proj" not in ffn:
            raise InputError(f"extract_submodel: {layer}/ffn has no gate_proj; it takes standard-layout params "
                             "(decode_layout.to_standard_layout turns float decode-layout params back)")
        sub_params[layer]["ffn"] = dict(gate_proj=ffn["gate_proj"][:, :w], up_proj=ffn["up_proj"][:, :w],
                                        down_proj=ffn["down_proj"][:w])
    return sub_params, sub_cfg


def submodel_param_count(model_cfg, granularity=None) -> int:
    """Parameters of the standalone model of `granularity` (an index, per-layer indices or None), from shapes."""
    model = build_model(submodel_config(model_cfg, granularity))
    return count_params(jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0)))


def matformer_param_counts(model_cfg) -> dict[int, int]:
    """Parameter count of the standalone model of each global granularity index (shapes only, no init)."""
    return {g: submodel_param_count(model_cfg, g) for g in range(len(model_cfg.matformer_fractions))}
