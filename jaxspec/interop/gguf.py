"""GGUF checkpoints in: llama.cpp's single-file format, read into jaxspec params.

    model_cfg, params = load_gguf_checkpoint("model.gguf")          # llama (SmolLM2, Llama 2) / gemma3
    hf_config = gguf_hf_config("model.gguf")                         # the config.json transformers would hold

A GGUF file holds the hyperparameters as metadata under llama.cpp's key names and the tensors under llama.cpp's
names, quantised or not, in llama.cpp's layouts. Import turns both into what the Hugging Face checkpoint of the
same model holds: a config dict and Hugging Face-named float32 tensors, built by `hf.params_from_hf_tensors`,
so every check of the Hugging Face import applies here too. Names and shapes come from the tensor table, so a
file that disagrees with its own metadata is rejected before anything is dequantised.

Where llama.cpp's layout differs from Hugging Face's, the difference is undone the way transformers' own GGUF
loader undoes it: GGUF lists dimensions fastest-first (reversed against numpy), llama.cpp interleaves the rows
of Llama's query and key projections for its RoPE kernel, and Gemma norms are stored with their +1 added.

The `gguf` package is imported only when a function needs it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from jaxspec.errors import InputError
from jaxspec.interop import hf

ARCHITECTURES = ("gemma3", "llama")
# Storage types this import dequantises (gguf.GGMLQuantizationType names).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K")

# Gemma 3 facts llama.cpp fixes in code rather than in the file: every 6th layer is global, the others see a
# 512-token window with their own RoPE base.
_GEMMA3_SLIDING_PATTERN = 6
_GEMMA3_LOCAL_ROPE_THETA = 10000.0
_GEMMA3_27B_LAYERS = 62  # the one size whose queries llama.cpp scales by hidden_size / heads, not head_dim

_MISSING = object()


def _import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError("GGUF files need the 'gguf' package: pip install gguf") from err
    return gguf


class GGUFFile(NamedTuple):
    """An opened GGUF file: its path (for messages) and its parsed header (tensors stay memory-mapped)."""

    path: str
    reader: Any  # gguf.GGUFReader


def open_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header and tensor table; a damaged file is an InputError naming it."""
    gguf = _import_gguf()
    if not os.path.isfile(path):
        raise InputError(f"GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # a truncated or corrupt file surfaces as ValueError, IndexError, KeyError, ...
        raise InputError(f"GGUF file {path!r} could not be read (truncated or corrupt): "
                         f"{type(err).__name__}: {err}") from err
    return GGUFFile(path, reader)


def metadata(file: GGUFFile, key: str, default=_MISSING):
    """One metadata value as a Python value (int, float, bool, str or list); `default` when absent."""
    field = file.reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise InputError(f"GGUF file {file.path!r} lacks the metadata key {key!r}")
        return default
    try:
        return field.contents()
    except Exception as err:  # e.g. a string that is not UTF-8
        raise InputError(f"GGUF file {file.path!r}: metadata key {key!r} could not be read: {err}") from err


def architecture(file: GGUFFile) -> str:
    arch = metadata(file, "general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"GGUF file {file.path!r}: architecture {arch!r} is not supported; supported: "
                         f"{list(ARCHITECTURES)}")
    return arch


# ------------------------------------------------------------------------------------------------ config


def _scalar(file: GGUFFile, key: str, default=_MISSING):
    """A per-model value; llama.cpp may write a per-layer array, accepted when all layers agree."""
    value = metadata(file, key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise InputError(f"GGUF file {file.path!r}: {key}={value} differs across layers, which jaxspec "
                             "does not support")
        value = value[0]
    return value


def _vocab_size(file: GGUFFile, arch: str) -> int:
    """The declared vocabulary size, else the token list's length, else the embedding's rows."""
    declared = metadata(file, f"{arch}.vocab_size", None)
    if declared is not None:
        return int(declared)
    tokens = file.reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    for tensor in file.reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])
    raise InputError(f"GGUF file {file.path!r} states no vocabulary size: no {arch}.vocab_size, no "
                     "tokenizer.ggml.tokens and no token_embd.weight")


