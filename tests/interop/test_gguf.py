"""GGUF import against transformers' own GGUF loader: logits, config, tokenizers, bad files, workdir imports.

Every GGUF file is written here with `gguf.GGUFWriter` from a tiny random transformers model (tensors renamed
with the gguf package's own name map, laid out as llama.cpp lays them) or a tokenizer trained here; nothing is
downloaded.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import traverse_util

from jaxspec.interop import gguf as gguf_import
from jaxspec.interop import gguf_tokenizer, workdir
from jaxspec.models.lm import build_model
from jaxspec.training import checkpoint as checkpoint_lib
from jaxspec.training.tokenizer import load_tokenizer

torch.set_num_threads(1)  # tiny matmuls: thread start-up costs more than it saves on a shared CPU

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 100
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma3": gguf.MODEL_ARCH.GEMMA3}
# Quantised row lengths are multiples of 32 (Q8_0/Q4_1 blocks): hidden 64, intermediate 96, heads * head_dim.
HF_MODELS = {
    # Untied, with grouped KV heads: the lm_head is its own GGUF tensor, K is un-permuted over 2 heads.
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, max_position_embeddings=256, initializer_range=0.1)),
    # Six layers: llama.cpp fixes Gemma 3's pattern at five sliding layers (window 4 here) and one global;
    # head_dim 256, so the query scale is the one every Gemma 3 but the 27B has.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=4,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                    rms_norm_eps=1e-6, max_position_embeddings=256, initializer_range=0.1)),
}


# ------------------------------------------------------------------------------------------ writing GGUF


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama's q/k projections (what the import must undo)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """The model's tensors under GGUF names, in llama.cpp's layouts (numpy order)."""
    cfg = model.config
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], cfg.num_hidden_layers)
    out = {}
    for hf_name, value in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for a tied model
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        w = value.detach().float().numpy()
        if arch == "llama" and name.endswith("attn_q"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("attn_k"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm"):
            w = w + np.float32(1.0)  # llama.cpp stores Gemma's scale, 1 + w
        out[f"{name}.{suffix}"] = w
    return out


def model_metadata(model, arch: str) -> dict:
    cfg = model.config
    meta = {
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [f"<t{i}>" for i in range(cfg.vocab_size)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 3,
    }
    if arch == "llama":
        meta.update({"llama.rope.freq_base": cfg.rope_parameters["rope_theta"], "llama.vocab_size": cfg.vocab_size,
                     "llama.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads})
    else:
        meta.update({"gemma3.rope.freq_base": cfg.rope_parameters["full_attention"]["rope_theta"],
                     "gemma3.attention.key_length": cfg.head_dim, "gemma3.attention.value_length": cfg.head_dim,
                     "gemma3.attention.sliding_window": cfg.sliding_window})
    return meta


def _add_metadata(writer, meta: dict) -> None:
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def write_gguf(path, arch: str, meta: dict, tensors: dict[str, np.ndarray], qtype: str = "F32",
               types: dict[str, str] | None = None) -> str:
    """A GGUF file: 2-D tensors stored as `qtype` (or as `types` names them), 1-D ones as F32."""
    writer = gguf.GGUFWriter(str(path), arch)
    _add_metadata(writer, meta)
    for name, w in tensors.items():
        kind = gguf.GGMLQuantizationType[(types or {}).get(name, qtype if w.ndim == 2 else "F32")]
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(w, np.float32), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# One file with every other storage type the gguf package can write (the K-quants it only reads: those are
# checked on the real checkpoints).
MIXED_TYPES = {"attn_q": "Q4_0", "attn_k": "Q5_0", "attn_v": "F16", "attn_output": "BF16", "ffn_gate": "F16",
               "ffn_up": "BF16", "ffn_down": "Q4_0", "attn_norm": "F16", "ffn_norm": "BF16"}


@functools.cache
def hf_model(arch: str, vocab_size: int = VOCAB):
    config_cls, model_cls, kwargs = HF_MODELS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**kwargs, "vocab_size": vocab_size})
    model = getattr(transformers, model_cls)(config).eval()
    if arch == "gemma3":  # Gemma norm weights start at zero (a scale of 1 + 0); make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def model_file(gguf_dir):
    """(arch, qtype) -> path of the tiny model's GGUF file, written once per module."""
    written = {}

    def get(arch: str, qtype: str) -> str:
        if (arch, qtype) not in written:
            model = hf_model(arch)
            tensors = gguf_tensors(model, arch)
            types = {name: MIXED_TYPES[name.split(".")[-2]] for name in tensors
                     if qtype == "mixed" and name.split(".")[-2] in MIXED_TYPES}
            written[arch, qtype] = write_gguf(gguf_dir / f"{arch}-{qtype}.gguf", arch, model_metadata(model, arch),
                                              tensors, "Q8_0" if qtype == "mixed" else qtype, types)
        return written[arch, qtype]

    return get


