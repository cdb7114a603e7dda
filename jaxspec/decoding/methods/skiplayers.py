"""Unified layer skipping (lossy): decode with a fixed set of layers skipped, chosen for a target speedup.

The skip set depends only on the depth and the speedup asked for, not on the input (the unified strategy of
Liu et al., 2024): `ceil(n_layers / target_speedup)` layers run, spread evenly from the first to the last, which
always run. The output is that of the shallower model, not the target's: `lossless = False`, refused under
`require_lossless`. The same model drafting for the full target, losslessly, is method "layerskip".
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxspec import config as config_lib
from jaxspec.decoding import methods
from jaxspec.decoding.method import LossyMode, Target, is_int
from jaxspec.models.lm import WithOptions


def evenly_skipped_layers(n_layers: int, target_speedup: float) -> tuple[int, ...]:
    """The layers skipped when ceil(n_layers / target_speedup) layers run, spread evenly from the first to the
    last (both always run); the speedup counts layer forwards only (embedding and LM head excluded)."""
    kept = min(n_layers, max(2, math.ceil(n_layers / target_speedup)))
    running = set(np.round(np.linspace(0, n_layers - 1, kept)).astype(int).tolist())
    return tuple(i for i in range(n_layers) if i not in running)


@methods.register
@dataclasses.dataclass(frozen=True)
class SkipLayers(LossyMode):
    """`skip_layers` () takes `evenly_skipped_layers(n_layers, target_speedup)`."""

    name = "skiplayers"
    target_speedup: float = 1.5
    skip_layers: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        self.check(isinstance(self.target_speedup, (int, float)) and self.target_speedup >= 1, "target_speedup",
                   "a number >= 1 (layer forwards per token of the full model over those of the skipping one)")
        self.check(all(is_int(i) and i >= 0 for i in self.skip_layers), "skip_layers",
                   "layer indices (empty: chosen from target_speedup)")

    def skipped(self, n_layers: int) -> tuple[int, ...]:
        return self.skip_layers or evenly_skipped_layers(n_layers, self.target_speedup)

    def decoder(self, target: Target):
        cfg = target.model.model_cfg
        skip = config_lib.validate_skip_layers(cfg, self.skipped(cfg.n_layers))
        return WithOptions.of(target.model, skip_layers=skip), target.params
