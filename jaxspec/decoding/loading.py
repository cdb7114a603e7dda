"""Turn training workdirs into what `generate` takes: the target, and the drafter arguments per method."""

from __future__ import annotations

import dataclasses
import os

from jaxspec.decoding import api
from jaxspec.models.heads import MedusaHeads
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


def load_lm(workdir: str) -> LoadedLM:
    """The model, params, config and tokenizer a training run left in `workdir`."""
    params, config = checkpoint.restore_params(workdir)
    if "medusa" in config and config.train.loss == "medusa":
        raise ValueError(f"{workdir} holds Medusa heads, not a language model; pass it as --draft_workdir with "
                         "--method=medusa and the target's workdir as --workdir")
    # An imported checkpoint names its Hugging Face tokenizer directory here, special tokens and all.
    tokenizer = load_tokenizer(config.data.tokenizer)
    return LoadedLM(build_model(config.model), params, config, tokenizer, workdir)


def drafter_kwargs(method: str, target: LoadedLM, *, draft_workdir: str | None = None, tree: str | None = None,
                   granularity: int = 0, skip_layers=(), confidence_threshold: float = 0.0) -> dict:
    """Keyword arguments of `api.generate` for `method`, loading draft models / heads from `draft_workdir`."""
    kwargs = dict(method=method)
    if method == "ar":
        return kwargs
    kwargs["tree"] = tree or api.DEFAULT_TREES[method]
    if method in ("draft", "medusa") and not draft_workdir:
        raise ValueError(f"method={method!r} needs --draft_workdir (a trained "
                         f"{'draft model' if method == 'draft' else 'Medusa heads'} run)")
    if method == "draft":
        draft = load_lm(draft_workdir)
        if draft.tokenizer.vocab_size != target.tokenizer.vocab_size:
            raise ValueError(f"draft tokenizer ({draft.config.data.tokenizer}) differs from the target's "
                             f"({target.config.data.tokenizer})")
        kwargs.update(draft_model=draft.model, draft_params=draft.params)
    elif method == "medusa":
        heads_params, cfg = checkpoint.restore_params(draft_workdir)
        if "medusa" not in cfg:
            raise ValueError(f"{draft_workdir} is not a Medusa heads run (its config has no 'medusa' section)")
        trained_on = cfg.get("target_workdir", "")
        if trained_on and os.path.realpath(trained_on) != os.path.realpath(target.workdir):
            raise ValueError(f"Medusa heads in {draft_workdir} were trained for the target {trained_on!r}, not "
                             f"{target.workdir!r}: heads trained for another target")
        m = cfg.medusa
        heads = MedusaHeads(m.num_heads, cfg.model.d_model, cfg.model.vocab_size, m.num_layers, m.share_lm_head)
        kwargs.update(heads=heads, heads_params=heads_params)
    elif method == "matformer":
        kwargs["granularity"] = granularity
    elif method == "layerskip":
        kwargs["skip_layers"] = tuple(skip_layers)
    if method in ("draft", "matformer", "layerskip"):
        kwargs["confidence_threshold"] = confidence_threshold
    return kwargs
