"""The tokenizer of a GGUF file, rebuilt as a Hugging Face tokenizer directory.

    write_gguf_tokenizer("model.gguf", "out/tokenizer")

A GGUF file has no tokenizer.json: it stores the vocabulary, merges (or scores), token types, special ids and
chat template as metadata. This module rebuilds from them the `tokenizers` tokenizer that transformers builds
for `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, so both encode every text alike, and writes it with
the files transformers reads beside it:

    tokenizer.json            the tokenizer (with BOS/EOS added by its post-processor as the file asks)
    tokenizer_config.json     bos/eos/unk/pad tokens, add_bos_token, add_eos_token, chat_template
    special_tokens_map.json   the special tokens by role
    generation_config.json    bos/eos/pad ids
    config.json               the model's Hugging Face config (`gguf.hf_config_from_gguf`), which holds the
                              same ids; only the ids for an architecture jaxspec does not import

Two tokenizer models are supported: "gpt2" (byte-level BPE with the file's merges: SmolLM2, Llama 3, Qwen2)
and "llama" (SentencePiece-style BPE with byte fallback, merges from the file or rebuilt from the token scores;
Gemma files rebuild them from the token order instead, and spell space runs with U+2581).

The `tokenizers` package is imported only when a function needs it.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

from jaxspec.errors import InputError
from jaxspec.interop.gguf import ARCHITECTURES, GGUFFile, hf_config_from_gguf, metadata, open_gguf

TOKENIZER_MODELS = ("gpt2", "llama")
MODEL_KEY = "tokenizer.ggml.model"  # present in every GGUF file that carries a tokenizer
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CONFIG_FILE = "config.json"

# llama.cpp's token types (tokenizer.ggml.token_type).
CONTROL = 3  # special tokens such as <bos> or <|im_end|>: matched whole, skipped when decoding
USER_DEFINED = 4  # added tokens such as <think>: matched whole, kept when decoding

SPACE = "\u2581"  # SentencePiece's visible space
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# Pre-tokenizer splits of byte-level vocabularies, by llama.cpp's tokenizer.ggml.pre name. A name not listed
# splits as GPT-2 does (the ByteLevel pre-tokenizer's own regex), as transformers does.
_SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _SPLIT_TAIL
_QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _SPLIT_TAIL
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# Names whose split differs from GPT-2's and is not rebuilt here: rejected rather than split wrongly.
UNSUPPORTED_PRE_TOKENIZERS = ("qwen35", "tekken")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError("rebuilding a GGUF tokenizer needs the 'tokenizers' package: pip install 'jaxspec[hf]' "
                          "(or pip install tokenizers)") from err
    return tokenizers


class GGUFVocab(NamedTuple):
    """The tokenizer metadata of a GGUF file."""

    path: str
    architecture: str
    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]  # empty when the file has none
    scores: list[float] | None
    merges: list[str] | None
    special: dict[str, str | None]  # role (bos_token, eos_token, unk_token, pad_token) -> token
    special_ids: dict[str, int | None]  # bos_token_id, eos_token_id, pad_token_id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


_ROLES = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
          "pad_token": "padding_token_id"}


def read_vocab(file: GGUFFile) -> GGUFVocab:
    """The tokenizer metadata of an opened GGUF file, checked for what the rebuild needs."""
    model = metadata(file, MODEL_KEY)
    if model not in TOKENIZER_MODELS:
        raise InputError(f"GGUF file {file.path!r}: tokenizer model {model!r} is not supported; supported: "
                         f"{list(TOKENIZER_MODELS)}")
    pre = metadata(file, "tokenizer.ggml.pre", None)
    if model == "gpt2" and pre in UNSUPPORTED_PRE_TOKENIZERS:
        raise InputError(f"GGUF file {file.path!r}: pre-tokenizer {pre!r} is not supported; byte-level "
                         f"vocabularies split as GPT-2 or as one of {sorted(PRE_TOKENIZER_SPLITS)}")
    tokens = metadata(file, "tokenizer.ggml.tokens")
    token_types = metadata(file, "tokenizer.ggml.token_type", [])
    scores = metadata(file, "tokenizer.ggml.scores", None)
    merges = metadata(file, "tokenizer.ggml.merges", None)
    for key, values in (("token_type", token_types or None), ("scores", scores)):
        if values is not None and len(values) != len(tokens):
            raise InputError(f"GGUF file {file.path!r}: tokenizer.ggml.{key} has {len(values)} entries for "
                             f"{len(tokens)} tokens")
    ids = {role: metadata(file, f"tokenizer.ggml.{key}", None) for role, key in _ROLES.items()}
    for role, index in ids.items():
        if index is not None and not 0 <= index < len(tokens):
            raise InputError(f"GGUF file {file.path!r}: tokenizer.ggml.{_ROLES[role]}={index} is outside the "
                             f"vocabulary [0, {len(tokens)})")
    return GGUFVocab(
        path=file.path,
        architecture=metadata(file, "general.architecture"),
        model=model,
        pre=pre,
        tokens=tokens,
        token_types=token_types,
        scores=scores,
        merges=merges,
        special={role: None if index is None else tokens[index] for role, index in ids.items()},
        special_ids={"bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"],
                     "pad_token_id": ids["pad_token"]},
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
        add_bos=bool(metadata(file, "tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos=bool(metadata(file, "tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata(file, "tokenizer.chat_template", None),
    )


# ------------------------------------------------------------------------------------------ vocabularies


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: printable Latin-1 bytes stand for themselves, the rest (space,
    control bytes, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in spelling)
    for offset, byte in enumerate(shifted):
        spelling[byte] = chr(256 + offset)
    return dict(sorted(spelling.items()))


def _pairs(vocab: GGUFVocab) -> list[tuple[str, str]]:
    pairs = [tuple(merge.split(" ")) for merge in vocab.merges]
    bad = next((merge for merge, pair in zip(vocab.merges, pairs) if len(pair) != 2), None)
    if bad is not None:
        raise InputError(f"GGUF file {vocab.path!r}: merge {bad!r} in tokenizer.ggml.merges is not two tokens "
                         "separated by one space")
    return pairs


def merges_from_scores(ids: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a token into two vocabulary tokens, the
    best-scored token's first; ties go to longer left then right parts, then to the earlier token."""
    candidates = []
    for token, score in scores.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ids and token[i:] in ids]
        splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        candidates += [(score, left, right) for left, right in splits]
    candidates.sort(key=lambda c: (c[0], len(c[1]), len(c[2])), reverse=True)  # stable: file order on ties
    return [(left, right) for _, left, right in candidates]