def transformers_from_gguf(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32).eval()


@functools.partial(jax.jit, static_argnums=0)
def jax_logits(model, params, tokens):
    return model.apply({"params": params}, tokens)


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def random_tokens(shape, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int32)


# ---------------------------------------------------------------------------------------- model parity


@pytest.mark.parametrize("arch", list(HF_MODELS))
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1", "mixed"])
def test_logits_match_transformers_loading_the_same_file(model_file, arch, qtype):
    path = model_file(arch, qtype)
    reference = transformers_from_gguf(path)
    cfg, params = gguf_import.load_gguf_checkpoint(path)
    tokens = random_tokens((2, 16))
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jax_logits(build_model(cfg), params, tokens)), expected, atol=1e-4, rtol=0)
    if qtype == "F32":  # and the float file reproduces the original model itself
        with torch.no_grad():
            original = hf_model(arch)(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(expected, original, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", list(HF_MODELS))
def test_config_holds_what_transformers_reads_from_the_file(model_file, arch):
    path = model_file(arch, "F32")
    ours = gguf_import.gguf_hf_config(path)
    theirs = transformers.AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    theirs = {**theirs.to_dict(), "architectures": [type(hf_model(arch)).__name__]}
    legacy = {"rope_theta", "rope_local_base_freq"}  # older transformers' spellings, kept beside rope_parameters
    assert {k: v for k, v in ours.items() if k not in legacy} == {k: theirs[k] for k in ours if k not in legacy}
    cfg = gguf_import.load_gguf_checkpoint(path, max_len=64)[0]
    if arch == "gemma3":
        assert (cfg.layer_windows, cfg.rope_theta, cfg.rope_local_theta) == ((4,) * 5 + (0,), 5000.0, 10000.0)
        assert cfg.query_scale == 256**-0.5 and cfg.tie_embeddings
    else:
        assert (cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings, cfg.max_len) == (2, 16, False, 64)


def test_names_and_shapes_are_checked_before_any_dequantisation(gguf_dir, monkeypatch):
    model = hf_model("llama")
    wide = write_gguf(gguf_dir / "wide.gguf", "llama", {**model_metadata(model, "llama"),
                                                        "llama.feed_forward_length": 128},
                      gguf_tensors(model, "llama"), "Q8_0")
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: pytest.fail("dequantised before the checks"))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight.*blk.0.ffn_gate.weight.*"
                                         r"\(96, 64\).*implies \(128, 64\)"):
        gguf_import.load_gguf_checkpoint(wide)
    tensors = gguf_tensors(model, "llama")
    tensors["rope_freqs.weight"] = np.ones(8, np.float32)  # Llama 3's RoPE rescaling: never dropped silently
    extra = write_gguf(gguf_dir / "extra.gguf", "llama", model_metadata(model, "llama"), tensors)
    with pytest.raises(ValueError, match="no place for.*rope_freqs.weight"):
        gguf_import.load_gguf_checkpoint(extra)


def test_unsupported_architecture_tensor_type_and_features_are_named(gguf_dir):
    model = hf_model("llama")
    meta, tensors = model_metadata(model, "llama"), gguf_tensors(model, "llama")
    qwen = write_gguf(gguf_dir / "qwen.gguf", "qwen2", {k.replace("llama.", "qwen2."): v for k, v in meta.items()},
                      tensors)
    with pytest.raises(ValueError, match=r"qwen.gguf.*architecture 'qwen2' is not supported; supported: "
                                         r"\['gemma3', 'llama'\]"):
        gguf_import.load_gguf_checkpoint(qwen)
    q5_1 = write_gguf(gguf_dir / "q5_1.gguf", "llama", meta, tensors, "Q8_0", types={"blk.1.attn_v.weight": "Q5_1"})
    with pytest.raises(ValueError, match=r"q5_1.gguf.*tensor 'blk.1.attn_v.weight' is stored as Q5_1.*supported "
                                         r"types: \['F32', 'F16', 'BF16', 'Q8_0'"):
        gguf_import.load_gguf_checkpoint(q5_1)
    scaled = write_gguf(gguf_dir / "scaled.gguf", "llama", {**meta, "llama.rope.scaling.type": "linear",
                                                            "llama.rope.scaling.factor": 4.0}, tensors)
    with pytest.raises(ValueError, match=r"scaled.gguf \(metadata\).*rope type 'linear'"):
        gguf_import.load_gguf_checkpoint(scaled)


