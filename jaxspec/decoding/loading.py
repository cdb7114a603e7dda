"""Turn a zoo name or a workdir (a training run or an imported checkpoint) into what `generate` takes."""

from __future__ import annotations

import dataclasses
import os

from jaxspec import zoo
from jaxspec.errors import InputError
from jaxspec.models.lm import DecoderLM, build_model
from jaxspec.training import checkpoint
from jaxspec.training.tokenizer import load_tokenizer


@dataclasses.dataclass
class LoadedLM:
    model: DecoderLM
    params: dict
    config: object  # the run's ConfigDict
    tokenizer: object
    workdir: str


def load_lm(model: str) -> LoadedLM:
    """The model, params, config and tokenizer of a zoo model (fetched and converted once, then cached) or of
    the workdir a training run or an import left."""
    if model not in zoo.ZOO and not os.path.isdir(model):
        raise InputError(f"{model!r} is neither a zoo model (one of {sorted(zoo.ZOO)}) nor a workdir (no such "
                         "directory)")
    workdir = zoo.model_workdir(model) if model in zoo.ZOO else model
    params, config = checkpoint.restore_params(workdir)
    if "medusa" in config and config.train.loss == "medusa":
        raise InputError(f"{workdir} holds Medusa heads, not a language model; pass it as --draft_workdir with "
                         "--method=medusa and the target's workdir as --workdir")
    # An imported checkpoint names its Hugging Face tokenizer directory here, special tokens and all.
    tokenizer = load_tokenizer(config.data.tokenizer)
    return LoadedLM(build_model(config.model), params, config, tokenizer, workdir)
