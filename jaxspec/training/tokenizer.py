"""Tokenizers behind one interface: a byte-level default and Hugging Face tokenizer directories.

    load_tokenizer("bytes")                 # ByteTokenizer: no files, no dependencies
    load_tokenizer("path/to/hf_dir")        # a Hugging Face tokenizer directory, read as transformers reads it
    load_tokenizer("path/to/tokenizer.json")  # that file alone: no special tokens beyond what it says itself

Every tokenizer offers ``vocab_size``, ``bos_id`` / ``eos_id`` (int or None), ``eos_ids`` (the stop set for
generation), ``pad_id`` (always an int), ``chat_template``, ``encode`` (raw ids, for training data),
``encode_batch``, ``encode_prompt`` (ids exactly as ``transformers`` ``tokenizer(text)["input_ids"]``),
``apply_chat_template`` / ``encode_chat`` and ``decode``.

A Hugging Face directory is read as transformers 5 reads it (``AutoTokenizer.from_pretrained(dir)`` for the
tokenizer, the model's generation config for the stop ids); nothing is guessed from token names:

- ``tokenizer.json``: vocabulary, normalizer, pre-tokenizer, decoder, and the post-processor, which alone
  decides where ``encode_prompt`` puts BOS/EOS. transformers drops ``add_bos_token`` / ``add_eos_token`` of
  tokenizer_config.json whenever a tokenizer.json is present, so they change nothing here either.
- ``tokenizer_config.json``: the named special tokens (``bos_token``, ``eos_token``, ``unk_token``,
  ``pad_token`` and any other ``*_token``), extra special tokens, ``chat_template``,
  ``clean_up_tokenization_spaces``, ``split_special_tokens``. ``special_tokens_map.json`` overrides the named
  tokens when tokenizer_config.json has no ``added_tokens_decoder``. A declared special token that
  tokenizer.json does not list as an added token becomes one (special: split out of text, skipped on decode).
- ``chat_template.jinja``: the chat template, over tokenizer_config.json's.
- ``generation_config.json``, or else ``config.json``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``.
  ``eos_token_id`` may be a list; all of it is the stop set (``eos_ids``), as transformers' generate uses it.

Derived ids: ``eos_id`` is the tokenizer's EOS token, else the first stop id, else None; ``eos_ids`` is the
declared stop set, else the tokenizer's EOS, else empty (generation then runs to its token limit);
``bos_id`` is the BOS token, else the declared bos_token_id, else None; ``pad_id`` is the PAD token, else
the declared pad_token_id, else the first stop id, else 0 (padding never reaches a model's output).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jaxspec.errors import InputError
from jaxspec.training import chat

BYTES = "bytes"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
CONFIG_FILE = "config.json"

_EXTRA_TOKEN_KEYS = ("extra_special_tokens", "additional_special_tokens")
_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class Tokenizer(Protocol):
    """What the data pipeline, the trainer and the decoders rely on."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int
    chat_template: str | None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
                            ) -> str: ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
                    ) -> list[int]: ...

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str: ...


def _as_id_list(ids: Sequence[int] | np.ndarray, vocab_size: int) -> list[int]:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise InputError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    return ids.tolist()


def _with_specials(ids: list[int], tokenizer, add_bos: bool, add_eos: bool) -> list[int]:
    for wanted, value, role in ((add_bos, tokenizer.bos_id, "BOS"), (add_eos, tokenizer.eos_id, "EOS")):
        if wanted and value is None:
            raise InputError(f"tokenizer {tokenizer!r} has no {role} token to add")
    return ([tokenizer.bos_id] if add_bos else []) + ids + ([tokenizer.eos_id] if add_eos else [])


