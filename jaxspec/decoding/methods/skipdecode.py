"""SkipDecode-style early exit (lossy): the token at position p runs only the first exit(p) layers, and its logits
come from the residual stream there (final norm, then the LM head, as `DecoderLM.exit_logits`); the layers above
do not run for it. The exit falls linearly with the position:

    exit(p) = max_exit for p <= decay_start, min_exit for p >= decay_end, linear (rounded) in between.

Exits only decrease along a row, which is what keeps the KV cache exact without refilling anything: a token that
runs layer i attends there only to earlier tokens, whose exits are at least its own, so every one of them ran
layer i on the same inputs the full model gives it. By induction a token's hidden state at its exit is the full
target's residual stream after layer exit(p) - the output is the target's own early-exit readout at the
scheduled layers (tests/decoding/test_early_exit.py decodes that reference from full forwards). The skipped
layers' cache entries of a token are left undefined, and no later token reads them.

The schedule is a function of the position, so every row keeps its own exits and rows stay independent; a
layer runs for a forward when any row's token needs it (`DecoderLM`'s `layer_gate`, a lax.cond per layer), so
rows at the same positions (one row, or prompts of one length) skip layers uniformly, as SkipDecode's
batch-uniform exits do. Prompt tokens follow the same rule in the prefill.

SkipDecode itself (Del Corro et al., 2023) fine-tunes the model and bypasses lower layers instead of exiting
early; this mode changes nothing in the target's weights, so its output drifts from the target's as the exit
falls. `lossless = False`: refused under `require_lossless`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.decoding import methods
from jaxspec.decoding.method import LossyMode, Target, is_int
from jaxspec.errors import InputError
from jaxspec.models.lm import ChangedModel


@dataclasses.dataclass(frozen=True)
class ExitSchedule:
    """Layers run by the token at each position: max_exit up to decay_start, falling linearly to min_exit at
    decay_end, min_exit after (see the module docstring)."""

    max_exit: int
    min_exit: int
    decay_start: int
    decay_end: int

    def __post_init__(self):
        if not 1 <= self.min_exit <= self.max_exit:
            raise InputError(f"exit schedule: need 1 <= min_exit <= max_exit, got min_exit={self.min_exit}, "
                             f"max_exit={self.max_exit}")
        if not 0 <= self.decay_start < self.decay_end:
            raise InputError(f"exit schedule: need 0 <= decay_start < decay_end, got decay_start="
                             f"{self.decay_start}, decay_end={self.decay_end}")

    def exits(self, positions):
        """Layers run by tokens at `positions` (int array, any shape): non-increasing in the position."""
        share = jnp.clip((positions - self.decay_start) / (self.decay_end - self.decay_start), 0.0, 1.0)
        return jnp.round(self.max_exit - share * (self.max_exit - self.min_exit)).astype(jnp.int32)

    def layer_gate(self, positions, n_layers: int):
        """[..., n_layers] bool: layer i runs for the token at a position when i < its exit."""
        return jnp.arange(n_layers) < self.exits(positions)[..., None]


@dataclasses.dataclass(frozen=True)
class ScheduledExit(ChangedModel):
    """The target with each new token's layers gated by `schedule` at its position."""

    schedule: ExitSchedule | None = None

    def apply(self, variables, tokens, *, state=None, **kwargs):
        if "layer_gate" in kwargs:
            raise InputError("layer_gate is set by this model's exit schedule; do not pass it")
        b, t = tokens.shape
        first = 0 if state is None else state.lengths[:, None]  # a forward's new tokens follow the committed ones
        positions = jnp.broadcast_to(first + jnp.arange(t), (b, t))
        gate = self.schedule.layer_gate(positions, self.model_cfg.n_layers)
        return self.model.apply(variables, tokens, state=state, layer_gate=gate, **kwargs)


@methods.register
@dataclasses.dataclass(frozen=True)
class SkipDecode(LossyMode):
    """`max_exit` (0: every layer) at positions up to `decay_start`, falling linearly to `min_exit` (0: half the
    layers) at `decay_end` (0: the model's max_len) and beyond."""

    name = "skipdecode"
    max_exit: int = 0
    min_exit: int = 0
    decay_start: int = 0
    decay_end: int = 0

    def __post_init__(self):
        for field in ("max_exit", "min_exit", "decay_start", "decay_end"):
            self.check(is_int(getattr(self, field)) and getattr(self, field) >= 0, field,
                       "a non-negative integer (0: the default, see the method's docstring)")

    def schedule(self, model_cfg) -> ExitSchedule:
        n = model_cfg.n_layers
        max_exit, min_exit = self.max_exit or n, self.min_exit or max(1, n // 2)
        self.check(max_exit <= n, "max_exit", f"at most n_layers={n}")
        self.check(min_exit <= max_exit, "min_exit", f"at most max_exit={max_exit}")
        decay_end = self.decay_end or model_cfg.max_len
        self.check(decay_end > self.decay_start, "decay_end", f"a position after decay_start={self.decay_start}")
        return ExitSchedule(max_exit, min_exit, self.decay_start, decay_end)

    def decoder(self, target: Target):
        return ScheduledExit(target.model, self.schedule(target.model.model_cfg)), target.params
