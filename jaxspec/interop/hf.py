"""Hugging Face checkpoints in and out.

    model_cfg, params = load_hf_checkpoint("path/to/hf_dir")        # Llama / Mistral / Qwen2 / Mamba / Gemma 3
    tokenizer = load_hf_tokenizer("path/to/hf_dir")
    export_hf_checkpoint(params, model_cfg, "path/to/out")           # attention models -> Llama / Qwen2 / Gemma 3

A directory holds `config.json` and the weights as `model.safetensors` or shards listed in
`model.safetensors.index.json`. Weights are read with `safetensors` into numpy (no torch). Every feature of
the checkpoint's config is either mapped onto the jaxspec model config or rejected with an InputError that
lists what is unsupported: an import never gives a silently different model.

One table (`weight_entries`) says where each Hugging Face tensor lives in the jaxspec parameter tree and how
its layout differs; import reads it one way and export the other, so a round trip is exact.

The packages come with the `[hf]` extra and are imported only when a function needs them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jaxspec import config as config_lib
from jaxspec.errors import InputError
from jaxspec.models.lm import build_model
from jaxspec.models.matformer import extract_submodel

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# Architecture name (config.json "architectures") -> family; model_type is the fallback key.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MambaForCausalLM": "mamba",
    "Gemma3ForCausalLM": "gemma3",
}
FAMILIES = tuple(sorted(set(ARCHITECTURES.values())))
# config.json "model_type" -> family, for configs without "architectures" ("gemma3" itself is the multimodal
# Gemma3Config, which this text-only family does not cover).
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "mamba": "mamba", "gemma3_text": "gemma3"}
EXPORT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# The model features that make a jaxspec model a Gemma 3 (all of them) rather than a Llama/Qwen2 (none).
GEMMA3_FEATURES = {"ffn_activation": "gelu_tanh", "embed_scale": True, "qk_norm": True, "sandwich_norms": True}
# Gemma3TextConfig's defaults for the keys a config may leave out (transformers fills them the same way).
GEMMA3_DEFAULTS = {"num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                   "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
                   "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}
GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention")

# Tensors some checkpoints carry that hold no weights (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Older Mamba checkpoints name the embedding differently; transformers renames it on load too.
_LEGACY_NAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def _import_safetensors():
    try:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 checkpoints read as numpy)
        from safetensors import safe_open
        from safetensors.numpy import save_file
    except ImportError as err:
        raise ImportError("Hugging Face checkpoints need the 'safetensors' package: pip install 'jaxspec[hf]'"
                          ) from err
    return safe_open, save_file


# ---------------------------------------------------------------------------------------------- layouts


class Layout(NamedTuple):
    """How a Hugging Face tensor relates to its jaxspec parameter."""

    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]  # jaxspec shape -> Hugging Face shape


LAYOUTS = {
    "copy": Layout(lambda w: w, lambda w: w, lambda s: tuple(s)),
    # torch.nn.Linear stores [out, in]; flax Dense kernels are [in, out].
    "linear": Layout(lambda w: w.T, lambda w: w.T, lambda s: tuple(s)[::-1]),
    # Depthwise torch.nn.Conv1d stores [channels, 1, width]; jaxspec keeps [channels, width].
    "conv": Layout(lambda w: w[:, 0, :], lambda w: w[:, None, :], lambda s: (s[0], 1, s[1])),
    # Gemma's RMSNorm scales by (1 + w) in float32: jaxspec stores that product, rounded as Gemma rounds it.
    "gemma_norm": Layout(lambda w: w.astype(np.float32) + np.float32(1), lambda s: s.astype(np.float32) - np.float32(1),
                         lambda s: tuple(s)),
}


class Entry(NamedTuple):
    """One parameter: its Hugging Face tensor name (None: absent there, zeros here) and jaxspec path."""

    hf_name: str | None
    path: tuple[str, ...]
    layout: str


def _transformer_entries(model_cfg) -> list[Entry]:
    entries = [Entry("model.embed_tokens.weight", ("embed", "embedding"), "copy")]
    for i in range(model_cfg.n_layers):
        hf, jx = f"model.layers.{i}", f"layer_{i}"
        entries.append(Entry(f"{hf}.input_layernorm.weight", (jx, "mixer_norm", "scale"), "copy"))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            entries.append(Entry(f"{hf}.self_attn.{proj}.weight", (jx, "attn", proj, "kernel"), "linear"))
            if model_cfg.qkv_bias and proj != "o_proj":
                entries.append(Entry(f"{hf}.self_attn.{proj}.bias", (jx, "attn", proj, "bias"), "copy"))
        entries.append(Entry(f"{hf}.post_attention_layernorm.weight", (jx, "ffn_norm", "scale"), "copy"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            entries.append(Entry(f"{hf}.mlp.{proj}.weight", (jx, "ffn", proj), "linear"))
    entries.append(Entry("model.norm.weight", ("final_norm", "scale"), "copy"))
    return entries


def _mamba_entries(model_cfg, conv_bias: bool) -> list[Entry]:
    entries = [Entry("backbone.embeddings.weight", ("embed", "embedding"), "copy")]
    for i in range(model_cfg.n_layers):
        hf, jx = f"backbone.layers.{i}", (f"layer_{i}", "mamba")
        entries += [
            Entry(f"{hf}.norm.weight", (f"layer_{i}", "mixer_norm", "scale"), "copy"),
            Entry(f"{hf}.mixer.in_proj.weight", (*jx, "in_proj", "kernel"), "linear"),
            Entry(f"{hf}.mixer.conv1d.weight", (*jx, "conv1d_weight"), "conv"),
            Entry(f"{hf}.mixer.conv1d.bias" if conv_bias else None, (*jx, "conv1d_bias"), "copy"),
            Entry(f"{hf}.mixer.x_proj.weight", (*jx, "x_proj", "kernel"), "linear"),
            Entry(f"{hf}.mixer.dt_proj.weight", (*jx, "dt_proj", "kernel"), "linear"),
            Entry(f"{hf}.mixer.dt_proj.bias", (*jx, "dt_proj", "bias"), "copy"),
            Entry(f"{hf}.mixer.A_log", (*jx, "A_log"), "copy"),
            Entry(f"{hf}.mixer.D", (*jx, "D"), "copy"),
            Entry(f"{hf}.mixer.out_proj.weight", (*jx, "out_proj", "kernel"), "linear"),
        ]
    entries.append(Entry("backbone.norm_f.weight", ("final_norm", "scale"), "copy"))
    return entries


def _gemma3_entries(model_cfg) -> list[Entry]:
    """Gemma 3: q/k norms and four norms per layer (post_attention_layernorm is the attention output's
    norm here, not the FFN's input norm as in Llama), every norm folded (see the "gemma_norm" layout)."""
    entries = [Entry("model.embed_tokens.weight", ("embed", "embedding"), "copy")]
    norms = (("input_layernorm", "mixer_norm"), ("post_attention_layernorm", "post_mixer_norm"),
             ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffn_norm"))
    for i in range(model_cfg.n_layers):
        hf, jx = f"model.layers.{i}", f"layer_{i}"
        entries += [Entry(f"{hf}.{name}.weight", (jx, ours, "scale"), "gemma_norm") for name, ours in norms]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            entries.append(Entry(f"{hf}.self_attn.{proj}.weight", (jx, "attn", proj, "kernel"), "linear"))
        for norm in ("q_norm", "k_norm"):
            entries.append(Entry(f"{hf}.self_attn.{norm}.weight", (jx, "attn", norm, "scale"), "gemma_norm"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            entries.append(Entry(f"{hf}.mlp.{proj}.weight", (jx, "ffn", proj), "linear"))
    entries.append(Entry("model.norm.weight", ("final_norm", "scale"), "gemma_norm"))
    return entries


def weight_entries(model_cfg, family: str, conv_bias: bool = True) -> list[Entry]:
    """Every parameter of a `family` checkpoint for `model_cfg`, in checkpoint order."""
    if family == "mamba":
        entries = _mamba_entries(model_cfg, conv_bias)
    elif family == "gemma3":
        entries = _gemma3_entries(model_cfg)
    else:
        entries = _transformer_entries(model_cfg)
    if not model_cfg.tie_embeddings:
        entries.append(Entry("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return entries


def param_shapes(model_cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat path -> shape of every parameter of the jaxspec model (traced, nothing allocated)."""
    model = build_model(model_cfg)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    return {path: tuple(x.shape) for path, x in traverse_util.flatten_dict(tree).items()}


# ---------------------------------------------------------------------------------------- config import


def read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise InputError(f"{what}: file {path!r} does not exist")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{what}: file {path!r} could not be read as JSON: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"{what}: file {path!r} holds a {type(data).__name__}, expected a JSON object")
    return data


def read_hf_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise InputError(f"Hugging Face checkpoint directory {hf_dir!r} does not exist")
    return read_json(os.path.join(hf_dir, CONFIG_FILE), "Hugging Face checkpoint config")


def hf_family(hf_config: Mapping, where: str = CONFIG_FILE) -> str:
    """The supported family named by "architectures" (or "model_type"); anything else is rejected."""
    architectures = hf_config.get("architectures") or []
    if len(architectures) == 1 and architectures[0] in ARCHITECTURES:
        return ARCHITECTURES[architectures[0]]
    if not architectures and hf_config.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[hf_config["model_type"]]
    raise InputError(f"{where}: architecture {architectures or None} (model_type="
                     f"{hf_config.get('model_type')!r}) is not supported; supported: {sorted(ARCHITECTURES)}")


def _rope(hf_config: Mapping) -> tuple[str, float, float]:
    """(rope type, theta, partial rotary factor) from the transformers 5 or the older config layout."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    return rope_type, float(theta), float(partial)


def _sliding_layers(hf_config: Mapping, family: str) -> list[int]:
    """Layers whose attention window is shorter than the model's context (they would differ from ours)."""
    window = hf_config.get("sliding_window")
    n_layers = hf_config["num_hidden_layers"]
    if family == "qwen2":
        if not hf_config.get("use_sliding_window", False):
            return []
        layer_types = hf_config.get("layer_types") or [
            "sliding_attention" if i >= hf_config.get("max_window_layers", 28) else "full_attention"
            for i in range(n_layers)]
        sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    elif family == "mistral":
        sliding = list(range(n_layers))
    else:
        return []
    context = hf_config.get("max_position_embeddings")
    if window is None or (context is not None and window >= context):
        return []
    return sliding


def _transformer_unsupported(hf: Mapping, family: str) -> list[str]:
    problems = []
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r} (only 'silu', the SwiGLU FFN)")
    rope_type, _, partial = _rope(hf)
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only plain RoPE, rope_type 'default')")
    if partial != 1.0:
        problems.append(f"partial_rotary_factor={partial} (only 1.0)")
    if hf.get("attention_bias", False):
        problems.append("attention_bias=true (Llama puts a bias on o_proj too; only q/k/v biases, as Qwen2)")
    if hf.get("mlp_bias", False):
        problems.append("mlp_bias=true (the FFN has no biases)")
    sliding = _sliding_layers(hf, family)
    if sliding:
        problems.append(f"sliding_window={hf.get('sliding_window')} in effect on layers {sliding} "
                        f"(shorter than max_position_embeddings={hf.get('max_position_embeddings')})")
    return problems


def _gemma3_layer_types(hf: Mapping) -> list:
    """Each layer's attention type; without "layer_types", every sliding_window_pattern-th layer is global."""
    if hf.get("layer_types") is not None:
        return list(hf["layer_types"])
    pattern = hf.get("sliding_window_pattern", GEMMA3_DEFAULTS["sliding_window_pattern"])
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(hf["num_hidden_layers"])]


def _gemma3_rope(hf: Mapping) -> dict[str, dict]:
    """Layer type -> its RoPE parameters, filled as Gemma3TextConfig fills them (legacy rope_theta,
    rope_local_base_freq and rope_scaling included; rope_scaling applies to the global layers)."""
    given = hf.get("rope_parameters") or {}
    rope = {kind: dict(given.get(kind) or {"rope_type": "default"}) for kind in GEMMA3_LAYER_TYPES}
    if hf.get("rope_scaling"):
        rope["full_attention"].update(hf["rope_scaling"])
    rope["full_attention"].setdefault("rope_theta", hf.get("rope_theta", GEMMA3_DEFAULTS["rope_theta"]))
    rope["sliding_attention"].setdefault("rope_theta",
                                         hf.get("rope_local_base_freq", GEMMA3_DEFAULTS["rope_local_base_freq"]))
    return rope


def _gemma3_unsupported(hf: Mapping) -> list[str]:
    problems = []
    if not isinstance(hf.get("num_hidden_layers"), int):  # reported as a missing key by the caller
        return problems
    act = hf.get("hidden_activation", GEMMA3_DEFAULTS["hidden_activation"])
    if act != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation={act!r} (only 'gelu_pytorch_tanh', the GeGLU FFN)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            problems.append(f"{key}={hf[key]} (no tanh soft-capping; only null)")
    if hf.get("use_bidirectional_attention", False):
        problems.append("use_bidirectional_attention=true (only causal attention)")
    if hf.get("attention_bias", False):
        problems.append("attention_bias=true (the attention projections have no biases)")
    given = hf.get("rope_parameters")
    if given is not None and (not isinstance(given, Mapping) or set(given) - set(GEMMA3_LAYER_TYPES)):
        problems.append(f"rope_parameters={given!r} (only per-layer-type entries {list(GEMMA3_LAYER_TYPES)})")
        return problems
    types = _gemma3_layer_types(hf)
    unknown = sorted(set(types) - set(GEMMA3_LAYER_TYPES))
    if unknown or len(types) != hf["num_hidden_layers"]:
        problems.append(f"layer_types={types} (only {list(GEMMA3_LAYER_TYPES)}, one per layer of "
                        f"num_hidden_layers={hf['num_hidden_layers']})")
        return problems
    window = hf.get("sliding_window", GEMMA3_DEFAULTS["sliding_window"])
    if "sliding_attention" in types and not (isinstance(window, int) and window > 0):
        problems.append(f"sliding_window={window!r} with sliding_attention layers (only a positive window)")
    for kind, rope in _gemma3_rope(hf).items():
        if kind not in types:
            continue
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            problems.append(f"rope type {rope_type!r} on the {kind} layers ({rope}; only plain RoPE, rope_type "
                            "'default')")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']} on the {kind} layers (only 1.0)")
    return problems


def _mamba_unsupported(hf: Mapping) -> list[str]:
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (only 'silu')")
    if hf.get("use_bias", False):
        problems.append("use_bias=true (in_proj/out_proj have no biases)")
    expand = hf.get("expand", 2)
    if int(expand) != expand:
        problems.append(f"expand={expand} (only whole numbers)")
    elif "intermediate_size" in hf and hf["intermediate_size"] != int(expand) * hf["hidden_size"]:
        problems.append(f"intermediate_size={hf['intermediate_size']} != expand * hidden_size")
    return problems


def _common_unsupported(hf: Mapping) -> list[str]:
    problems = []
    if hf.get("quantization_config"):
        problems.append("quantization_config (quantized weights)")
    return problems


def model_config_from_hf(hf_config: Mapping, dtype: str = "float32", max_len: int | None = None,
                         where: str = CONFIG_FILE) -> ml_collections.ConfigDict:
    """A validated jaxspec model config equal to the Hugging Face model, or an InputError listing why not."""
    family = hf_family(hf_config, where)
    hf = dict(hf_config)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", *(() if family == "mamba" else
                                                                    ("num_attention_heads",)))
    missing = [key for key in required if key not in hf]
    if missing:
        raise InputError(f"{where}: required key(s) {missing} are missing; a {family} checkpoint's config "
                         f"states {', '.join(required)}")
    problems = _common_unsupported(hf)
    if family == "mamba":
        problems += _mamba_unsupported(hf)
    elif family == "gemma3":
        problems += _gemma3_unsupported(hf)
    else:
        problems += _transformer_unsupported(hf, family)
    if problems:
        raise InputError(f"{where}: this {family} checkpoint uses features jaxspec does not support: "
                         + "; ".join(problems))
    cfg = config_lib.model_defaults()
    try:
        cfg.vocab_size = int(hf["vocab_size"])
        cfg.d_model = int(hf["hidden_size"])
        cfg.n_layers = int(hf["num_hidden_layers"])
        cfg.tie_embeddings = bool(hf.get("tie_word_embeddings", family in ("mamba", "gemma3")))
        cfg.dtype = dtype
        if family == "mamba":
            _set_mamba_fields(cfg, hf)
            cfg.max_len = int(max_len or cfg.max_len)
        else:
            if family == "gemma3":
                _set_gemma3_fields(cfg, hf)
            else:
                _set_transformer_fields(cfg, hf, family)
            cfg.max_len = int(max_len or hf.get("max_position_embeddings") or cfg.max_len)
    except KeyError as err:
        raise InputError(f"{where}: required key {err.args[0]!r} is missing") from err
    except (TypeError, ValueError) as err:  # int() / float() of a value that is not a number
        raise InputError(f"{where}: a value is not the number it should be: {err}") from err
    config_lib.validate_model_config(cfg)
    return cfg


def _set_transformer_fields(cfg, hf: Mapping, family: str) -> None:
    cfg.layer_pattern = "A"
    cfg.n_heads = int(hf["num_attention_heads"])
    cfg.n_kv_heads = int(hf.get("num_key_value_heads") or cfg.n_heads)
    cfg.head_dim = int(hf.get("head_dim") or cfg.d_model // cfg.n_heads)
    cfg.d_ff = int(hf["intermediate_size"])
    cfg.rope_theta = _rope(hf)[1]
    cfg.rms_eps = float(hf.get("rms_norm_eps", 1e-6))
    cfg.qkv_bias = family == "qwen2"


def _set_gemma3_fields(cfg, hf: Mapping) -> None:
    cfg.layer_pattern = "A"
    cfg.n_heads = int(hf["num_attention_heads"])
    cfg.n_kv_heads = int(hf.get("num_key_value_heads", GEMMA3_DEFAULTS["num_key_value_heads"]))
    cfg.head_dim = int(hf.get("head_dim", GEMMA3_DEFAULTS["head_dim"]))
    cfg.d_ff = int(hf["intermediate_size"])
    cfg.rms_eps = float(hf.get("rms_norm_eps", GEMMA3_DEFAULTS["rms_norm_eps"]))
    rope = _gemma3_rope(hf)
    cfg.rope_theta = float(rope["full_attention"]["rope_theta"])
    cfg.rope_local_theta = float(rope["sliding_attention"]["rope_theta"])
    window = hf.get("sliding_window", GEMMA3_DEFAULTS["sliding_window"])
    windows = tuple(int(window) if kind == "sliding_attention" else 0 for kind in _gemma3_layer_types(hf))
    cfg.layer_windows = windows if any(windows) else ()
    # As Gemma3Attention: scores scaled by query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5).
    cfg.query_scale = float(hf.get("query_pre_attn_scalar", GEMMA3_DEFAULTS["query_pre_attn_scalar"])) ** -0.5
    cfg.update(GEMMA3_FEATURES)


def _set_mamba_fields(cfg, hf: Mapping) -> None:
    cfg.layer_pattern = "M"
    cfg.mamba.ffn = False
    cfg.mamba.d_state = int(hf.get("state_size", 16))
    cfg.mamba.d_conv = int(hf.get("conv_kernel", 4))
    cfg.mamba.expand = int(hf.get("expand", 2))
    rank = hf.get("time_step_rank", "auto")
    cfg.mamba.dt_rank = math.ceil(cfg.d_model / 16) if rank == "auto" else int(rank)
    cfg.rms_eps = float(hf.get("layer_norm_epsilon", 1e-5))
    # No attention layers: the smallest valid head layout (these fields are unused).
    cfg.n_heads, cfg.n_kv_heads, cfg.head_dim = 1, 1, 2
    cfg.d_ff = cfg.mamba.expand * cfg.d_model  # unused (no FFN), kept positive for validation


# ---------------------------------------------------------------------------------------- weight import


class Located(NamedTuple):
    path: str  # the safetensors file
    stored: str  # the tensor's name inside it (a legacy spelling, for some old checkpoints)


def checkpoint_files(hf_dir: str) -> dict[str, Located]:
    """Tensor name -> where it is stored (single file or shards listed in the index)."""
    safe_open, _ = _import_safetensors()
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = read_json(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"safetensors index {index_path!r} has no 'weight_map' of tensor -> file")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(hf_dir, s))]
        if missing:
            raise InputError(f"safetensors index {index_path!r} lists shard(s) that are missing from "
                             f"{hf_dir!r}: {missing}")
    elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
        shards = [SINGLE_FILE]
    else:
        raise InputError(f"{hf_dir!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights "
                         "are supported, not pytorch_model.bin)")
    located = {}
    for shard in shards:
        path = os.path.join(hf_dir, shard)
        try:
            with safe_open(path, framework="np") as fh:
                names = list(fh.keys())
        except Exception as err:  # the Rust reader raises its own error types for damaged files
            raise InputError(f"safetensors file {path!r} could not be read: {err}") from err
        for name in names:
            located[_LEGACY_NAMES.get(name, name)] = Located(path, name)
    return located


def _read_each(located: Mapping[str, Located], names, read):
    """Yield (name, read(file handle, stored name)) for `names`, opening each file once."""
    safe_open, _ = _import_safetensors()
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(located[name].path, []).append(name)
    for path, group in by_file.items():
        with safe_open(path, framework="np") as fh:
            for name in group:
                yield name, read(fh, located[name].stored)


def _check_tensor_names(entries: list[Entry], source: TensorSource, model_cfg, where: str) -> None:
    expected = {e.hf_name for e in entries if e.hf_name is not None}
    missing = sorted(expected - set(source.names))
    if missing:
        raise InputError(f"checkpoint {where!r} lacks {len(missing)} tensor(s) that {CONFIG_FILE} implies, "
                         f"first {missing[:4]}")
    allowed_extra = {"lm_head.weight"} if model_cfg.tie_embeddings else set()
    extra = sorted(n for n in set(source.names) - expected - allowed_extra if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise InputError(f"checkpoint {where!r} has {len(extra)} tensor(s) the jaxspec model has no place "
                         f"for (a feature {CONFIG_FILE} does not declare, or an unsupported variant), first "
                         f"{[(n, source.where(n)) for n in extra[:4]]}")


def _check_shapes(entries: list[Entry], source: TensorSource, shapes, where: str) -> None:
    """Every tensor's shape against the config's, before anything large is read."""
    by_name = {e.hf_name: e for e in entries if e.hf_name is not None}
    for name, got in source.shapes(list(by_name)):
        e = by_name[name]
        want = LAYOUTS[e.layout].hf_shape(shapes[e.path])
        if tuple(got) != want:
            raise InputError(f"tensor {name!r} in {source.where(name)!r} has shape {tuple(got)}, but "
                             f"{os.path.join(where, CONFIG_FILE)} implies {want}: weights and config "
                             "disagree")


def _check_tied_head(source: TensorSource, embedding: np.ndarray, where: str) -> None:
    """A tied model whose file also holds an lm_head must hold the same matrix there."""
    if "lm_head.weight" not in source.names:
        return
    (_, head), = source.values(["lm_head.weight"])
    if head.shape != embedding.shape or not np.array_equal(head, embedding):
        raise InputError(f"checkpoint {where!r}: tie_word_embeddings is true but lm_head.weight in "
                         f"{source.where('lm_head.weight')!r} differs from the input embedding")


def load_hf_checkpoint(hf_dir: str, dtype: str = "float32", max_len: int | None = None):
    """(model_cfg, params) of a Hugging Face checkpoint directory.

    `dtype` ("float32" | "bfloat16") is the dtype of the returned parameters and the model's compute dtype.
    `max_len` is the decode-state length (default: max_position_embeddings; 1024 for Mamba).
    """
    _import_safetensors()  # a missing extra is reported before anything else
    hf_config = read_hf_config(hf_dir)
    if dtype not in config_lib.DTYPES:
        raise InputError(f"dtype={dtype!r} is not allowed: one of {config_lib.DTYPES}")
    model_config_from_hf(hf_config, dtype, max_len, where=os.path.join(hf_dir, CONFIG_FILE))  # config errors first
    located = checkpoint_files(hf_dir)
    return params_from_hf_tensors(hf_config, TensorSource(
        names=frozenset(located),
        shapes=lambda names: _read_each(located, names, lambda fh, n: tuple(fh.get_slice(n).get_shape())),
        values=lambda names: _read_each(located, names, lambda fh, n: fh.get_tensor(n)),
        where=lambda name: located[name].path), dtype=dtype, max_len=max_len, where=hf_dir)


class TensorSource(NamedTuple):
    """Hugging Face-named tensors from any container (safetensors files, a GGUF file, a dict)."""

    names: frozenset  # every tensor name present
    shapes: Callable  # names -> iterable of (name, shape), read without the data where the format allows
    values: Callable  # names -> iterable of (name, np.ndarray)
    where: Callable  # name -> the file it lives in (for errors)


def dict_tensor_source(tensors: Mapping[str, np.ndarray], where: str) -> TensorSource:
    """A TensorSource over in-memory arrays (`where` names their origin in errors)."""
    return TensorSource(frozenset(tensors), lambda names: ((n, tuple(tensors[n].shape)) for n in names),
                        lambda names: ((n, tensors[n]) for n in names), lambda name: where)


def params_from_hf_tensors(hf_config: Mapping, source: TensorSource, dtype: str = "float32",
                           max_len: int | None = None, where: str = "checkpoint"):
    """(model_cfg, params) from a Hugging Face config dict and its tensors, every name and shape checked
    against the config before anything large is read."""
    if dtype not in config_lib.DTYPES:
        raise InputError(f"dtype={dtype!r} is not allowed: one of {config_lib.DTYPES}")
    model_cfg = model_config_from_hf(hf_config, dtype, max_len, where=os.path.join(where, CONFIG_FILE))
    entries = weight_entries(model_cfg, hf_family(hf_config), conv_bias=hf_config.get("use_conv_bias", True))
    _check_tensor_names(entries, source, model_cfg, where)
    shapes = param_shapes(model_cfg)
    _check_shapes(entries, source, shapes, where)
    flat = {e.path: jnp.zeros(shapes[e.path], dtype) for e in entries if e.hf_name is None}
    by_name = {e.hf_name: e for e in entries if e.hf_name is not None}
    for name, value in source.values(list(by_name)):
        e = by_name[name]
        flat[e.path] = jnp.asarray(np.ascontiguousarray(LAYOUTS[e.layout].to_jax(value)), dtype=dtype)
    if model_cfg.tie_embeddings:
        _check_tied_head(source, np.asarray(flat[("embed", "embedding")]), where)
    return model_cfg, traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------- tokenizer


def load_hf_tokenizer(hf_dir: str):
    """The checkpoint's tokenizer, read from its tokenizer files as transformers reads them (see
    `jaxspec.training.tokenizer`)."""
    from jaxspec.training.tokenizer import load_tokenizer

    if not os.path.isdir(hf_dir):
        raise InputError(f"{hf_dir!r} is not a Hugging Face checkpoint directory")
    return load_tokenizer(hf_dir)


# ------------------------------------------------------------------------------------------------- export


def extract_matformer(params, model_cfg, granularity):
    """(params, model_cfg) of one MatFormer granularity as a plain model with a single FFN width (a Hugging
    Face checkpoint has one intermediate_size); see `jaxspec.models.matformer.extract_submodel`."""
    sub_params, sub_cfg = extract_submodel(params, model_cfg, granularity)
    if tuple(sub_cfg.get("d_ff_per_layer", ())):
        raise InputError(f"granularity {granularity!r} mixes FFN widths across layers; a Hugging Face "
                         "checkpoint has one intermediate_size, so export one granularity for all layers")
    return sub_params, sub_cfg


def export_family(model_cfg) -> str:
    """The Hugging Face family that holds `model_cfg`: "gemma3" (every Gemma feature), "qwen2" (q/k/v
    biases) or "llama"; a model no family holds exactly raises an InputError naming the features."""
    gemma = {key: model_cfg[key] == value for key, value in GEMMA3_FEATURES.items()}
    if any(gemma.values()) and not all(gemma.values()):
        have = {key: model_cfg[key] for key in GEMMA3_FEATURES}
        raise InputError(f"model features {have} are a partial Gemma 3: a Hugging Face Gemma3ForCausalLM has all "
                         f"of {GEMMA3_FEATURES}, a Llama/Qwen2 none of them")
    windows = sorted({w for w in model_cfg.layer_windows if w})
    default_scale = config_lib.head_dim(model_cfg) ** -0.5
    if all(gemma.values()):
        if model_cfg.qkv_bias:
            raise InputError("model.qkv_bias=True: Gemma3ForCausalLM has no q/k/v biases")
        if len(windows) > 1:
            raise InputError(f"model.layer_windows={tuple(model_cfg.layer_windows)} has several window sizes "
                             f"{windows}; Gemma3ForCausalLM has one sliding_window")
        _gemma3_query_pre_attn_scalar(model_cfg)
        return "gemma3"
    if windows:
        raise InputError(f"model.layer_windows={tuple(model_cfg.layer_windows)}: a Llama/Qwen2 export has no "
                         "sliding windows")
    if model_cfg.query_scale and model_cfg.query_scale != default_scale:
        raise InputError(f"model.query_scale={model_cfg.query_scale}: a Llama/Qwen2 export scales scores by "
                         f"1/sqrt(head_dim)={default_scale}")
    return "qwen2" if model_cfg.qkv_bias else "llama"


def _gemma3_query_pre_attn_scalar(model_cfg) -> int:
    """Gemma's integer query_pre_attn_scalar whose ** -0.5 is model.query_scale exactly."""
    if not model_cfg.query_scale:
        return config_lib.head_dim(model_cfg)
    scalar = round(model_cfg.query_scale**-2)
    if scalar < 1 or scalar**-0.5 != model_cfg.query_scale:
        raise InputError(f"model.query_scale={model_cfg.query_scale} is not n ** -0.5 for an integer n; "
                         "Gemma3ForCausalLM scales scores by query_pre_attn_scalar ** -0.5 (an integer)")
    return scalar


def _gemma3_hf_fields(model_cfg) -> dict:
    """The Gemma3TextConfig fields beyond a Llama's: windows, per-layer-type RoPE, query scale, norms."""
    windows = tuple(model_cfg.layer_windows) or (0,) * model_cfg.n_layers
    local_theta = model_cfg.rope_local_theta or model_cfg.rope_theta
    return {
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _gemma3_query_pre_attn_scalar(model_cfg),
        "sliding_window": max(windows) or None,
        "layer_types": [GEMMA3_LAYER_TYPES[0] if w else GEMMA3_LAYER_TYPES[1] for w in windows],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": model_cfg.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "attention_bias": False,
    }


def _check_exportable(model_cfg) -> None:
    kinds = config_lib.layer_kinds(model_cfg)
    others = sorted({config_lib.MIXERS[k] for k in kinds if k != config_lib.MixerKind.ATTENTION})
    if others:
        raise InputError(f"model.layer_pattern={model_cfg.layer_pattern!r} has {others} layers; only "
                         "attention-only models (layer_pattern 'A') export to a Hugging Face Llama/Qwen2/Gemma 3")
    if model_cfg.d_model % model_cfg.n_heads:
        raise InputError(f"model.d_model={model_cfg.d_model} is not a multiple of "
                         f"n_heads={model_cfg.n_heads}, which transformers' Llama/Qwen2/Gemma 3 configs require")
    export_family(model_cfg)


def _check_param_shapes(params, model_cfg) -> None:
    want = param_shapes(model_cfg)
    got = {path: tuple(np.shape(x)) for path, x in traverse_util.flatten_dict(params).items()}
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            raise InputError(f"params do not match the model config at {'/'.join(path)}: shape "
                             f"{got.get(path)} in params, {want.get(path)} for the config")


def hf_config_for(model_cfg, dtype: str, tokenizer=None) -> dict:
    """config.json of the Hugging Face model equal to an attention-only jaxspec model."""
    family = export_family(model_cfg)
    special = {key: getattr(tokenizer, attr, None) for key, attr in
               (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id"))}
    stop_ids = tuple(getattr(tokenizer, "eos_ids", ()))
    if stop_ids:  # generation's stop set, a list when the checkpoint declared several
        special["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
    for key, value in special.items():
        for one in value if isinstance(value, list) else [value]:
            if one is not None and not 0 <= one < model_cfg.vocab_size:
                raise InputError(f"tokenizer {tokenizer!r}: {key}={one} is outside the model's vocabulary "
                                 f"[0, {model_cfg.vocab_size})")
    config = {
        "architectures": [EXPORT_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.d_ff,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.n_kv_heads,
        "head_dim": config_lib.head_dim(model_cfg),
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_len,
        "rms_norm_eps": model_cfg.rms_eps,
        # Both spellings: transformers 5 reads rope_parameters, earlier releases rope_theta.
        "rope_theta": model_cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        "tie_word_embeddings": bool(model_cfg.tie_embeddings),
        "dtype": dtype,
        "torch_dtype": dtype,
        **special,
    }
    if family == "gemma3":
        for key in ("hidden_act", "rope_theta"):  # Gemma3TextConfig spells these differently
            del config[key]
        config.update(_gemma3_hf_fields(model_cfg))
    elif family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def export_hf_checkpoint(params, model_cfg, out_dir: str, *, granularity=None, dtype: str = "float32",
                         tokenizer=None) -> str:
    """Write an attention-only jaxspec model as a Hugging Face checkpoint that transformers loads.

    The target is LlamaForCausalLM, Qwen2ForCausalLM when the model has q/k/v biases, or Gemma3ForCausalLM
    when it has the Gemma features (GEMMA3_FEATURES, with any sliding windows of one size). A MatFormer
    model exports its full FFN, or one `granularity` (see `extract_matformer`). A `tokenizer` supplies the
    bos/eos/pad ids, and its tokenizer.json is copied when it has one. Returns the config.json path.

    Every file is written under a temporary name and renamed into place, config.json last (after removing an
    older one), so an export killed midway leaves no config.json: nothing loads a half-written directory.
    """
    _, save_file = _import_safetensors()
    if dtype not in config_lib.DTYPES:
        raise InputError(f"dtype={dtype!r} is not allowed: one of {config_lib.DTYPES}")
    config_lib.validate_model_config(model_cfg)
    _check_exportable(model_cfg)
    _check_param_shapes(params, model_cfg)
    params, model_cfg = extract_matformer(params, model_cfg, granularity)
    family = export_family(model_cfg)
    flat = traverse_util.flatten_dict(params)
    tensors = {}
    for e in weight_entries(model_cfg, family):
        # Layout first, then the dtype: an unfolded Gemma norm keeps its float32 precision until the cast.
        value = LAYOUTS[e.layout].to_hf(np.asarray(jax.device_get(flat[e.path])))
        tensors[e.hf_name] = np.ascontiguousarray(value.astype(dtype))
    if os.path.isfile(os.path.join(out_dir, INDEX_FILE)):
        raise InputError(f"{out_dir!r} holds a sharded checkpoint ({INDEX_FILE}), which would be read in place of "
                         "the export; export into a fresh directory")
    os.makedirs(out_dir, exist_ok=True)
    _remove_partial_files(out_dir)
    suffix = f"{_PARTIAL}{uuid.uuid4().hex}"
    staged = {name: os.path.join(out_dir, name + suffix) for name in (SINGLE_FILE, TOKENIZER_FILE, CONFIG_FILE)}
    tokenizer_path = getattr(tokenizer, "path", None)
    if not (tokenizer_path and os.path.isfile(tokenizer_path)):
        del staged[TOKENIZER_FILE]
    try:
        save_file(tensors, staged[SINGLE_FILE], metadata={"format": "pt"})
        if TOKENIZER_FILE in staged:
            shutil.copyfile(tokenizer_path, staged[TOKENIZER_FILE])
        with open(staged[CONFIG_FILE], "w") as fh:
            json.dump(hf_config_for(model_cfg, dtype, tokenizer), fh, indent=2, sort_keys=True)
    except BaseException:
        _remove_partial_files(out_dir)
        raise
    _publish(out_dir, staged)
    return os.path.join(out_dir, CONFIG_FILE)


# Infix of the temporary names an export writes its files under before renaming them into place.
_PARTIAL = ".partial-"


def _remove_partial_files(out_dir: str) -> None:
    """Delete the temporary files an export into `out_dir` that was killed midway left behind (nothing reads
    them)."""
    for name in os.listdir(out_dir):
        if _PARTIAL in name and name.split(_PARTIAL)[0] in (SINGLE_FILE, TOKENIZER_FILE, CONFIG_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))


def _publish(out_dir: str, staged: Mapping[str, str]) -> None:
    """Rename the staged files into place so that the directory is a checkpoint only when every file is the new
    one: config.json (what makes a directory a checkpoint) is removed first and renamed in last, so an export
    killed in between leaves a directory that every reader refuses for its missing config.json."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, CONFIG_FILE))
    for name in sorted(staged, key=lambda n: n == CONFIG_FILE):
        os.replace(staged[name], os.path.join(out_dir, name))


__all__ = [
    "ARCHITECTURES",
    "export_hf_checkpoint",
    "extract_matformer",
    "hf_config_for",
    "load_hf_checkpoint",
    "params_from_hf_tensors",
    "dict_tensor_source",
    "export_family",
    "load_hf_tokenizer",
    "model_config_from_hf",
    "weight_entries",
]
