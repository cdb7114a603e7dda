"""Heavy-hitter KV self-drafting (lossless): the target with a budgeted H2O cache (method "h2o"'s) drafts, and
the target verifies against its full cache, so the output is the target's. The long-context drafting of
TriForce / LongSpec: the drafter's attention costs O(budget) per token however long the context is.
"""

from __future__ import annotations

import dataclasses

from jaxspec.decoding import methods
from jaxspec.decoding.method import ModelDrafting, Target
from jaxspec.decoding.methods.h2o import budgeted, check_budget_fields
from jaxspec.models.decode_layout import for_decoding


@methods.register
@dataclasses.dataclass(frozen=True)
class HeavyHitterDraft(ModelDrafting):
    """`budget` and `recent`: the drafter's cache, as in method "h2o"."""

    name = "h2o_draft"
    default_tree = "chain:4"
    budget: int = 256
    recent: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_budget_fields(self)

    def build(self, target: Target, **objects):
        # The drafter runs the decode layout (fused projections), as the loop's target does.
        model, params = for_decoding(target.model, target.params)
        return self.model_drafter(budgeted(self, model), params)
