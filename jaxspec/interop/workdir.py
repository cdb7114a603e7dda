"""Import a checkpoint (a Hugging Face directory or a GGUF file) into a fresh jaxspec workdir.

    config = import_checkpoint("path/to/hf_dir", "/tmp/imported")         # or "path/to/model.gguf"

The workdir restores like a training workdir (`jaxspec.training.checkpoint.restore_params`), so
`launch.decode --workdir=...` serves the imported model:

    workdir/config.json               the run config: the imported model, data.tokenizer naming tokenizer/
    workdir/checkpoints/0/            the params (step 0, params only)
    workdir/tokenizer/                the checkpoint's tokenizer as a Hugging Face tokenizer directory

A Hugging Face source's tokenizer files are copied as they are; a GGUF file's tokenizer is rebuilt from its
metadata (`gguf_tokenizer`). A source without a tokenizer (no tokenizer.json, no tokenizer.ggml.model) leaves
data.tokenizer at its default.

The import is atomic: everything is written to a hidden sibling directory that replaces the workdir only when
complete, so an import that fails or is killed midway leaves no workdir behind (a killed import's leftover is
removed by the next import into the same workdir).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid

import ml_collections

from jaxspec import config as config_lib
from jaxspec.errors import InputError
from jaxspec.interop import gguf, gguf_tokenizer, hf
from jaxspec.training import checkpoint as checkpoint_lib

TOKENIZER_DIR = "tokenizer"
# The files of a Hugging Face tokenizer directory, as transformers reads them.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json", "config.json")
GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"


def _starts_with_gguf_magic(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def checkpoint_format(source: str) -> str:
    """"hf" for a Hugging Face checkpoint directory, "gguf" for a .gguf file (or any file that starts as
    one); anything else is rejected."""
    if os.path.isdir(source):
        return "hf"
    if os.path.isfile(source) and (source.lower().endswith(GGUF_SUFFIX) or _starts_with_gguf_magic(source)):
        return "gguf"
    if not os.path.exists(source):
        raise InputError(f"checkpoint {source!r} does not exist")
    raise InputError(f"checkpoint {source!r} is neither a Hugging Face checkpoint directory nor a "
                     f"{GGUF_SUFFIX} file")


def _check_fresh(workdir: str) -> None:
    if os.path.isdir(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)):
        raise InputError(f"workdir {workdir!r} already holds checkpoints; import into a fresh workdir")
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise InputError(f"workdir {workdir!r} is not empty ({sorted(os.listdir(workdir))[:4]}); import into a "
                         "fresh workdir")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise InputError(f"workdir {workdir!r} exists and is not a directory")


def _staging_prefix(workdir: str) -> str:
    return f".{os.path.basename(workdir)}.importing-"


def _remove_stale_staging(workdir: str) -> None:
    """Delete what a killed import into this workdir left behind (nothing reads it)."""
    parent = os.path.dirname(workdir)
    for name in os.listdir(parent):
        if name.startswith(_staging_prefix(workdir)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _copy_hf_tokenizer(hf_dir: str, out_dir: str) -> bool:
    """Copy the checkpoint's tokenizer files; False (nothing copied) when it has no tokenizer.json."""
    if not os.path.isfile(os.path.join(hf_dir, HF_TOKENIZER_FILES[0])):
        return False
    os.makedirs(out_dir)
    for name in HF_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    return True


def _write_tokenizer(fmt: str, source: str, gguf_file, out_dir: str) -> bool:
    """The source's tokenizer as a Hugging Face tokenizer directory; False when the source has none."""
    if fmt == "hf":
        written = _copy_hf_tokenizer(source, out_dir)
    else:
        written = gguf_tokenizer.MODEL_KEY in gguf_file.reader.fields
        if written:
            gguf_tokenizer.write_tokenizer_dir(gguf_file, out_dir)
    if written:
        from jaxspec.training.tokenizer import load_tokenizer

        load_tokenizer(out_dir)  # fails now, not at decode time, on files we cannot use
    return written


def _load(fmt: str, source: str, tokenizer_dir: str, dtype: str, max_len: int | None):
    """(model_cfg, params, whether a tokenizer was written to `tokenizer_dir`); the tokenizer comes first, as
    it fails faster than the weights."""
    gguf_file = gguf.open_gguf(source) if fmt == "gguf" else None
    has_tokenizer = _write_tokenizer(fmt, source, gguf_file, tokenizer_dir)
    if fmt == "hf":
        model_cfg, params = hf.load_hf_checkpoint(source, dtype=dtype, max_len=max_len)
    else:
        model_cfg, params = gguf.checkpoint_from_gguf(gguf_file, dtype=dtype, max_len=max_len)
    return model_cfg, params, has_tokenizer


@contextlib.contextmanager
def _quiet_logging():
    """Orbax reports every save step (and JAX its backend search) at INFO through absl logging; keep the console
    to warnings."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    python_logger = logging.getLogger("absl")
    level = python_logger.level
    absl_logging.set_verbosity(absl_logging.WARNING)
    python_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)
        python_logger.setLevel(level)


def _write_workdir(staging: str, final: str, fmt: str, source: str, dtype: str, max_len: int | None):
    """Fill `staging` with the workdir that will live at `final`; returns the run config."""
    tokenizer_dir = os.path.join(staging, TOKENIZER_DIR)
    model_cfg, params, has_tokenizer = _load(fmt, source, tokenizer_dir, dtype, max_len)
    config = config_lib.base_config()
    config.model = model_cfg
    if has_tokenizer:
        config.data.tokenizer = os.path.join(final, TOKENIZER_DIR)  # where it will be once in place
    with checkpoint_lib.CheckpointManager(staging) as manager:
        manager.save(0, {"params": params}, {}, config, force=True)
    return config


def import_checkpoint(source: str, workdir: str, dtype: str = "float32",
                      max_len: int | None = None) -> ml_collections.ConfigDict:
    """Import a Hugging Face checkpoint directory or a GGUF file into a fresh `workdir`; returns its config.

    `dtype` ("float32" | "bfloat16") is the parameters' and the model's compute dtype; `max_len` the
    decode-state length (default: the checkpoint's context length). The workdir must not exist or be empty.
    """
    fmt = checkpoint_format(source)
    workdir = os.path.abspath(workdir)
    _check_fresh(workdir)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    _remove_stale_staging(workdir)
    staging = os.path.join(os.path.dirname(workdir), _staging_prefix(workdir) + uuid.uuid4().hex)
    os.makedirs(staging)
    try:
        with _quiet_logging():
            config = _write_workdir(staging, workdir, fmt, source, dtype, max_len)
        os.replace(staging, workdir)  # atomic; replaces an empty workdir directory too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config


__all__ = ["TOKENIZER_DIR", "checkpoint_format", "import_checkpoint"]
