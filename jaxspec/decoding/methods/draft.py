"""A separate draft model (chains or trees, drafted depth by depth), verified by the target."""

from __future__ import annotations

import dataclasses

from jaxspec.decoding import methods
from jaxspec.decoding.method import ModelDrafting, Target
from jaxspec.errors import InputError


@methods.register
@dataclasses.dataclass(frozen=True)
class DraftModel(ModelDrafting):
    """`draft_workdir`: a trained or imported draft model with the target's vocabulary (or pass `draft_model`
    and `draft_params` to `build` / `api.generate`)."""

    name = "draft"
    needs = "a draft model"
    objects = ("draft_model", "draft_params")
    default_tree = "chain:4"
    draft_workdir: str = ""

    def __post_init__(self):
        super().__post_init__()
        self.check(isinstance(self.draft_workdir, str), "draft_workdir", "a workdir path")

    def build(self, target: Target, draft_model=None, draft_params=None):
        if draft_model is None and draft_params is None:
            if not self.draft_workdir:
                raise InputError("method 'draft' needs a draft model: draft_workdir (--draft_workdir=a trained "
                                 "or imported draft model), or the draft_model and draft_params objects")
            from jaxspec.decoding.loading import load_lm

            draft = load_lm(self.draft_workdir)
            draft_model, draft_params = draft.model, draft.params
        if draft_model is None or draft_params is None:
            raise InputError("method 'draft' needs both draft_model and draft_params")
        vocab, draft_vocab = target.model.model_cfg.vocab_size, draft_model.model_cfg.vocab_size
        if draft_vocab != vocab:
            raise InputError(f"draft model vocab_size={draft_vocab} differs from the target's vocab_size={vocab}; "
                             "speculative decoding needs one vocabulary")
        return self.model_drafter(draft_model, draft_params)
