"""Text corpora, a deterministic train/validation split, sequence packing and resumable batch streams.

The default corpus is the running interpreter's own standard-library sources (``source="stdlib"``): real
text on every machine, with no download. Any other source is a file, a directory or a glob of ``.txt``,
``.py``, ``.md`` or ``.jsonl`` files (one JSON object with a string ``text`` field per line).

Documents go to validation by a stable hash of their name (path, or ``path:line`` for JSONL), so the split
does not depend on file order or on the machine. Each split is packed into windows of ``seq_len + 1``
tokens (``BOS doc EOS BOS doc EOS ...``, the ragged tail dropped); a batch is ``inputs = w[:, :-1]``,
``targets = w[:, 1:]``. ``Batches`` walks the windows in an order shuffled per epoch from
``(seed, epoch)``; its position is a small JSON dict that a checkpoint stores, so a resumed run sees the
very same stream.

Config keys (``config.data``): source, tokenizer, seq_len, batch_size, val_fraction, max_bytes, seed and
optionally max_documents.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from jaxspec.errors import InputError
from jaxspec.training.tokenizer import Tokenizer, load_tokenizer

STDLIB = "stdlib"
SUFFIXES = (".txt", ".py", ".md", ".jsonl")
# Directories of the standard library that are not library source (tests, installed packages, caches).
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Document:
    name: str  # stable across machines: the split hashes it
    text: str


# ----------------------------------------------------------------------------------------------- corpus


def stdlib_files(skip_dirs=STDLIB_SKIP_DIRS) -> tuple[str, list[str]]:
    """(stdlib root, sorted relative paths of its *.py files), pruning directories named in `skip_dirs` (by
    default tests and installed packages)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        rel_dir = os.path.relpath(dirpath, root)
        for f in filenames:
            if f.endswith(".py"):
                found.append(os.path.normpath(os.path.join(rel_dir, f)).replace(os.sep, "/"))
    return root, sorted(found)


