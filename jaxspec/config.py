"""Shared config defaults, `arg` parsing and validation.

Every `configs/*.py` builds on `base_config()`; `validate(config)` runs before any compute so a wrong value
fails at start with the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import enum
import math
from collections.abc import Mapping

import ml_collections

from jaxspec.errors import InputError


class MixerKind(str, enum.Enum):
    """The mixer of one layer: one letter of `model.layer_pattern` (the contract is `models/mixer.Mixer`).

    A str enum, so a member equals and hashes like its letter; configs keep writing the pattern as letters.
    """

    ATTENTION = "A"
    LINEAR_ATTENTION = "L"
    MAMBA = "M"

    def __str__(self) -> str:
        return self.value


# Pattern letter -> mixer name, for messages: {"A": "attention", "L": "linear_attention", "M": "mamba"}.
MIXERS = {kind.value: kind.name.lower() for kind in MixerKind}

FEATURE_MAPS = ("elu1", "identity", "relu")
DECAYS = ("none", "retnet")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "pallas")
# Full-sequence (prefill) attention: dense, or block-sparse with the tiles chosen by XAttention or FlexPrefill
# ("block_sparse" is the earlier name of "xattention").
PREFILL_MODES = ("dense", "xattention", "flexprefill", "block_sparse")
DTYPES = ("float32", "bfloat16")
# Storage of the projection weights in the decode layout (jaxspec/models/decode_layout.py).
WEIGHT_DTYPES = ("float32", "int8")
# FFN gate activations: SwiGLU (Llama) or GeGLU with gelu's tanh approximation (Gemma).
FFN_ACTIVATIONS = ("silu", "gelu_tanh")


class ConfigError(InputError):
    """A config value that is not allowed; the message names the key, the value and what is allowed."""


def model_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=264,  # byte tokenizer (259 ids) rounded up to a multiple of 8
            d_model=128,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            head_dim=0,  # 0: d_model // n_heads
            d_ff=384,
            layer_pattern="A",  # one letter per layer (A attention, L linear attention, M mamba), tiled
            rope_theta=10000.0,
            rms_eps=1e-6,
            tie_embeddings=True,
            qkv_bias=False,
            max_len=1024,  # context length a decode state holds
            dtype="float32",
            weight_dtype="float32",  # one of WEIGHT_DTYPES: int8 is weight-only, per output channel, when decoding
            # Run repeats of the layer pattern as one scan (models/layer_scan.py): compiles 3-5x faster, steps
            # about as fast (docs/benchmarks.md, "Scanned layers"). Same outputs either way.
            scan_layers=False,
            # MatFormer nested FFN: hidden fractions of d_ff, smallest first; (1.0,) is a plain SwiGLU.
            matformer_fractions=(1.0,),
            # Full FFN width of each layer, for sub-models whose layers differ (MatFormer Mix'n'Match
            # extraction); empty: every layer uses d_ff.
            d_ff_per_layer=(),
            ffn_activation="silu",  # one of FFN_ACTIVATIONS
            embed_scale=False,  # token embeddings times sqrt(d_model) (Gemma)
            qk_norm=False,  # RMSNorm over head_dim on queries and keys, per head, before RoPE (Gemma 3)
            sandwich_norms=False,  # extra norms on the mixer and FFN outputs before each residual add (Gemma)
            query_scale=0.0,  # attention score scale; 0.0: 1/sqrt(head_dim)
            # Sliding window of each layer: key j is visible to query i iff i - window < j <= i; 0 is global.
            # Empty: every layer is global.
            layer_windows=(),
            rope_local_theta=0.0,  # RoPE base of layers with a window; 0.0: rope_theta
            linear_attention=dict(feature_map="elu1", decay="retnet", chunk_size=64),
            mamba=dict(d_state=16, d_conv=4, expand=2, dt_rank=0, ffn=False),
            attention=dict(
                implementation="xla",
                prefill="dense",
                block_size=64,
                xattention_stride=8,
                xattention_threshold=0.9,
                flexprefill_gamma=0.9,  # attention share the chosen lines or tiles hold
                flexprefill_tau=0.1,  # pooled-estimate divergence under which a head is query-aware
            ),
        )
    )


def data_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(source="stdlib", tokenizer="bytes", seq_len=128, batch_size=8, val_fraction=0.05,
             max_bytes=2_000_000, seed=0,
             # Where a self-distillation example's window starts: "start" (its first token) or "reply" (the
             # position before its first reply token, for drafters that read each position on its own).
             window="start")
    )


def mesh_defaults() -> ml_collections.ConfigDict:
    """Mesh axis sizes and logical-axis rules (defined beside the mesh code, which owns their meaning)."""
    from jaxspec.parallel.mesh import default_mesh_config

    return default_mesh_config()


def base_config() -> ml_collections.ConfigDict:
    """Model, data and mesh sections; launch-specific sections (train, decode) are added by configs."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_defaults()
    config.data = data_defaults()
    config.mesh = mesh_defaults()
    return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """big_vision-style `arg`: "tiny" or "size=tiny,steps=10" -> ConfigDict over `defaults`.

    A bare word sets the first default key; values are parsed as int/float/bool when they look like one.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    first = next(iter(defaults)) if defaults else None
    for item in arg.split(","):
        if not item:
            continue
        if "=" in item:
            key, value = item.split("=", 1)
        elif first is not None:
            key, value = first, item
        else:
            raise ConfigError(f"config arg {item!r} needs key=value (no defaults declared)")
        if key not in out:
            raise ConfigError(f"config arg key {key!r} is unknown; allowed: {sorted(out.keys())}")
        out[key] = _parse_value(value, out[key])
    return out


def _parse_value(value: str, like):
    if isinstance(like, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"expected a bool, got {value!r}")
        return value.lower() in ("true", "1")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def layer_kinds(model_cfg) -> tuple[MixerKind, ...]:
    """The mixer kind of each layer: the letters of `layer_pattern` tiled over `n_layers`."""
    pattern = model_cfg.layer_pattern
    return tuple(MixerKind(pattern[i % len(pattern)]) for i in range(model_cfg.n_layers))


def head_dim(model_cfg) -> int:
    return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads


def ffn_hidden_sizes(model_cfg, layer: int | None = None) -> tuple[int, ...]:
    """Hidden width of each MatFormer granularity (prefix slices of the layer's full width).

    The full width is d_ff, or d_ff_per_layer[layer] when the config sets per-layer widths (then `layer`
    is required).
    """
    if model_cfg.d_ff_per_layer:
        if layer is None:
            raise InputError("ffn_hidden_sizes: the config sets d_ff_per_layer, so pass the layer index")
        full = model_cfg.d_ff_per_layer[layer]
    else:
        full = model_cfg.d_ff
    return tuple(int(round(f * full)) for f in model_cfg.matformer_fractions)


def layer_window(model_cfg, layer: int) -> int:
    """Sliding-window size of `layer` (0: global attention)."""
    return model_cfg.layer_windows[layer] if model_cfg.layer_windows else 0


def layer_rope_theta(model_cfg, layer: int) -> float:
    """RoPE base of `layer`: rope_local_theta for windowed layers when it is set, else rope_theta."""
    if layer_window(model_cfg, layer) and model_cfg.rope_local_theta:
        return model_cfg.rope_local_theta
    return model_cfg.rope_theta


def mamba_dims(model_cfg) -> tuple[int, int]:
    """(d_inner, dt_rank) of the Mamba mixer."""
    d_inner = model_cfg.mamba.expand * model_cfg.d_model
    dt_rank = model_cfg.mamba.dt_rank or math.ceil(model_cfg.d_model / 16)
    return d_inner, dt_rank


def nearest_keys(key: str, allowed) -> str:
    """'did you mean ...?' with the allowed keys closest to `key`, or '' when none is close."""
    close = difflib.get_close_matches(key, [str(k) for k in allowed], n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def check_keys(cfg: Mapping, template: Mapping, path: str) -> None:
    """Unknown keys are typos that would otherwise be ignored silently."""
    for key in cfg:
        if key not in template:
            raise ConfigError(f"unknown config key {path}.{key}{nearest_keys(key, template.keys())}; allowed: "
                              f"{sorted(template.keys())}")
        if _is_section(template[key]) and _is_section(cfg[key]):
            check_keys(cfg[key], template[key], f"{path}.{key}")


def check_same_keys(cfg: Mapping, template: Mapping) -> None:
    """A whole config of a fixed shape (a launch script's own): no unknown key, none missing."""
    check_keys(cfg, template, "config")
    missing = sorted(k for k in template if k not in cfg)
    if missing:
        raise ConfigError(f"config lacks the keys {missing}")


def _is_section(value) -> bool:
    # ConfigDict (and FrozenConfigDict) is not a collections.abc.Mapping.
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def require(ok: bool, key: str, value, allowed: str) -> None:
    """Raise a ConfigError naming config.`key`, its value and what is allowed, unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is not allowed: {allowed}")


def is_int(value) -> bool:
    """An int that is not a bool (config values)."""
    return isinstance(value, int) and not isinstance(value, bool)


def validate_model_config(cfg, path: str = "model") -> None:
    """Raise ConfigError naming the key, the value and what is allowed."""
    check_keys(cfg, model_defaults(), path)
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
        require(is_int(cfg[key]) and cfg[key] > 0, f"{path}.{key}", cfg[key], "a positive integer")
    require(is_int(cfg.head_dim) and cfg.head_dim >= 0, f"{path}.head_dim", cfg.head_dim,
             "0 (derived) or a positive integer")
    require(cfg.n_heads % cfg.n_kv_heads == 0, f"{path}.n_kv_heads", cfg.n_kv_heads,
             f"a divisor of n_heads={cfg.n_heads}")
    if not cfg.head_dim:
        require(cfg.d_model % cfg.n_heads == 0, f"{path}.n_heads", cfg.n_heads,
                 f"a divisor of d_model={cfg.d_model} (or set head_dim)")
    require(head_dim(cfg) % 2 == 0, f"{path}.head_dim", head_dim(cfg), "an even number (RoPE rotates pairs)")
    require(bool(cfg.layer_pattern) and all(c in MIXERS for c in cfg.layer_pattern),
             f"{path}.layer_pattern", cfg.layer_pattern, f"letters from {sorted(MIXERS)} ({MIXERS})")
    require(is_number(cfg.rope_theta) and cfg.rope_theta > 0, f"{path}.rope_theta", cfg.rope_theta, "a positive number")
    require(is_number(cfg.rms_eps) and cfg.rms_eps > 0, f"{path}.rms_eps", cfg.rms_eps, "a positive number")
    require(cfg.dtype in DTYPES, f"{path}.dtype", cfg.dtype, f"one of {DTYPES}")
    require(cfg.get("weight_dtype", "float32") in WEIGHT_DTYPES, f"{path}.weight_dtype", cfg.get("weight_dtype"),
             f"one of {WEIGHT_DTYPES}")
    require(isinstance(cfg.get("scan_layers", False), bool), f"{path}.scan_layers", cfg.get("scan_layers"),
            "True or False")
    fractions = tuple(cfg.matformer_fractions)
    require(len(fractions) > 0 and all(is_number(f) and 0 < f <= 1 for f in fractions), f"{path}.matformer_fractions",
             fractions, "a non-empty tuple of fractions in (0, 1]")
    require(list(fractions) == sorted(set(fractions)) and fractions[-1] == 1.0, f"{path}.matformer_fractions",
             fractions, "strictly increasing, ending with 1.0 (the full model)")
    per_layer = tuple(cfg.d_ff_per_layer)
    require(not per_layer or (len(per_layer) == cfg.n_layers
                               and all(isinstance(w, int) and w > 0 for w in per_layer)),
             f"{path}.d_ff_per_layer", per_layer, f"() or n_layers={cfg.n_layers} positive integers")
    for width in sorted(set(per_layer or (cfg.d_ff,))):
        for f in fractions:
            require(abs(f * width - round(f * width)) < 1e-6 and round(f * width) > 0,
                     f"{path}.matformer_fractions", f, f"fractions whose share of d_ff={width} is a whole number")
    _validate_gemma_features(cfg, path)
    la = cfg.linear_attention
    require(la.feature_map in FEATURE_MAPS, f"{path}.linear_attention.feature_map", la.feature_map,
             f"one of {FEATURE_MAPS}")
    require(la.decay in DECAYS, f"{path}.linear_attention.decay", la.decay, f"one of {DECAYS}")
    require(is_int(la.chunk_size) and la.chunk_size > 0, f"{path}.linear_attention.chunk_size", la.chunk_size,
             "a positive integer")
    mb = cfg.mamba
    for key in ("d_state", "d_conv", "expand"):
        require(is_int(mb[key]) and mb[key] > 0, f"{path}.mamba.{key}", mb[key], "a positive integer")
    require(mb.d_conv >= 2, f"{path}.mamba.d_conv", mb.d_conv, "at least 2")
    require(is_int(mb.dt_rank) and mb.dt_rank >= 0, f"{path}.mamba.dt_rank", mb.dt_rank,
             "0 (auto) or a positive integer")
    at = cfg.attention
    require(at.implementation in ATTENTION_IMPLEMENTATIONS, f"{path}.attention.implementation",
             at.implementation, f"one of {ATTENTION_IMPLEMENTATIONS}")
    require(at.prefill in PREFILL_MODES, f"{path}.attention.prefill", at.prefill, f"one of {PREFILL_MODES}")
    require(is_int(at.block_size) and at.block_size > 0, f"{path}.attention.block_size", at.block_size,
             "a positive integer")
    require(is_number(at.xattention_threshold) and 0 < at.xattention_threshold <= 1,
             f"{path}.attention.xattention_threshold", at.xattention_threshold, "a number in (0, 1]")
    gamma, tau = at.flexprefill_gamma, at.flexprefill_tau
    require(is_number(gamma) and 0 < gamma <= 1, f"{path}.attention.flexprefill_gamma", gamma, "a number in (0, 1]")
    require(is_number(tau) and 0 <= tau <= 1, f"{path}.attention.flexprefill_tau", tau, "a number in [0, 1]")
    require(at.prefill == "dense" or not any(cfg.layer_windows), f"{path}.attention.prefill", at.prefill,
             f"'dense' when layer_windows sets sliding windows ({tuple(cfg.layer_windows)}): block-sparse "
             "prefill has no window")


def with_defaults(cfg, defaults) -> ml_collections.ConfigDict:
    """A copy of `cfg` with every key of `defaults` it lacks (recursively) set to the default: a config saved
    before a key existed (a converted checkpoint's config.json) reads as it did, since a new key's default keeps
    the earlier behaviour."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(out[key], ml_collections.ConfigDict):
            out[key] = with_defaults(out[key], value)
    return out


def is_number(value) -> bool:
    """An int or float that is not a bool (config values)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_gemma_features(cfg, path: str) -> None:
    """FFN activation, embedding scale, q/k norms, sandwich norms, query scale, sliding windows, local RoPE."""
    require(cfg.ffn_activation in FFN_ACTIVATIONS, f"{path}.ffn_activation", cfg.ffn_activation,
             f"one of {FFN_ACTIVATIONS}")
    for key in ("embed_scale", "qk_norm", "sandwich_norms"):
        require(isinstance(cfg[key], bool), f"{path}.{key}", cfg[key], "True or False")
    require(is_number(cfg.query_scale) and cfg.query_scale >= 0, f"{path}.query_scale", cfg.query_scale,
             "0.0 (1/sqrt(head_dim)) or a positive number")
    require(is_number(cfg.rope_local_theta) and cfg.rope_local_theta >= 0, f"{path}.rope_local_theta",
             cfg.rope_local_theta, "0.0 (same as rope_theta) or a positive number")
    windows = tuple(cfg.layer_windows)
    require(not windows or len(windows) == cfg.n_layers, f"{path}.layer_windows", windows,
             f"() (every layer global) or one window per layer (n_layers={cfg.n_layers} entries)")
    require(all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in windows),
             f"{path}.layer_windows", windows, "non-negative integers (0: global attention)")
    kinds = layer_kinds(cfg)
    not_attention = [i for i, w in enumerate(windows) if w and kinds[i] != MixerKind.ATTENTION]
    require(not not_attention, f"{path}.layer_windows", windows,
             f"0 on layers that are not attention (layers {not_attention} of layer_pattern={cfg.layer_pattern!r})")


def validate_granularity(model_cfg, granularity) -> tuple[int, ...] | None:
    """None (full model), one index for every layer, or one index per layer (Mix'n'Match)."""
    if granularity is None:
        return None
    n = len(model_cfg.matformer_fractions)
    per_layer = (granularity,) * model_cfg.n_layers if isinstance(granularity, int) else tuple(granularity)
    if len(per_layer) != model_cfg.n_layers:
        raise ConfigError(f"granularity {granularity!r} has {len(per_layer)} entries; the model has "
                          f"n_layers={model_cfg.n_layers}")
    for g in per_layer:
        if not isinstance(g, int) or not 0 <= g < n:
            raise ConfigError(f"MatFormer granularity {g!r} is not in the configured set: indices 0..{n - 1} of "
                              f"matformer_fractions={tuple(model_cfg.matformer_fractions)}")
    return per_layer


def validate_skip_layers(model_cfg, skip_layers) -> tuple[int, ...]:
    skip = tuple(sorted(set(skip_layers or ())))
    for i in skip:
        if not isinstance(i, int) or not 0 <= i < model_cfg.n_layers:
            raise ConfigError(f"skip_layers entry {i!r} is not a layer index in 0..{model_cfg.n_layers - 1}")
    if len(skip) >= model_cfg.n_layers:
        raise ConfigError(f"skip_layers={skip} skips every layer of the model")
    return skip


def validate_skip_ffn(model_cfg, skip_ffn) -> tuple[int, ...]:
    """Sorted layer indices whose FFN sub-block is skipped; each must be a layer that has an FFN."""
    skip = tuple(sorted(set(skip_ffn or ())))
    kinds = layer_kinds(model_cfg)
    for i in skip:
        if not is_int(i) or not 0 <= i < model_cfg.n_layers:
            raise ConfigError(f"skip_ffn entry {i!r} is not a layer index in 0..{model_cfg.n_layers - 1}")
        if kinds[i] == MixerKind.MAMBA and not model_cfg.mamba.ffn:
            raise ConfigError(f"skip_ffn entry {i}: layer {i} is a Mamba block without an FFN (mamba.ffn=False)")
    return skip
