"""Recursive Speculative Decoding (Jeon et al., 2024): a draft model's token tree whose siblings are sampled
without replacement (Gumbel-top-k), verified by recursive rejection over each sibling's conditional draft
distribution -- lossless, and no two siblings spend the verifier's forward on the same token. At temperature 0
the siblings are the draft's top tokens, as for `draft`."""

from __future__ import annotations

import dataclasses

from jaxspec.decoding import methods
from jaxspec.decoding.method import Target
from jaxspec.decoding.methods.draft import DraftModel


@methods.register
@dataclasses.dataclass(frozen=True)
class RecursiveSpeculative(DraftModel):
    """The `draft` method's fields (a draft model by `draft_workdir` or the draft_model / draft_params objects),
    with siblings sampled without replacement."""

    name = "rsd"
    default_tree = "branching:3,1,1"

    def build(self, target: Target, **objects):
        drafter, draft_params = super().build(target, **objects)
        return dataclasses.replace(drafter, without_replacement=True), draft_params