def _source_files(source: str) -> list[str]:
    """Sorted files of a file path, a directory (searched recursively) or a glob pattern."""
    if os.path.isdir(source):
        files = [
            os.path.join(dirpath, f)
            for dirpath, _, filenames in os.walk(source)
            for f in filenames
            if f.endswith(SUFFIXES)
        ]
    elif os.path.isfile(source):
        files = [source]
    else:
        files = [f for f in glob.glob(source, recursive=True) if os.path.isfile(f)]
    if not files:
        raise InputError(
            f"data source {source!r} matches no files; use 'stdlib', a file, a directory or a glob of "
            f"{', '.join(SUFFIXES)} files"
        )
    for f in files:
        if not f.endswith(SUFFIXES):
            raise InputError(f"data file {f!r} has an unsupported suffix; allowed: {', '.join(SUFFIXES)}")
    return sorted(files)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise InputError(f"data file {path!r} could not be read: {err}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"data file {path!r} is not valid UTF-8 text: {err}") from err


def _file_documents(path: str, name: str) -> Iterator[Document]:
    text = _read_text(path)
    if not path.endswith(".jsonl"):
        yield Document(name, text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"data file {path!r} line {lineno} is not valid JSON: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"data file {path!r} line {lineno} has no string 'text' field")
        yield Document(f"{name}:{lineno}", record["text"])


def _all_documents(source: str) -> Iterator[Document]:
    if source == STDLIB:
        root, rel_paths = stdlib_files()
        for rel in rel_paths:
            yield from _file_documents(os.path.join(root, rel), f"stdlib/{rel}")
    else:
        paths = _source_files(source)
        root = source if os.path.isdir(source) else os.path.commonpath([os.path.dirname(p) for p in paths])
        for path in paths:
            # Named relative to the corpus root: the hash split (split_documents) must not change when
            # the corpus is moved or copied to another directory.
            yield from _file_documents(path, os.path.relpath(path, root))


def load_documents(
    source: str, max_documents: int | None = None, max_bytes: int | None = None
) -> list[Document]:
    """Documents of a source, in sorted file order, capped by count and by total UTF-8 size.

    Reading stops as soon as a cap is reached (the document crossing ``max_bytes`` is cut at the cap), so
    a small cap on the ~12 MB standard library reads only the first few files.
    """
    docs, total = [], 0
    for doc in _all_documents(source):
        if max_documents is not None and len(docs) >= max_documents:
            break
        if max_bytes is not None:
            size = len(doc.text.encode("utf-8"))
            if total + size > max_bytes:
                kept = doc.text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
                if kept:
                    docs.append(Document(doc.name, kept))
                break
            total += size
        if doc.text:
            docs.append(doc)
    if not docs:
        raise InputError(f"data source {source!r} gives an empty corpus (no non-empty documents)")
    return docs


# ------------------------------------------------------------------------------------------------ split


def _hash_fraction(name: str) -> float:
    """A uniform number in [0, 1) from a document name, stable across processes and machines."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def split_documents(names: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, validation indices), each split non-empty and in corpus order."""
    if len(names) < 2:
        raise InputError(
            f"the corpus has {len(names)} document(s); a train/validation split needs at least 2 "
            "(raise max_documents / max_bytes, or add files)"
        )
    scores = [_hash_fraction(n) for n in names]
    val = [i for i, s in enumerate(scores) if s < val_fraction]
    # A small corpus may hash every document to one side; move the extreme one across.
    if not val:
        val = [int(np.argmin(scores))]
    if len(val) == len(names):
        val.remove(int(np.argmax(scores)))
    val_set = set(val)
    return [i for i in range(len(names)) if i not in val_set], sorted(val)


# ---------------------------------------------------------------------------------------------- packing


def pack_windows(token_docs: list[np.ndarray], bos_id: int | None, eos_id: int | None, window: int) -> np.ndarray:
    """int32 [N, window]: ``BOS doc EOS`` for every document (without the ids a tokenizer does not declare),
    concatenated and cut into full windows."""
    bos = np.array([] if bos_id is None else [bos_id], np.int32)
    eos = np.array([] if eos_id is None else [eos_id], np.int32)
    pieces = []
    for toks in token_docs:
        pieces += [bos, toks.astype(np.int32), eos]
    stream = np.concatenate(pieces)
    n = len(stream) // window
    return stream[: n * window].reshape(n, window)


class Batches:
    """An endless, seeded, resumable stream of ``{"inputs", "targets"}`` int32 [B, T] batches.

    Epoch ``e`` visits the windows in the order ``permutation(seed, e)`` (or in stored order when
    ``shuffle=False``), ``steps_per_epoch`` full batches of it; the partial last batch is skipped. The
    position is ``state() = {"epoch", "step", "seed", "num_windows"}``; ``restore(state)`` continues from it.
    """

    def __init__(self, windows: np.ndarray | dict[str, np.ndarray], batch_size: int, seed: int,
                 shuffle: bool = True, remedy: str = "lower batch_size or seq_len, or raise max_bytes"):
        # A dict of arrays (one example per leading index, e.g. a self-distillation set) is batched as is.
        tokens = windows["tokens"] if isinstance(windows, dict) else windows
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise InputError(f"windows must be [N, seq_len + 1] with seq_len >= 1, got shape {tokens.shape}")
        if len(tokens) < batch_size:
            raise InputError(
                f"{len(tokens)} windows of {tokens.shape[1]} tokens cannot fill one batch of {batch_size}; {remedy}"
            )
        self.windows = windows
        self.num_windows = len(tokens)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = self.num_windows // batch_size
        self._width = tokens.shape[1]
        self.epoch = 0
        self.step = 0
        self._order_epoch, self._order = -1, None

    @property
    def seq_len(self) -> int:
        return self._width - 1

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = self.num_windows
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(self.windows, dict):
            return {name: array[rows] for name, array in self.windows.items()}
        w = self.windows[rows]
        return {"inputs": w[:, :-1], "targets": w[:, 1:]}

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        order = self._epoch_order(self.epoch)
        start = self.step * self.batch_size
        batch = self._batch(order[start : start + self.batch_size])
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def eval_pass(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The windows in stored order, batch by batch (at most ``max_batches``); keeps the position."""
        n = self.steps_per_epoch if max_batches is None else min(max_batches, self.steps_per_epoch)
        for i in range(n):
            yield self._batch(np.arange(i * self.batch_size, (i + 1) * self.batch_size))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_windows": self.num_windows}

    def restore(self, state: dict) -> None:
        """Continue from a ``state()``; another seed or corpus size is refused (the stream would differ)."""
        missing = {"epoch", "step", "seed", "num_windows"} - set(state)
        if missing:
            raise InputError(f"data state {state} lacks keys {sorted(missing)}")
        if int(state["seed"]) != self.seed:
            raise InputError(f"data state has seed {state['seed']} but this stream has seed {self.seed}")
        if int(state["num_windows"]) != self.num_windows:
            raise InputError(
                f"data state was made for {state['num_windows']} windows but this stream has "
                f"{self.num_windows}: the corpus, tokenizer, seq_len or caps changed"
            )
        if not 0 <= int(state["step"]) < self.steps_per_epoch or int(state["epoch"]) < 0:
            raise InputError(
                f"data state position {state} is out of range (step must be in [0, {self.steps_per_epoch}))"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# ------------------------------------------------------------------------------------ config entry points


WINDOWS = ("start", "reply")


@dataclass(frozen=True)
class DataSpec:
    """The validated data config."""

    source: str
    tokenizer: str
    seq_len: int
    batch_size: int
    val_fraction: float
    max_bytes: int | None
    max_documents: int | None
    seed: int
    window: str = "start"  # "reply": a self-distillation example's window starts where its reply does


def _require(data_cfg, key: str):
    if key not in data_cfg:
        raise InputError(f"data config is missing key {key!r}")
    return data_cfg[key]


def _positive_int(key: str, value, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        allowed = "a positive integer or None" if allow_none else "a positive integer"
        raise InputError(f"data.{key}={value!r} is invalid; expected {allowed}")
    return int(value)


def parse_data_config(data_cfg) -> DataSpec:
    """Checks a ``config.data`` ConfigDict (or mapping) and returns its values; bad ones raise InputError."""
    source = _require(data_cfg, "source")
    tokenizer = _require(data_cfg, "tokenizer")
    for key, value in (("source", source), ("tokenizer", tokenizer)):
        if not isinstance(value, str) or not value:
            raise InputError(f"data.{key}={value!r} is invalid; expected a non-empty string")
    val_fraction = _require(data_cfg, "val_fraction")
    is_number = isinstance(val_fraction, int | float) and not isinstance(val_fraction, bool)
    if not is_number or not 0 < val_fraction < 1:
        raise InputError(f"data.val_fraction={val_fraction!r} is invalid; expected a number in (0, 1)")
    seed = _require(data_cfg, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"data.seed={seed!r} is invalid; expected a non-negative integer")
    window = data_cfg.get("window", "start")  # configs saved before the key existed started at the example
    if window not in WINDOWS:
        raise InputError(f"data.window={window!r} is invalid; expected one of {list(WINDOWS)}")
    return DataSpec(
        source=source,
        tokenizer=tokenizer,
        seq_len=_positive_int("seq_len", _require(data_cfg, "seq_len")),
        batch_size=_positive_int("batch_size", _require(data_cfg, "batch_size")),
        val_fraction=float(val_fraction),
        max_bytes=_positive_int("max_bytes", _require(data_cfg, "max_bytes"), allow_none=True),
        max_documents=_positive_int("max_documents", data_cfg.get("max_documents", None), allow_none=True),
        seed=int(seed),
        window=window,
    )


# Tokenised corpora, once per process: (source, tokenizer, caps) -> (document names, token arrays).
_CORPUS_CACHE: dict[tuple, tuple[list[str], list[np.ndarray]]] = {}


def _tokenized_corpus(spec: DataSpec, tokenizer: Tokenizer) -> tuple[list[str], list[np.ndarray]]:
    key = (spec.source, spec.tokenizer, spec.max_documents, spec.max_bytes)
    if key not in _CORPUS_CACHE:
        docs = load_documents(spec.source, spec.max_documents, spec.max_bytes)
        _CORPUS_CACHE[key] = ([d.name for d in docs], tokenizer.encode_batch([d.text for d in docs]))
    return _CORPUS_CACHE[key]


def _split_tokens(spec: DataSpec, tokenizer: Tokenizer) -> tuple[list[np.ndarray], list[np.ndarray]]:
    names, token_docs = _tokenized_corpus(spec, tokenizer)
    train_idx, val_idx = split_documents(names, spec.val_fraction)
    return [token_docs[i] for i in train_idx], [token_docs[i] for i in val_idx]


def make_datasets(data_cfg) -> tuple[Batches, Batches, Tokenizer]:
    """(train stream shuffled per epoch, validation stream in fixed order, tokenizer) from ``config.data``.

    A ``source`` that is a self-distillation set (a directory with a manifest, see training/selfdistill.py)
    yields its examples cut to ``seq_len + 1`` positions as ``{"tokens", "features", "mask"}`` batches (and
    ``layer_features`` when the set stores some), split into train and validation by a hash of each example's
    index. With ``window="reply"`` each example's window starts at the position before its first reply token
    (the first a drafter is scored from) instead of at its first token: for drafters that read each position on
    its own (Medusa and Hydra heads), a window of about the reply's length then holds the whole reply and no
    prompt positions, which carry no loss."""
    spec = parse_data_config(data_cfg)
    tokenizer = load_tokenizer(spec.tokenizer)
    remedy = "lower batch_size or seq_len, or raise max_bytes"
    if spec.window != "start" and not is_selfdistill_set(spec.source):
        raise InputError(f"data.window={spec.window!r} needs a self-distillation set as data.source (corpus text "
                         f"{spec.source!r} has no replies to start at)")
    if is_selfdistill_set(spec.source):
        splits = _selfdistill_splits(spec)
        remedy = "lower data.batch_size, raise data.val_fraction, or make the set with more prompts"
    else:
        train_docs, val_docs = _split_tokens(spec, tokenizer)
        splits = [pack_windows(docs, tokenizer.bos_id, tokenizer.eos_id, spec.seq_len + 1)
                  for docs in (train_docs, val_docs)]
    streams = []
    for split, windows, shuffle in zip(("train", "validation"), splits, (True, False), strict=True):
        try:
            streams.append(Batches(windows, spec.batch_size, spec.seed, shuffle=shuffle, remedy=remedy))
        except InputError as err:
            raise InputError(f"{split} split of data source {spec.source!r}: {err}") from err
    return streams[0], streams[1], tokenizer


def is_selfdistill_set(source: str) -> bool:
    from jaxspec.training import selfdistill

    return os.path.isfile(os.path.join(source, selfdistill.MANIFEST))


def _selfdistill_splits(spec: DataSpec) -> list[dict[str, np.ndarray]]:
    from jaxspec.training import selfdistill

    manifest, arrays = selfdistill.read(spec.source)
    width = spec.seq_len + 1
    if width > manifest["seq_len"]:
        raise InputError(f"data.seq_len={spec.seq_len} needs {width} positions per example; the self-distillation "
                         f"set {spec.source!r} stores {manifest['seq_len']} (use data.seq_len <= "
                         f"{manifest['seq_len'] - 1})")
    arrays = dict(arrays, mask=selfdistill.loss_mask(arrays))
    names = ["tokens", "features", "mask"] + (["layer_features"] if "layer_features" in arrays else [])
    if spec.window == "reply":
        examples = {name: _windows_from(arrays[name], arrays["reply_start"] - 1, width) for name in names}
    else:
        examples = {name: arrays[name][:, :width] for name in names}
    indices = split_documents([str(i) for i in range(len(examples["tokens"]))], spec.val_fraction)
    return [{name: array[np.asarray(rows, np.int64)] for name, array in examples.items()} for rows in indices]


def _windows_from(array: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    """array [N, L, ...] cut to [N, width, ...] from each row's `start`; zero past the row's end."""
    padded = np.concatenate([array, np.zeros((len(array), width, *array.shape[2:]), array.dtype)], axis=1)
    columns = np.asarray(start, np.int64)[:, None] + np.arange(width)[None, :]
    return np.take_along_axis(padded, columns.reshape(columns.shape + (1,) * (array.ndim - 2)), axis=1)


def heldout_prompts(data_cfg, n: int, prompt_len: int) -> list[str]:
    """``n`` prompts of ``prompt_len`` tokens cut from validation documents, for decoding evaluation.

    The first chunk of every long-enough validation document comes first (in corpus order), then second
    chunks, and so on; fewer than ``n`` chunks in the validation split raises InputError.
    """
    if n < 1 or prompt_len < 1:
        raise InputError(f"heldout_prompts needs n >= 1 and prompt_len >= 1, got n={n}, "
                         f"prompt_len={prompt_len}")
    spec = parse_data_config(data_cfg)
    tokenizer = load_tokenizer(spec.tokenizer)
    _, val_docs = _split_tokens(spec, tokenizer)
    prompts = []
    chunk = 0
    while len(prompts) < n:
        found = False
        for toks in val_docs:
            if len(toks) >= (chunk + 1) * prompt_len:
                found = True
                prompts.append(tokenizer.decode(toks[chunk * prompt_len : (chunk + 1) * prompt_len]))
                if len(prompts) == n:
                    break
        if not found:
            raise InputError(
                f"the validation split holds only {len(prompts)} prompts of {prompt_len} tokens, {n} asked; "
                "lower n or prompt_len, or raise val_fraction / max_bytes"
            )
        chunk += 1
    return prompts