def _no_chat_template(tokenizer) -> InputError:
    return InputError(f"tokenizer {tokenizer!r} has no chat template; render the prompt as plain text and use "
                      "encode_prompt, or use a checkpoint whose tokenizer files carry one")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; three specials follow them.

    Decoding replaces invalid UTF-8 (e.g. a sequence cut inside a character) with U+FFFD, so any id sequence
    the model emits decodes to a string. Toy models are trained with a BOS before each document, so
    ``encode_prompt`` starts with it too. There is no chat template.
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    eos_ids = (257,)
    chat_template = None
    special_tokens: Mapping[str, str] = {}
    _NAMES = {256: "<bos>", 257: "<eos>", 258: "<pad>"}  # how decode spells specials it keeps

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return _with_specials(list(text.encode("utf-8")), self, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of each text (no specials) as int32 arrays; the fast path for whole corpora."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text, add_bos=True)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        raise _no_chat_template(self)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        raise _no_chat_template(self)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        pieces, run = [], bytearray()
        for i in _as_id_list(ids, self.vocab_size):
            if i < 256:
                run.append(i)
            elif not skip_special_tokens:
                pieces += [run.decode("utf-8", errors="replace"), self._NAMES[i]]
                run = bytearray()
        return "".join(pieces) + run.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# ------------------------------------------------------------------------------ Hugging Face tokenizer files


@dataclasses.dataclass(frozen=True)
class SpecialToken:
    """A special token as tokenizer_config.json declares it: its text and how it matches in raw text."""

    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
    """What a Hugging Face tokenizer directory declares beyond tokenizer.json (nothing, for a lone file)."""

    directory: str | None = None
    named_tokens: Mapping[str, SpecialToken] = dataclasses.field(default_factory=dict)  # "bos_token" -> ...
    extra_tokens: tuple[SpecialToken, ...] = ()
    token_ids: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # "eos_token_id" -> ids
    token_ids_file: str | None = None  # the file token_ids came from
    chat_template: str | None = None
    clean_up_tokenization_spaces: bool = False
    clean_up_bpe: bool = False  # transformers skips the clean-up for BPE models unless this is set
    split_special_tokens: bool = False


def read_json(path: str) -> dict:
    """A JSON object from `path`, or an InputError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot be read as JSON ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _special_token(value: Any, where: str) -> SpecialToken | None:
    """A declared token: a string, or an AddedToken object ({"content": ..., "lstrip": ..., ...})."""
    if value is None:
        return None
    if isinstance(value, str):
        return SpecialToken(value)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {f: bool(value[f]) for f in ("single_word", "lstrip", "rstrip", "normalized") if f in value}
        return SpecialToken(value["content"], **flags)
    raise InputError(f"{where}: expected a token string or an AddedToken object with a 'content' string, "
                     f"got {value!r}")


def _is_named_token(key: str, value: Any) -> bool:
    # transformers treats every string- or AddedToken-valued `*_token` key as a named special token
    # (add_bos_token and friends are booleans).
    return key.endswith("_token") and isinstance(value, (str, dict))


def _declared_tokens(data: dict, path: str) -> tuple[dict[str, SpecialToken], list[SpecialToken]]:
    """(named tokens, extra tokens) one tokenizer_config.json / special_tokens_map.json declares."""
    named = {k: _special_token(v, f"{path}: {k}") for k, v in data.items() if _is_named_token(k, v)}
    extras = []
    for key in _EXTRA_TOKEN_KEYS:
        value = data.get(key)
        if isinstance(value, dict):  # named extras, e.g. {"image_token": "<image>"}
            named.update({k: _special_token(v, f"{path}: {key}.{k}") for k, v in value.items()})
        elif isinstance(value, list):
            extras += [t for i, v in enumerate(value) if (t := _special_token(v, f"{path}: {key}[{i}]"))]
        elif value is not None:
            raise InputError(f"{path}: {key} must be a list of tokens or a dict of named tokens, got {value!r}")
    return {k: v for k, v in named.items() if v is not None}, extras


def _special_tokens(directory: str, config: dict) -> tuple[dict[str, SpecialToken], tuple[SpecialToken, ...]]:
    path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    named, extras = _declared_tokens(config, path)
    map_path = os.path.join(directory, SPECIAL_TOKENS_MAP_FILE)
    # transformers reads the legacy map only for configs without an added_tokens_decoder; its entries win.
    if "added_tokens_decoder" not in config and os.path.isfile(map_path):
        map_named, map_extras = _declared_tokens(read_json(map_path), map_path)
        named.update(map_named)
        extras += [t for t in map_extras if t not in extras]
    return named, tuple(extras)


def _id_tuple(value: Any, where: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise InputError(f"{where} must be a non-negative token id or a list of them, got {value!r}")
    return tuple(values)


def _declared_ids(directory: str) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """bos/eos/pad ids of the model's generation config: generation_config.json when present (transformers
    then ignores config.json's), else config.json."""
    for name in (GENERATION_CONFIG_FILE, CONFIG_FILE):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            data = read_json(path)
            ids = {k: _id_tuple(data[k], f"{path}: {k}") for k in _ID_KEYS if data.get(k) is not None}
            return {k: v for k, v in ids.items() if v}, path
    return {}, None


def _chat_template(directory: str, config: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a list of named templates
    of which "default" is the one used)."""
    path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise InputError(f"{os.path.join(directory, TOKENIZER_CONFIG_FILE)}: chat_template must be a string or "
                         f"a list of {{'name', 'template'}} entries, got {type(template).__name__}")
    return template


def read_tokenizer_files(directory: str) -> TokenizerFiles:
    """Everything `directory`'s config files declare about its tokenizer (see the module docstring)."""
    config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    named, extras = _special_tokens(directory, config)
    token_ids, ids_file = _declared_ids(directory)
    return TokenizerFiles(
        directory=directory,
        named_tokens=named,
        extra_tokens=extras,
        token_ids=token_ids,
        token_ids_file=ids_file,
        chat_template=_chat_template(directory, config),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        clean_up_bpe=bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")),
        split_special_tokens=bool(config.get("split_special_tokens", False)),
    )


# ------------------------------------------------------------------------------ Hugging Face tokenizer


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "loading a tokenizer.json needs the 'tokenizers' package: pip install 'jaxspec[hf]' "
            "(or pip install tokenizers)"
        ) from err
    return tokenizers


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop the space a word-level decoder puts before punctuation."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


