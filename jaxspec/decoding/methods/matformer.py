"""MatFormer self-drafting: a smaller granularity of a MatFormer target (nested FFNs) drafts for the full one."""

from __future__ import annotations

import dataclasses

from jaxspec import config as config_lib
from jaxspec.decoding import methods
from jaxspec.decoding.method import ModelDrafting, Target, is_int
from jaxspec.errors import InputError


@methods.register
@dataclasses.dataclass(frozen=True)
class MatFormer(ModelDrafting):
    """`granularity`: one index of model.matformer_fractions for every layer, or one per layer (Mix'n'Match)."""

    name = "matformer"
    default_tree = "chain:4"
    granularity: int | tuple = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.granularity, list):
            object.__setattr__(self, "granularity", tuple(self.granularity))
        g = self.granularity
        self.check((is_int(g) and g >= 0) or (isinstance(g, tuple) and g and all(is_int(x) and x >= 0 for x in g)),
                   "granularity", "a MatFormer granularity index, or one per layer (Mix'n'Match)")

    def build(self, target: Target, **objects):
        cfg = target.model.model_cfg
        config_lib.validate_granularity(cfg, self.granularity)
        if len(cfg.matformer_fractions) < 2:
            raise InputError("method 'matformer' needs a MatFormer target (model.matformer_fractions with >= 2 "
                             f"granularities); got {tuple(cfg.matformer_fractions)}")
        return self.model_drafter(target.model, target.params, granularity=self.granularity)
