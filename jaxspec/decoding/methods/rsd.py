"""Recursive Speculative Decoding (Jeon et al., 2024): a draft model's token tree whose siblings are sampled
without replacement (Gumbel-top-k), verified by recursive rejection over each sibling's conditional draft
distribution -- lossless, and no two siblings spend the verifier's forward on the same token. At temperature 0
the siblings are the draft's top tokens, as for `draft`. (Every model-drafting method takes
`without_replacement=True`; this is the `draft` method with it on.)"""

from __future__ import annotations

import dataclasses

from jaxspec.decoding import methods
from jaxspec.decoding.methods.draft import DraftModel


@methods.register
@dataclasses.dataclass(frozen=True)
class RecursiveSpeculative(DraftModel):
    """The `draft` method's fields (a draft model by `draft_workdir` or the draft_model / draft_params objects),
    with siblings sampled without replacement."""

    name = "rsd"
    default_tree = "branching:3,1,1"
    without_replacement: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.check(self.without_replacement, "without_replacement", "True (False is the method 'draft')")
