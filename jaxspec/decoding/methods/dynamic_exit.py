"""DEL (Zarch et al., 2024, "Context-Aware Dynamic Exit Layer for Efficient Self-Speculative Decoding"): the
target's first E layers draft over the target's own cache, and each round the exit E and the draft length are
the pair with the most expected tokens per unit cost under acceptance rates measured while decoding
(`gated_draft.ExitPolicy`). Lossless: the full target verifies every draft. (`del` is a Python keyword, hence the
file name.)
"""

from __future__ import annotations

import dataclasses

from jaxspec.decoding import methods
from jaxspec.decoding.gated_draft import MEASURED_VERIFY_COSTS, ExitPolicy, build_gated, nodes_within
from jaxspec.decoding.method import Speculative, Target
from jaxspec.errors import InputError


def default_exits(n_layers: int) -> tuple[int, ...]:
    """Exits at 1/2, 5/8, 3/4 and 7/8 of the depth (distinct, each in [1, n_layers - 1])."""
    return tuple(sorted({max(1, min(n_layers - 1, round(f * n_layers))) for f in (0.5, 0.625, 0.75, 0.875)}))


def as_numbers(values, kind: type) -> tuple | None:
    """A tuple of `kind` from numbers or from strings (a command-line list); None when one is neither."""
    try:
        parsed = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        return None
    exact = all(isinstance(v, str) or kind(v) == v for v in values)
    return parsed if exact and not any(isinstance(v, bool) for v in values) else None


@methods.register
@dataclasses.dataclass(frozen=True)
class DynamicExit(Speculative):
    """`exit_layers`: the candidate exits E (the draft runs layers 0..E-1), each in [1, n_layers]; () takes
    `default_exits`. `decay`: how much of an exit's acceptance statistics a round keeps. `verify_costs`: a
    verification over K = 1, 2, 4, ... nodes in autoregressive steps; () takes the measured SmolLM2 figures.
    The tree's depth is the longest draft; the draft length is chosen per round and row within it."""

    name = "del"
    default_tree = "chain:4"
    exit_layers: tuple = ()
    decay: float = 0.9
    verify_costs: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        exits = as_numbers(self.exit_layers, int)
        self.check(exits is not None and all(e >= 1 for e in exits), "exit_layers",
                   "layer counts >= 1 (the draft runs the layers below its exit; empty: the default exits)")
        object.__setattr__(self, "exit_layers", tuple(sorted(set(exits))))
        costs = as_numbers(self.verify_costs, float)
        self.check(costs is not None and all(c > 0 for c in costs), "verify_costs",
                   "positive costs of verifying 1, 2, 4, ... nodes, in autoregressive steps (empty: measured)")
        object.__setattr__(self, "verify_costs", costs)
        self.check(isinstance(self.decay, (int, float)) and 0 < self.decay < 1, "decay", "a number in (0, 1)")

    def exits(self, n_layers: int) -> tuple[int, ...]:
        exits = self.exit_layers or default_exits(n_layers)
        self.check(all(e <= n_layers for e in exits), "exit_layers",
                   f"exits in [1, {n_layers}] for a model of n_layers={n_layers}")
        return exits

    def build(self, target: Target, **objects):
        n_layers = target.model.model_cfg.n_layers
        if n_layers < 2 and not self.exit_layers:
            raise InputError(f"method 'del' needs layers to exit after; the model has only n_layers={n_layers}")
        tree = self.token_tree()
        policy = ExitPolicy(n_layers, self.exits(n_layers), tuple(int(n) for n in nodes_within(tree)),
                            self.verify_costs or MEASURED_VERIFY_COSTS, float(self.decay))
        return build_gated(target, tree, policy)