def _special_ids(file: GGUFFile) -> dict:
    """bos/eos/pad/unk ids the file declares (absent ones are None, as on a transformers config)."""
    return {name: metadata(file, f"tokenizer.ggml.{key}", None) for name, key in (
        ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id"))}


def _rope_scaling(file: GGUFFile, arch: str) -> dict:
    """RoPE scaling the file declares ({} for none), in transformers' rope_parameters spelling."""
    kind = metadata(file, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return {}
    scaling = {"rope_type": kind}
    factor = metadata(file, f"{arch}.rope.scaling.factor", None)
    if factor is not None:
        scaling["factor"] = float(factor)
    original = metadata(file, f"{arch}.rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _common_config(file: GGUFFile, arch: str) -> dict:
    key = lambda name, default=_MISSING: _scalar(file, f"{arch}.{name}", default)  # noqa: E731
    heads = int(key("attention.head_count"))
    expert_count = key("expert_count", 0)
    if expert_count:
        raise InputError(f"GGUF file {file.path!r} is a mixture of experts ({arch}.expert_count={expert_count}), "
                         "which jaxspec does not support")
    return {
        "vocab_size": _vocab_size(file, arch),
        "hidden_size": int(key("embedding_length")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": all(t.name != "output.weight" for t in file.reader.tensors),
        "attention_bias": False,
        **_special_ids(file),
    }


def _llama_config(file: GGUFFile) -> dict:
    config = _common_config(file, "llama")
    head_dim = int(_scalar(file, "llama.attention.key_length", config["hidden_size"] // config["num_attention_heads"]))
    rotary = int(_scalar(file, "llama.rope.dimension_count", head_dim))
    theta = float(_scalar(file, "llama.rope.freq_base", 10000.0))
    config.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        head_dim=head_dim,
        hidden_act="silu",
        mlp_bias=False,
        # Both spellings: transformers 5 reads rope_parameters, earlier releases rope_theta.
        rope_theta=theta,
        rope_parameters={"rope_type": "default", "rope_theta": theta, **_rope_scaling(file, "llama")},
    )
    if rotary != head_dim:  # RoPE on part of each head: kept, so the config check can name it
        config["partial_rotary_factor"] = rotary / head_dim
    return config


def _gemma3_config(file: GGUFFile) -> dict:
    config = _common_config(file, "gemma3")
    n_layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = int(_scalar(file, "gemma3.attention.key_length", 256))
    theta = float(_scalar(file, "gemma3.rope.freq_base", 1_000_000.0))
    local_theta = float(_scalar(file, "gemma3.rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_THETA))
    query_scalar = config["hidden_size"] // heads if n_layers == _GEMMA3_27B_LAYERS else head_dim
    config.update(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        head_dim=head_dim,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=query_scalar,
        sliding_window=int(_scalar(file, "gemma3.attention.sliding_window")),
        _sliding_window_pattern=_GEMMA3_SLIDING_PATTERN,
        layer_types=["full_attention" if (i + 1) % _GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
                     for i in range(n_layers)],
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        use_bidirectional_attention=False,
        # Both spellings, as for llama; scaling (4B and larger) applies to the global layers only.
        rope_theta=theta,
        rope_local_base_freq=local_theta,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": theta, **_rope_scaling(file, "gemma3")},
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
    )
    return config


_CONFIG_BUILDERS: dict[str, Callable[[GGUFFile], dict]] = {"llama": _llama_config, "gemma3": _gemma3_config}


def hf_config_from_gguf(file: GGUFFile) -> dict:
    """The config.json of the Hugging Face checkpoint an opened GGUF file holds."""
    return _CONFIG_BUILDERS[architecture(file)](file)


def gguf_hf_config(path: str) -> dict:
    """The config.json of the Hugging Face checkpoint the GGUF file at `path` holds."""
    return hf_config_from_gguf(open_gguf(path))


# ----------------------------------------------------------------------------------------------- tensors

# GGUF tensor name -> Hugging Face name; per block, the leaf names differ between the families (llama.cpp's
# ffn_norm is Llama's only FFN norm, but Gemma's pre-FFN one of two).
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_COMMON_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_BLOCK_NAMES = {
    "llama": {**_COMMON_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_COMMON_BLOCK_NAMES,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str, arch: str) -> str:
    """The Hugging Face name of a GGUF tensor; a name without one is kept, so the import can reject it."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _BLOCK_NAMES[arch]:
        return f"model.layers.{match[1]}.{_BLOCK_NAMES[arch][match[2]]}.{match[3]}"
    return gguf_name


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for Llama's q/k projections ([out, in], `heads` heads).

    llama.cpp stores each head's rows as (half, pair) where Hugging Face has (pair, half): RoPE rotates
    adjacent rows in llama.cpp's kernel and the two half-heads in transformers'.
    """
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise InputError(f"cannot undo the RoPE row order of a [{rows}, ...] projection over {heads} heads")
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _value_fix(hf_name: str, arch: str, hf_config: dict) -> Callable[[np.ndarray], np.ndarray] | None:
    """How a tensor's values differ from Hugging Face's (None: they do not)."""
    if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
        return lambda w: unpermute_rope_rows(w, hf_config["num_attention_heads"])
    if arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
        return lambda w: unpermute_rope_rows(w, hf_config["num_key_value_heads"])
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        return lambda w: w - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w) scales
    return None


def _numpy_shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists the fastest dimension first


def check_tensor_types(file: GGUFFile) -> None:
    """Every tensor is stored in a type this import can dequantise."""
    for tensor in file.reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise InputError(f"GGUF file {file.path!r}: tensor {tensor.name!r} is stored as {kind}, which jaxspec "
                             f"cannot dequantise; supported types: {list(SUPPORTED_TYPES)}")


def dequantize(file: GGUFFile, tensor) -> np.ndarray:
    """A tensor's values as float32 in numpy layout."""
    gguf = _import_gguf()
    shape = _numpy_shape(tensor)
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(values, dtype=np.float32).reshape(shape)
    except Exception as err:  # a block table whose size does not match its shape
        raise InputError(f"GGUF file {file.path!r}: tensor {tensor.name!r} ({tensor.tensor_type.name}, shape "
                         f"{shape}) could not be dequantised: {err}") from err


def tensor_source(file: GGUFFile, hf_config: dict) -> hf.TensorSource:
    """The file's tensors under Hugging Face names: shapes from the table, values dequantised on demand."""
    arch = architecture(file)
    tensors = {}
    for tensor in file.reader.tensors:
        name = hf_tensor_name(tensor.name, arch)
        if name in tensors:
            raise InputError(f"GGUF file {file.path!r} holds two tensors for {name!r}")
        tensors[name] = tensor

    def values(names):
        for name in names:
            value = dequantize(file, tensors[name])
            fix = _value_fix(name, arch, hf_config)
            yield name, value if fix is None else fix(value)

    return hf.TensorSource(
        names=frozenset(tensors),
        shapes=lambda names: ((name, _numpy_shape(tensors[name])) for name in names),
        values=values,
        where=lambda name: f"{file.path} (GGUF tensor {tensors[name].name})")


def checkpoint_from_gguf(file: GGUFFile, dtype: str = "float32", max_len: int | None = None):
    """(model_cfg, params) of an opened GGUF file; see `load_gguf_checkpoint`."""
    hf_config = hf_config_from_gguf(file)
    hf.model_config_from_hf(hf_config, dtype, max_len, where=f"{file.path} (metadata)")  # config errors first
    check_tensor_types(file)
    return hf.params_from_hf_tensors(hf_config, tensor_source(file, hf_config), dtype=dtype, max_len=max_len,
                                     where=file.path)


def load_gguf_checkpoint(path: str, dtype: str = "float32", max_len: int | None = None):
    """(model_cfg, params) of a GGUF file.

    `dtype` ("float32" | "bfloat16") is the dtype of the returned parameters and the model's compute dtype;
    quantised tensors are dequantised to float32 first. `max_len` is the decode-state length (default: the
    file's context_length).
    """
    return checkpoint_from_gguf(open_gguf(path), dtype, max_len)


__all__ = [
    "ARCHITECTURES",
    "GGUFFile",
    "SUPPORTED_TYPES",
    "checkpoint_from_gguf",
    "gguf_hf_config",
    "hf_config_from_gguf",
    "hf_tensor_name",
    "load_gguf_checkpoint",
    "metadata",
    "open_gguf",
    "unpermute_rope_rows",
]
