"""Layer-skip self-drafting: the target with some layers skipped drafts for itself (no extra weights)."""

from __future__ import annotations

import dataclasses

from jaxspec import config as config_lib
from jaxspec.decoding import methods
from jaxspec.decoding.method import ModelDrafting, Target, is_int
from jaxspec.errors import InputError


def default_skip_layers(n_layers: int) -> tuple[int, ...]:
    """Every other layer of the upper two thirds (the first third, which builds the features every later
    layer reads, stays whole), never the last layer."""
    return tuple(range(n_layers // 3, n_layers - 1, 2))


@methods.register
@dataclasses.dataclass(frozen=True)
class LayerSkip(ModelDrafting):
    """`skip_layers` () takes `default_skip_layers`."""

    name = "layerskip"
    default_tree = "chain:3"
    skip_layers: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        self.check(all(is_int(i) and i >= 0 for i in self.skip_layers), "skip_layers",
                   "layer indices (empty: the default skip set)")

    def build(self, target: Target, **objects):
        cfg = target.model.model_cfg
        skip = config_lib.validate_skip_layers(cfg, self.skip_layers or default_skip_layers(cfg.n_layers))
        if not skip:
            raise InputError(f"method 'layerskip' needs layers to skip; the model has only n_layers={cfg.n_layers}")
        return self.model_drafter(target.model, target.params, skip_layers=skip)