def _byte_level_tokenizer(vocab: GGUFVocab):
    tokenizers = _import_tokenizers()
    if vocab.merges is None:
        raise InputError(f"GGUF file {vocab.path!r}: a byte-level (gpt2) vocabulary needs tokenizer.ggml.merges")
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    ids = {}
    for index, token in enumerate(vocab.tokens):  # a token outside the alphabet is respelled byte by byte
        ids[token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))] = index
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=ids, merges=_pairs(vocab), dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
        fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(vocab.pre)
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if split is None:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"), byte_level])
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


def _sentencepiece_tokenizer(vocab: GGUFVocab):
    tokenizers = _import_tokenizers()
    gemma = vocab.architecture in _GEMMA_ARCHITECTURES
    tokens = vocab.tokens
    if gemma:  # Gemma files store whitespace tokens with real spaces; its vocabulary spells them with U+2581
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    ids = {token: index for index, token in enumerate(tokens)}
    if vocab.merges is not None:
        merges = _pairs(vocab)
    elif gemma:  # Gemma's scores do not follow its merge order; the token order does
        merges = merges_from_scores(ids, {token: -index for index, token in enumerate(tokens)})
    elif vocab.scores is not None:
        merges = merges_from_scores(ids, dict(zip(tokens, vocab.scores)))
    else:
        raise InputError(f"GGUF file {vocab.path!r}: a SentencePiece (llama) vocabulary needs "
                         "tokenizer.ggml.merges or tokenizer.ggml.scores")
    decoders = [tokenizers.decoders.Replace(SPACE, " "), tokenizers.decoders.ByteFallback(),
                tokenizers.decoders.Fuse()]
    if gemma:  # spaces become U+2581 and nothing is prepended
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(
            vocab=ids, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
            unk_token=vocab.special["unk_token"] or "<unk>"))  # transformers: always "<unk>", as Gemma's is
        tok.normalizer = tokenizers.normalizers.Replace(" ", SPACE)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:  # Llama: one U+2581 before the first word, stripped again when decoding
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(
            vocab=ids, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first",
                                                                split=False)
        decoders.append(tokenizers.decoders.Strip(" ", 1, 0))
    tok.decoder = tokenizers.decoders.Sequence(decoders)
    return tok


