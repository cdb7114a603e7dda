"""Kangaroo's draft model (Liu et al., 2024): the target's first `exit_layer` layers, a small trained adapter, and
the target's LM head.

    draft = draft_model(target.model_cfg, exit_layer)        # a DecoderLM of exit_layer + 1 layers
    adapter = init_adapter(target_params, target.model_cfg, exit_layer, seed=0)
    logits = draft.apply({"params": draft_params(target_params, adapter)}, tokens)

The adapter is the paper's: one attention sub-block of the target's shape (pre-norm, multi-head attention,
residual add; no FFN) and a norm of its own in place of the target's final norm (two norms in all). The draft is
therefore a DecoderLM whose layers 0..k-1 are the target's (the same parameters, shared, not copied), whose
layer k is the adapter's attention applied with its FFN left out (`skip_ffn`, fixed by `lm.WithOptions`), and
whose final norm is the adapter's; the embedding and LM head are the target's. It keeps a decode state of its own
(k + 1 layers), so `drafters.ModelDrafter` drives it like any draft model.

`init_adapter` starts the attention's output projection at zero and the norm at the target's final norm: the
untrained draft is then exactly the target exited after layer k - 1 (its layers k..n-1 skipped), and training
starts from that shallow exit. Parameters are in the standard layout (training, checkpoints).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.core import unfreeze

from jaxspec import config as config_lib
from jaxspec.config import MixerKind
from jaxspec.errors import InputError
from jaxspec.models.lm import Block, WithOptions, build_model, make_step

FINAL_NORM = "final_norm"
_LAYER_KEY = re.compile(r"layer_(\d+)$")


def check_exit_layer(model_cfg, exit_layer) -> int:
    """`exit_layer` k: the draft runs the target's layers 0..k-1, so 1 <= k < n_layers (a shallow part)."""
    n = model_cfg.n_layers
    if not config_lib.is_int(exit_layer) or not 1 <= exit_layer < n:
        raise InputError(f"exit_layer={exit_layer!r} must lie in [1, {n - 1}]: the draft runs the target's first "
                         f"exit_layer layers of n_layers={n}")
    return int(exit_layer)


def draft_config(model_cfg, exit_layer: int) -> ml_collections.ConfigDict:
    """The draft's model config: the target's first `exit_layer` layers (their mixers, windows and FFN widths)
    followed by one global attention layer, the adapter's."""
    k = check_exit_layer(model_cfg, exit_layer)
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    kinds = config_lib.layer_kinds(model_cfg)
    cfg.n_layers = k + 1
    cfg.layer_pattern = "".join(kind.value for kind in kinds[:k]) + MixerKind.ATTENTION.value
    if model_cfg.layer_windows:
        cfg.layer_windows = (*tuple(model_cfg.layer_windows)[:k], 0)
    if model_cfg.d_ff_per_layer:  # the adapter's FFN never runs; its width only has to be valid
        cfg.d_ff_per_layer = (*tuple(model_cfg.d_ff_per_layer)[:k], model_cfg.d_ff)
    return cfg


def adapter_layer(exit_layer: int) -> str:
    """The draft's parameter key of the adapter's attention sub-block."""
    return f"layer_{exit_layer}"


def draft_model(model_cfg, exit_layer: int) -> WithOptions:
    """The draft module: a DecoderLM of exit_layer + 1 layers whose last layer's FFN is always left out."""
    return WithOptions.of(build_model(draft_config(model_cfg, exit_layer)), skip_ffn=(exit_layer,))


def adapter_shapes(target_params, model_cfg, exit_layer: int) -> dict:
    """The adapter's tree of jax.ShapeDtypeStruct: {layer_k: the attention sub-block's (no FFN), final_norm}."""
    block = Block(ml_collections.FrozenConfigDict(draft_config(model_cfg, exit_layer)), MixerKind.ATTENTION,
                  exit_layer)
    step = make_step(jnp.zeros((1, 1), jnp.int32), None, None, None)
    x = jnp.zeros((1, 1, model_cfg.d_model), jnp.float32)
    layer = jax.eval_shape(lambda: block.init(jax.random.key(0), x, step, None, None, skip_ffn=True)["params"])
    return {adapter_layer(exit_layer): unfreeze(layer), FINAL_NORM: jax.eval_shape(lambda: target_params[FINAL_NORM])}


def _initial_value(path, leaf, rng: np.random.Generator) -> jax.Array:
    """Norm scales 1, biases 0, kernels [fan_in, ...] drawn from N(0, 1 / fan_in)."""
    name = path[-1].key
    if name in ("scale", "bias"):
        return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0]), leaf.dtype)


def init_adapter(target_params, model_cfg, exit_layer: int, seed: int = 0) -> dict:
    """Adapter params {layer_k: attention sub-block, final_norm}: the attention drawn with `seed` and its output
    projection zeroed, the norm the target's final norm (so the draft starts as the plain shallow exit)."""
    shapes = adapter_shapes(target_params, model_cfg, exit_layer)
    rng = np.random.default_rng(seed)
    layer = jax.tree_util.tree_map_with_path(lambda path, leaf: _initial_value(path, leaf, rng),
                                             shapes[adapter_layer(exit_layer)])
    layer["attn"]["o_proj"]["kernel"] = jnp.zeros_like(layer["attn"]["o_proj"]["kernel"])
    return {adapter_layer(exit_layer): layer, FINAL_NORM: target_params[FINAL_NORM]}


def adapter_exit_layer(adapter_params) -> int:
    """The exit layer k an adapter was made for, read from its key layer_k."""
    layers = [m for m in map(_LAYER_KEY.match, adapter_params) if m]
    if len(layers) != 1 or set(adapter_params) != {layers[0].group(0), FINAL_NORM}:
        raise InputError(f"adapter params have the keys {sorted(adapter_params)}; a Kangaroo adapter has one "
                         f"layer_<k> and {FINAL_NORM!r}")
    return int(layers[0].group(1))


def shared_params(target_params, exit_layer: int) -> dict:
    """The target's params the draft reads: the embedding, layers 0..k-1 and (untied) the LM head."""
    keys = ["embed", *(f"layer_{i}" for i in range(exit_layer))] + (["lm_head"] if "lm_head" in target_params
                                                                   else [])
    missing = [key for key in keys if key not in target_params]
    if missing:
        raise InputError(f"target params have no {missing[0]!r}; they do not belong to a DecoderLM with "
                         f"{exit_layer} layers or more")
    return {key: target_params[key] for key in keys}


def check_adapter_fits(target_params, model_cfg, adapter_params) -> int:
    """Refuse, naming the first differing entry, an adapter whose shapes are not those of this target's adapter
    (one trained for another model); returns its exit layer."""
    k = check_exit_layer(model_cfg, adapter_exit_layer(adapter_params))
    got, want = _shapes(adapter_params), _shapes(adapter_shapes(target_params, model_cfg, k))
    for name in sorted(set(got) | set(want)):
        if got.get(name) != want.get(name):
            raise InputError(f"the Kangaroo adapter's {name} has shape {got.get(name, 'none')}; this target's adapter "
                             f"at exit layer {k} has {want.get(name, 'none')}: an adapter made for another model")
    return k


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(jnp.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def draft_params(target_params, adapter_params) -> dict:
    """The draft's params: the target's shared ones (the same arrays) and the adapter's."""
    return {**shared_params(target_params, adapter_exit_layer(adapter_params)), **adapter_params}