def test_truncated_or_missing_file_is_an_error_naming_it(model_file, gguf_dir):
    data = pathlib.Path(model_file("llama", "Q8_0")).read_bytes()
    for cut in (len(data) - 100, 2000, 10):  # in the tensor data, in the metadata, in the header
        path = gguf_dir / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"GGUF file '{path}' could not be read"):
            gguf_import.load_gguf_checkpoint(str(path))
    with pytest.raises(ValueError, match="nowhere.gguf' does not exist"):
        gguf_import.load_gguf_checkpoint(str(gguf_dir / "nowhere.gguf"))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        np.testing.assert_array_equal(gguf_import.unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)
    assert not np.array_equal(llama_cpp_permute(w, 2), w)


# -------------------------------------------------------------------------------------------- tokenizers

CORPUS = [
    "Hello world! Hello, world? hello WORLD.",
    "  two leading spaces, a double  space and a trailing space ",
    "line one\nline two\n\n\tindented with a tab\r\nwindows line\n",
    "digits 0 12 345 6789 3.14159 1e-10 2024-01-01 $1,000,000",
    "naïve café façade Ünïcödé — “quotes” ‘single’ …",
    "日本語のテキスト 中文 한국어 Ελληνικά русский текст",
    "emoji 🤖🎉👍🏽 and symbols ∑∫√ ≠ ≤",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n    pass\n",
    "if (a && b) { printf(\"%d\\n\", a[i]); }",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<think>reasoning</think> answer <s> </s> <unk> <bos> <eos> <start_of_turn>user",
    "don't won't it's I'm we've they'll you'd",
    "",
    " ",
    "\n",
]
TRAINING_TEXT = CORPUS[:9] * 3 + ["the quick brown fox jumps over the lazy dog " * 5]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_level_metadata(pre: str) -> dict:
    """A byte-level BPE trained here: three control tokens, a user-defined one, a control token llama.cpp
    mislabels (a space outside the byte alphabet), no BOS added."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["<think>", "<|odd token|>"]
    types = [3 if t in specials else 1 for t in tokens[:-2]] + [4, 3]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE}


def sentencepiece_metadata(arch: str) -> dict:
    """A SentencePiece-style vocabulary: specials, 256 byte tokens, pieces with scores (best first), no merges.
    Gemma's adds its own specials and stores runs of spaces with real spaces."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.train_from_iterator(TRAINING_TEXT, tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False))
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    if arch == "gemma3":
        specials = {"<pad>": 3, "<eos>": 3, "<bos>": 3, "<unk>": 2, "<mask>": 3, "<start_of_turn>": 3}
        ids = {"bos": 2, "eos": 1, "unknown": 3, "padding": 0}
        pieces += ["\u2581\u2581"]
        extra = {"  ": 4, "   ": 4, "<think>": 4}
    else:
        specials = {"<unk>": 2, "<s>": 3, "</s>": 3}
        ids = {"bos": 1, "eos": 2, "unknown": 0}
        extra = {"<think>": 4}
    tokens = [*specials, *(f"<0x{b:02X}>" for b in range(256)), *pieces, *extra]
    types = [*specials.values(), *[6] * 256, *[1] * len(pieces), *extra.values()]
    # Pieces share scores four by four: ties the merge order must break as transformers does.
    scores = [0.0] * (len(specials) + 256) + [-float(i // 4) for i in range(len(pieces))] + [0.0] * len(extra)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.add_space_prefix": False}
    meta.update({f"tokenizer.ggml.{role}_token_id": index for role, index in ids.items()})
    return meta


TOKENIZERS = {
    "gpt2_default_split": ("llama", lambda: byte_level_metadata("smollm")),
    "gpt2_llama3_split": ("llama", lambda: byte_level_metadata("llama-bpe")),
    "gpt2_qwen2_split": ("llama", lambda: byte_level_metadata("qwen2")),
    "sentencepiece_llama": ("llama", lambda: sentencepiece_metadata("llama")),
    "sentencepiece_gemma": ("gemma3", lambda: sentencepiece_metadata("gemma3")),
}


def tokenizer_file(directory, case: str) -> str:
    arch, make = TOKENIZERS[case]
    model = hf_model(arch)
    meta = {k: v for k, v in model_metadata(model, arch).items() if not k.startswith("tokenizer.")}
    meta = {**meta, **make()}
    meta.pop(f"{arch}.vocab_size", None)  # the token list's length stands
    return write_gguf(directory / f"{case}.gguf", arch, meta, {})


@pytest.mark.parametrize("case", list(TOKENIZERS))
def test_rebuilt_tokenizer_encodes_as_transformers_gguf_tokenizer(gguf_dir, tmp_path, case):
    path = tokenizer_file(gguf_dir, case)
    reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    out = gguf_tokenizer.write_gguf_tokenizer(path, str(tmp_path / "tok"))
    ours = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    reloaded = transformers.AutoTokenizer.from_pretrained(out)  # the directory as transformers reads it
    theirs = json.loads(reference.backend_tokenizer.to_str())
    mine = json.loads(ours.to_str())
    assert mine["model"] == theirs["model"]  # vocabulary and merges, in order
    assert mine["added_tokens"] == theirs["added_tokens"]
    for text in CORPUS:
        for specials in (False, True):
            expected = reference(text, add_special_tokens=specials)["input_ids"]
            assert ours.encode(text, add_special_tokens=specials).ids == expected, (text, specials)
            assert reloaded(text, add_special_tokens=specials)["input_ids"] == expected, (text, specials)
        ids = reference(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert reloaded.chat_template == reference.chat_template
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == (
        reference.bos_token, reference.eos_token, reference.pad_token)


def test_tokenizer_files_hold_the_special_tokens_ids_and_template(gguf_dir, tmp_path):
    out = gguf_tokenizer.write_gguf_tokenizer(tokenizer_file(gguf_dir, "gpt2_default_split"), str(tmp_path))
    files = {name: read_json(os.path.join(out, name)) for name in (
        "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")}
    config = files["tokenizer_config.json"]
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert (config["add_bos_token"], config["add_eos_token"], config["chat_template"]) == (False, False, CHAT_TEMPLATE)
    assert files["special_tokens_map.json"]["eos_token"] == "<|im_end|>"
    assert files["generation_config.json"] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert files["config.json"]["model_type"] == "llama" and files["config.json"]["eos_token_id"] == 2
    # A SentencePiece vocabulary without the flag gets BOS, as llama.cpp gives it.
    out = gguf_tokenizer.write_gguf_tokenizer(tokenizer_file(gguf_dir, "sentencepiece_llama"), str(tmp_path / "sp"))
    ours = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert ours.encode("hello").ids[0] == 1
    assert read_json(os.path.join(out, "tokenizer_config.json"))["add_bos_token"] is True


def test_unsupported_tokenizers_are_named(gguf_dir, tmp_path):
    meta = {**byte_level_metadata("smollm"), "tokenizer.ggml.model": "bert"}
    with pytest.raises(ValueError, match=r"bert.gguf.*tokenizer model 'bert' is not supported; supported: "
                                         r"\['gpt2', 'llama'\]"):
        gguf_tokenizer.write_gguf_tokenizer(write_gguf(gguf_dir / "bert.gguf", "llama", meta, {}), str(tmp_path))
    meta = byte_level_metadata("tekken")
    with pytest.raises(ValueError, match="pre-tokenizer 'tekken' is not supported"):
        gguf_tokenizer.write_gguf_tokenizer(write_gguf(gguf_dir / "tekken.gguf", "llama", meta, {}), str(tmp_path))


# --------------------------------------------------------------------------------------- workdir import


@pytest.fixture(scope="module")
def full_file(gguf_dir):
    """A tiny Llama with a byte-level tokenizer of its vocabulary size: a complete checkpoint."""
    vocab = byte_level_metadata("smollm")
    model = hf_model("llama", vocab_size=len(vocab["tokenizer.ggml.tokens"]))
    meta = {**model_metadata(model, "llama"), **vocab}
    return write_gguf(gguf_dir / "full.gguf", "llama", meta, gguf_tensors(model, "llama"), "Q8_0")


def test_import_writes_checkpoint_config_and_tokenizer_dir(full_file, tmp_path):
    target = str(tmp_path / "work")
    config = workdir.import_checkpoint(full_file, target, max_len=32)
    params, saved = checkpoint_lib.restore_params(target)
    cfg, expected = gguf_import.load_gguf_checkpoint(full_file, max_len=32)
    assert json.loads(saved.model.to_json()) == json.loads(cfg.to_json()) == json.loads(config.model.to_json())
    flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(expected)
    assert sorted(flat) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(want[key]), err_msg=str(key))
    assert saved.data.tokenizer == os.path.join(target, "tokenizer")
    assert sorted(os.listdir(saved.data.tokenizer)) == ["config.json", "generation_config.json",
                                                        "special_tokens_map.json", "tokenizer.json",
                                                        "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["work"]  # nothing left beside it
    with pytest.raises(ValueError, match="already holds checkpoints"):
        workdir.import_checkpoint(full_file, target)


def test_interrupted_import_leaves_no_workdir(full_file, tmp_path, monkeypatch):
    target = str(tmp_path / "work")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl-C midway through the save

    monkeypatch.setattr(checkpoint_lib.CheckpointManager, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        workdir.import_checkpoint(full_file, target)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    # What a killed process leaves (a staging directory) is no workdir, and the next import clears it.
    stale = tmp_path / ".work.importing-0123"
    (stale / "checkpoints").mkdir(parents=True)
    assert not os.path.exists(target)
    workdir.import_checkpoint(full_file, target, max_len=32)
    assert sorted(os.listdir(tmp_path)) == ["work"]


def test_import_of_a_file_without_tokenizer_keeps_the_default_tokenizer(gguf_dir, tmp_path):
    model = hf_model("llama")
    meta = {k: v for k, v in model_metadata(model, "llama").items() if not k.startswith("tokenizer.")}
    path = write_gguf(gguf_dir / "no_tokenizer.gguf", "llama", meta, gguf_tensors(model, "llama"))
    config = workdir.import_checkpoint(path, str(tmp_path / "w"), max_len=32)
    assert config.data.tokenizer == "bytes"
    assert sorted(os.listdir(tmp_path / "w")) == ["checkpoints", "config.json"]


def test_import_rejects_sources_it_cannot_read(full_file, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt' is neither a Hugging Face checkpoint directory nor a .gguf"):
        workdir.import_checkpoint(str(tmp_path / "notes.txt"), str(tmp_path / "w"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="busy' is not empty"):
        workdir.import_checkpoint(full_file, str(tmp_path / "busy"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(pathlib.Path(full_file).read_bytes()[:5000])
    with pytest.raises(ValueError, match="broken.gguf' could not be read"):
        workdir.import_checkpoint(str(broken), str(tmp_path / "w"))
    assert sorted(os.listdir(tmp_path)) == ["broken.gguf", "busy", "notes.txt"]


def test_convert_cli_imports_a_gguf_whose_tokenizer_reads_as_transformers_reads_the_file(full_file, tmp_path):
    target = str(tmp_path / "work")
    with open(os.devnull) as devnull:
        out = subprocess.run([sys.executable, "-m", "launch.convert", f"--gguf={full_file}", f"--workdir={target}",
                              "--max_len=32"], cwd=REPO, capture_output=True, text=True, stdin=devnull)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not re.search(r"^I\d{4} ", out.stderr, re.MULTILINE), out.stderr[:500]  # no absl INFO (orbax's save)
    _, config = checkpoint_lib.restore_params(target)
    assert config.model.max_len == 32
    tokenizer = load_tokenizer(config.data.tokenizer)
    reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(full_file),
                                                           gguf_file=os.path.basename(full_file))
    for text in CORPUS:
        assert tokenizer.encode_prompt(text) == reference(text)["input_ids"], text
    messages = [{"role": "user", "content": "Hi there"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == reference.apply_chat_template(
        messages, tokenize=False)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids, tokenizer.pad_id) == (1, 2, (2,), 2)