def _add_special_tokens(tok, vocab: GGUFVocab) -> None:
    """Control tokens as special tokens, user-defined ones as plain added tokens, then any named special token
    not yet added; in this order, which fixes the ids of tokens the vocabulary lacks."""
    tokenizers = _import_tokenizers()
    alphabet = set(byte_alphabet().values()) if vocab.model == "gpt2" else None
    typed = list(zip(vocab.tokens, vocab.token_types))
    # A byte-level control token outside the byte alphabet is a mislabelled ordinary token: adding it would
    # grow the vocabulary past the model's.
    control = [t for t, kind in typed if kind == CONTROL and (alphabet is None or set(t) <= alphabet)]
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in control])
    known = tok.get_vocab(with_added_tokens=True)
    user = [t for t, kind in typed if kind == USER_DEFINED and t in known]
    tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in user])
    named = [t for t in vocab.special.values() if t is not None]
    if vocab.architecture in _GEMMA_ARCHITECTURES and "<mask>" in known:
        named.append("<mask>")  # Gemma tokenizers name a mask token too
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(named) if t not in added]
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in missing])


def _set_post_processor(tok, vocab: GGUFVocab) -> None:
    """BOS/EOS around each sequence as the file asks (tokenizers' `add_special_tokens=True`)."""
    tokenizers = _import_tokenizers()
    bos = vocab.special["bos_token"] if vocab.add_bos else None
    eos = vocab.special["eos_token"] if vocab.add_eos else None
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    specials = [(t, tok.token_to_id(t)) for t in (bos, eos) if t]
    tok.post_processor = tokenizers.processors.TemplateProcessing(single=single, pair=pair,
                                                                  special_tokens=specials)


def build_tokenizer(vocab: GGUFVocab):
    """The `tokenizers.Tokenizer` transformers builds for this vocabulary."""
    tok = _byte_level_tokenizer(vocab) if vocab.model == "gpt2" else _sentencepiece_tokenizer(vocab)
    _add_special_tokens(tok, vocab)
    _set_post_processor(tok, vocab)
    return tok


# ------------------------------------------------------------------------------------------------ files


def _write_json(directory: str, name: str, data: dict) -> None:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)


def tokenizer_config(vocab: GGUFVocab) -> dict:
    """tokenizer_config.json: the special tokens, where BOS/EOS are added, and the chat template."""
    config = {
        # The generic class: it loads tokenizer.json as written, where a model class would rebuild parts of it.
        "tokenizer_class": "TokenizersBackend",
        **vocab.special,
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if vocab.chat_template is not None:
        config["chat_template"] = vocab.chat_template
    return config


def write_tokenizer_dir(file: GGUFFile, out_dir: str) -> str:
    """Write the tokenizer of an opened GGUF file as a Hugging Face tokenizer directory; returns `out_dir`."""
    vocab = read_vocab(file)
    tok = build_tokenizer(vocab)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, TOKENIZER_FILE))
    _write_json(out_dir, TOKENIZER_CONFIG_FILE, tokenizer_config(vocab))
    _write_json(out_dir, SPECIAL_TOKENS_FILE, {role: t for role, t in vocab.special.items() if t is not None})
    ids = {key: value for key, value in vocab.special_ids.items() if value is not None}
    _write_json(out_dir, GENERATION_CONFIG_FILE, ids)
    # transformers reads the model type from config.json too (to choose tokenizer fixes), so write the whole
    # config where there is one.
    _write_json(out_dir, CONFIG_FILE, hf_config_from_gguf(file) if vocab.architecture in ARCHITECTURES else ids)
    return out_dir


def write_gguf_tokenizer(path: str, out_dir: str) -> str:
    """Write the tokenizer of the GGUF file at `path` as a Hugging Face tokenizer directory."""
    return write_tokenizer_dir(open_gguf(path), out_dir)


__all__ = [
    "GGUFVocab",
    "TOKENIZER_MODELS",
    "build_tokenizer",
    "byte_alphabet",
    "merges_from_scores",
    "read_vocab",
    "tokenizer_config",
    "write_gguf_tokenizer",
    "write_tokenizer_dir",
]
