"""SWIFT (Xia et al., 2024, "On-the-Fly Self-Speculative Decoding"): the target with some layers skipped drafts
over the target's own cache, and the skip set is searched while decoding, with no calibration run
(`gated_draft.SkipSearchPolicy`). Lossless: the full target verifies every draft. With `search_rounds` = 0 and a
`skip_layers` set it is plain layer-skip self-drafting over the target's cache, with that set throughout.

The search carries over to later requests, as SWIFT reuses its optimised set: a call's result reports each row's
best set, and the next request starts from it (and may keep searching, or not):

    first = api.generate(model, params, prompts, method="swift")
    then = api.generate(model, params, more, method="swift", skip_layers=searched_skip_layers(first)[0])
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxspec import config as config_lib
from jaxspec.decoding import methods
from jaxspec.decoding.gated_draft import SkipSearchPolicy, build_gated
from jaxspec.decoding.method import Speculative, Target, is_int
from jaxspec.errors import InputError


def search_pool(n_layers: int) -> np.ndarray:
    """[n_layers] bool: the layers the search may skip; the first and the last layer always run."""
    pool = np.ones(n_layers, bool)
    pool[[0, n_layers - 1]] = False
    return pool


def searched_skip_layers(result) -> list[tuple[int, ...]]:
    """Each row's best skip set at the end of a SWIFT call (an `api.GenerateResult`), as layer indices."""
    if "skip_layers" not in result.drafter_report:
        raise InputError(f"the result of method {result.method!r} reports no searched skip sets (method 'swift' "
                         "does)")
    return [tuple(int(i) for i in np.flatnonzero(row)) for row in result.drafter_report["skip_layers"]]


@methods.register
@dataclasses.dataclass(frozen=True)
class Swift(Speculative):
    """`skip_ratio`: the share of the layers skipped, in (0, 1). `skip_layers`: the first skip set (its size
    then sets the ratio); () draws one from the pool with `search_seed`. `search_rounds`: rounds of the
    optimisation phase (0: no search). `trial_rounds`: rounds each candidate set drafts before it is scored.
    `context_window` = W > 0 scores candidates as SWIFT's paper does instead: each search round, one candidate
    predicts the last W committed tokens teacher-forced (the share it gets right is its score) while the rows
    draft with their best set; attention-only targets (the target's cache is rewound for it)."""

    name = "swift"
    default_tree = "chain:4"
    skip_ratio: float = 0.45
    skip_layers: tuple = ()
    search_rounds: int = 32
    trial_rounds: int = 2
    search_seed: int = 0
    context_window: int = 0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        self.check(isinstance(self.skip_ratio, (int, float)) and not isinstance(self.skip_ratio, bool)
                   and 0 < self.skip_ratio < 1, "skip_ratio", "a share of the layers in (0, 1)")
        self.check(all(is_int(i) and i >= 0 for i in self.skip_layers), "skip_layers",
                   "layer indices (empty: drawn from the search pool)")
        self.check(is_int(self.search_rounds) and self.search_rounds >= 0, "search_rounds",
                   "a non-negative integer (0: draft with the first skip set throughout)")
        self.check(is_int(self.trial_rounds) and self.trial_rounds >= 1, "trial_rounds", "a positive integer")
        self.check(is_int(self.search_seed), "search_seed", "an integer")
        self.check(is_int(self.context_window) and self.context_window >= 0, "context_window",
                   "a non-negative integer (0: score candidates by trial rounds)")

    def build(self, target: Target, **objects):
        n_layers = target.model.model_cfg.n_layers
        if self.context_window:
            kinds = sorted({str(k.value) for k in config_lib.layer_kinds(target.model.model_cfg)} - {"A"})
            self.check(not kinds, "context_window", f"0 on a target with recurrent layers {kinds} (context "
                       "scoring rewinds the target's KV cache, which a recurrent state cannot do)")
        pool = search_pool(n_layers)
        initial = config_lib.validate_skip_layers(target.model.model_cfg, self.skip_layers)
        num_skip = len(initial) or int(round(self.skip_ratio * n_layers))
        if not initial:
            self.check(1 <= num_skip <= int(pool.sum()), "skip_ratio",
                       f"a ratio that skips 1 to {int(pool.sum())} of the model's {n_layers} layers (the first and "
                       f"last always run); it skips {num_skip}")
        skip = np.zeros(n_layers, bool)
        skip[list(initial)] = True
        tree = self.token_tree()
        policy = SkipSearchPolicy(tuple(pool.tolist()), num_skip, tree.max_depth,
                                  tuple(skip.tolist()) if initial else (), self.search_rounds, self.trial_rounds,
                                  self.context_window)
        return build_gated(target, tree, policy, seed=self.search_seed)
