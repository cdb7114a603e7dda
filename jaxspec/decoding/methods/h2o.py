"""Heavy-hitter KV (H2O) decoding, lossy: autoregressive decoding whose attention layers keep a budgeted cache
of the `recent` latest keys plus the `budget - recent` keys with the largest accumulated attention
(`jaxspec.ops.heavy_hitter`). Attention then costs O(budget) per token at any context length, and the output is
that of the compressed model, not the target's: `lossless = False`, refused under `require_lossless`. The same
cache drafting for the full target, losslessly, is method "h2o_draft".
"""

from __future__ import annotations

import dataclasses

from jaxspec import config as config_lib
from jaxspec.config import MixerKind
from jaxspec.decoding import methods
from jaxspec.decoding.method import LossyMode, Target, is_int
from jaxspec.errors import InputError
from jaxspec.models.lm import WithOptions


def check_budget_fields(spec) -> None:
    """The `budget` and `recent` fields of an H2O spec (this method's and "h2o_draft"'s)."""
    spec.check(is_int(spec.budget) and spec.budget >= 1, "budget",
               "an integer >= 1 (keys each attention layer keeps per row and KV head)")
    spec.check(is_int(spec.recent) and 0 <= spec.recent <= spec.budget, "recent",
               f"an integer in [0, budget={spec.budget}] (latest positions always kept)")


def budgeted(spec, model) -> WithOptions:
    """`model` applied with the spec's budgeted cache; a model with sliding-window layers is refused (a window
    already bounds its cache)."""
    cfg = model.model_cfg
    windowed = [i for i, kind in enumerate(config_lib.layer_kinds(cfg))
                if kind == MixerKind.ATTENTION and config_lib.layer_window(cfg, i)]
    if windowed:
        raise InputError(f"method {spec.name!r}: layers {windowed} attend through a sliding window; a budgeted "
                         "cache is for models whose attention layers are all global")
    return WithOptions.of(model, kv_budget=(spec.budget, spec.recent))


@methods.register
@dataclasses.dataclass(frozen=True)
class HeavyHitter(LossyMode):
    """`budget` keys per attention layer, row and KV head, of which the `recent` latest always stay."""

    name = "h2o"
    budget: int = 256
    recent: int = 128

    def __post_init__(self):
        check_budget_fields(self)

    def decoder(self, target: Target):
        return budgeted(self, target.model), target.params