class HFTokenizer:
    """A ``tokenizers`` tokenizer.json plus what its directory declares (`TokenizerFiles`)."""

    def __init__(self, path: str, files: TokenizerFiles | None = None):
        tokenizers = _import_tokenizers()
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # the Rust side raises a bare Exception for any parse failure
            raise InputError(f"tokenizer file {path!r} could not be parsed as a tokenizer.json: {err}") from err
        # Like transformers' tokenizer(text) without padding/truncation arguments: whole, unpadded sequences.
        self._tok.no_truncation()
        self._tok.no_padding()
        files = files or TokenizerFiles()
        self._tok.encode_special_tokens = files.split_special_tokens
        self._add_declared_tokens(tokenizers, files)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {name: t.content for name, t in files.named_tokens.items()}
        self.chat_template = files.chat_template
        self._clean_up = files.clean_up_tokenization_spaces and (
            files.clean_up_bpe or type(self._tok.model).__name__ != "BPE")
        self._set_ids(files)

    def _add_declared_tokens(self, tokenizers, files: TokenizerFiles) -> None:
        """Declared special tokens that tokenizer.json does not list as added tokens become added special tokens,
        as transformers does; one missing from the vocabulary is an error (it would get an id past the model's
        embedding)."""
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        declared = [(name, t) for name, t in files.named_tokens.items()]
        declared += [("extra special token", t) for t in files.extra_tokens]
        new = []
        for name, token in declared:
            if self._tok.token_to_id(token.content) is None:
                raise InputError(f"{name} {token.content!r}, declared by the tokenizer files in {files.directory!r}, "
                                 f"is not in the vocabulary of {self.path!r}")
            if token.content not in added:
                added.add(token.content)
                new.append(tokenizers.AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                                                 rstrip=token.rstrip, normalized=token.normalized, special=True))
        if new:
            self._tok.add_tokens(new)

    def _declared_id(self, files: TokenizerFiles, key: str) -> tuple[int, ...]:
        ids = files.token_ids.get(key, ())
        for value in ids:
            if value >= self.vocab_size:
                raise InputError(f"{files.token_ids_file}: {key}={value} is outside the vocabulary "
                                 f"[0, {self.vocab_size}) of tokenizer {self.path!r}")
        return ids

    def _set_ids(self, files: TokenizerFiles) -> None:
        def token_id(name: str) -> int | None:
            token = files.named_tokens.get(name)
            return None if token is None else self._tok.token_to_id(token.content)

        bos, eos, pad = (self._declared_id(files, key) for key in _ID_KEYS)
        self.bos_id = token_id("bos_token") if "bos_token" in files.named_tokens else (bos[0] if bos else None)
        self.eos_ids = eos or ((token_id("eos_token"),) if "eos_token" in files.named_tokens else ())
        self.eos_id = token_id("eos_token") if "eos_token" in files.named_tokens else (
            self.eos_ids[0] if self.eos_ids else None)
        if "pad_token" in files.named_tokens:
            self.pad_id = token_id("pad_token")
        else:
            self.pad_id = pad[0] if pad else (self.eos_ids[0] if self.eos_ids else 0)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return _with_specials(list(ids), self, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def encode_prompt(self, text: str) -> list[int]:
        """transformers' ``tokenizer(text)["input_ids"]``: BOS/EOS wherever tokenizer.json's post-processor puts
        them, and nowhere else."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
                            ) -> str:
        """The rendered chat, as transformers' ``apply_chat_template(messages, tokenize=False, ...)``."""
        if self.chat_template is None:
            raise _no_chat_template(self)
        return chat.render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                special_tokens=self.special_tokens)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
                    ) -> list[int]:
        """transformers' ``apply_chat_template(messages, tokenize=True, ...)["input_ids"]``: the rendered text
        encoded without adding specials (the template writes its own)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(_as_id_list(ids, self.vocab_size), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """``"bytes"`` -> ByteTokenizer; a Hugging Face tokenizer directory, or a lone tokenizer.json -> HFTokenizer."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise InputError(f"tokenizer must be 'bytes', a Hugging Face tokenizer directory or a tokenizer.json "
                         f"file, got {name_or_path!r}")
    if name_or_path == BYTES:
        return ByteTokenizer()
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise InputError(f"tokenizer directory {name_or_path!r} has no {TOKENIZER_FILE} (only fast "
                             "tokenizers in that format are supported)")
        return HFTokenizer(path, read_tokenizer_files(name_or_path))
    if not os.path.isfile(name_or_path):
        raise InputError(f"tokenizer {name_or_path!r} does not exist; use 'bytes', a Hugging Face tokenizer "
                         "directory or a tokenizer.json file")
    return HFTokenizer(name_or_path)
