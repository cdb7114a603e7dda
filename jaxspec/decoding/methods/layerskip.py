"""Layer-skip self-drafting: the target with some layers skipped drafts for itself (no extra weights)."""

from __future__ import annotations

import dataclasses

from jaxspec import config as config_lib
from jaxspec.decoding import methods
from jaxspec.decoding.drafters import ModelDrafter
from jaxspec.decoding.method import Speculative, Target, is_int
from jaxspec.errors import InputError


def default_skip_layers(n_layers: int) -> tuple[int, ...]:
    """Every other layer of the upper two thirds (the first third, which builds the features every later
    layer reads, stays whole), never the last layer."""
    return tuple(range(n_layers // 3, n_layers - 1, 2))


@methods.register
@dataclasses.dataclass(frozen=True)
class LayerSkip(Speculative):
    """`skip_layers` () takes `default_skip_layers`; `confidence_threshold` stops a branch whose draft's top
    probability falls below it."""

    name = "layerskip"
    default_tree = "chain:3"
    skip_layers: tuple = ()
    confidence_threshold: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        self.check(all(is_int(i) and i >= 0 for i in self.skip_layers), "skip_layers",
                   "layer indices (empty: the default skip set)")
        self.check(0 <= self.confidence_threshold < 1, "confidence_threshold", "a number in [0, 1)")

    def build(self, target: Target, **objects):
        cfg = target.model.model_cfg
        skip = config_lib.validate_skip_layers(cfg, self.skip_layers or default_skip_layers(cfg.n_layers))
        if not skip:
            raise InputError(f"method 'layerskip' needs layers to skip; the model has only n_layers={cfg.n_layers}")
        return ModelDrafter(target.model, self.token_tree(), skip_layers=skip,
                            confidence_threshold=self.confidence_threshold), target.params
