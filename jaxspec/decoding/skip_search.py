"""Which layers a layer-skip self-draft should skip, chosen by measurement: greedy forward selection on
calibration text (SWIFT asks the same question during decoding; here it is answered once per model).

    path = search_skip_layers(model, params, sequences, starts, num_skip=8)
    best = max(path, key=lambda s: s.predicted_speedup)      # best.skip_layers -> layerskip's skip_layers

`sequences` are token lists (a prompt and the target's own reply to it), `starts[i]` where reply i begins; the
reply positions are scored. At each size the layer whose removal keeps the draft closest to the target joins the
set. Closeness is the chance that a depth-1 draft is accepted: at temperature 0 the fraction of positions where
the draft's argmax is the target's, at temperature > 0 the mean of sum_x min(p, q). Every candidate costs one
full forward over the calibration batch, all through one compiled program (the skip set is a traced
`layer_gate` of the model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding.sampling import warp_logits
from jaxspec.errors import InputError


@dataclasses.dataclass(frozen=True)
class SkipSet:
    skip_layers: tuple[int, ...]
    acceptance: float  # chance that a depth-1 draft is accepted (see the module docstring)
    predicted_speedup: float  # of a chain of `depth` drafts, see `predicted_speedup`


def predicted_speedup(acceptance: float, num_skip: int, n_layers: int, depth: int, verify_cost: float) -> float:
    """Speedup over autoregressive decoding of a chain of `depth` drafts when each is accepted with probability
    `acceptance` independently: tau = (1 - a^(depth+1)) / (1 - a) tokens per round, which costs `depth` draft
    forwards of (n_layers - num_skip) / n_layers of a target step plus one verification of `verify_cost` steps."""
    a = min(max(acceptance, 0.0), 1.0)
    tau = depth + 1.0 if a == 1.0 else (1.0 - a ** (depth + 1)) / (1.0 - a)
    return tau / (depth * (n_layers - num_skip) / n_layers + verify_cost)


def _calibration_batch(sequences: Sequence[Sequence[int]], starts: Sequence[int]):
    """Right-padded tokens [N, T] and the scored positions [N, T] (those that predict a reply token)."""
    if len(sequences) != len(starts) or not sequences:
        raise InputError(f"{len(sequences)} sequences and {len(starts)} starts: one reply start per sequence")
    width = max(map(len, sequences))
    tokens = np.zeros((len(sequences), width), np.int32)
    scored = np.zeros((len(sequences), width), bool)
    for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        if not 1 <= start < len(seq):
            raise InputError(f"sequence {i}: reply start {start} must lie in [1, {len(seq)}) (a prompt, then a reply)")
        tokens[i, :len(seq)] = seq
        scored[i, start - 1:len(seq) - 1] = True
    return jnp.asarray(tokens), jnp.asarray(scored)


def acceptance_scorer(model, params, sequences, starts, temperature: float = 0.0) -> Callable[[np.ndarray], float]:
    """`score(gate [n_layers] bool) -> acceptance` of the model with the gated-off layers skipped, as a draft for
    the whole model on the calibration batch (one compiled forward for every gate)."""
    tokens, scored = _calibration_batch(sequences, starts)
    weight = scored.astype(jnp.float32) / jnp.sum(scored)
    target = model.apply({"params": params}, tokens)
    # What the draft is compared with, an argument of the compiled scorer (a closed-over constant would be
    # folded by XLA at compile time, slowly).
    reference = jnp.argmax(target, -1) if temperature == 0 else warp_logits(target, temperature)

    @jax.jit
    def score(p, gate, reference):
        draft = model.apply({"params": p}, tokens, layer_gate=gate)
        if temperature == 0:
            return jnp.sum(weight * (jnp.argmax(draft, -1) == reference))
        return jnp.sum(weight * jnp.minimum(reference, warp_logits(draft, temperature)).sum(-1))

    return lambda gate: float(score(params, jnp.asarray(gate, bool), reference))


def search_skip_layers(model, params, sequences, starts, num_skip: int, *, temperature: float = 0.0,
                       candidates: Sequence[int] | None = None, depth: int = 3, verify_cost: float = 1.4,
                       on_step: Callable[[SkipSet], None] | None = None) -> list[SkipSet]:
    """The greedy path: for sizes 1..num_skip, the skip set grown by the layer that keeps acceptance highest.
    `candidates` (default: every layer but the last) are the layers that may be skipped; `depth` and
    `verify_cost` (a verification's cost in autoregressive steps, measured by benchmarks/step_cost.py) only
    set each entry's predicted speedup."""
    n_layers = model.model_cfg.n_layers
    pool = list(range(n_layers - 1)) if candidates is None else sorted(set(int(c) for c in candidates))
    if any(not 0 <= c < n_layers for c in pool):
        raise InputError(f"candidates {pool} must be layer indices in [0, {n_layers})")
    if not 1 <= num_skip <= len(pool):
        raise InputError(f"num_skip={num_skip} must be in [1, {len(pool)}] (the candidate layers)")
    score = acceptance_scorer(model, params, sequences, starts, temperature)
    skip: list[int] = []
    path = []
    for size in range(1, num_skip + 1):
        trials = {}
        for layer in (c for c in pool if c not in skip):
            gate = np.ones(n_layers, bool)
            gate[skip + [layer]] = False
            trials[layer] = score(gate)
        best = max(trials, key=trials.get)
        skip.append(best)
        step = SkipSet(tuple(sorted(skip)), trials[best],
                       predicted_speedup(trials[best], size, n_layers, depth, verify_cost))
        path.append(step)
        if on_step is not None:
            on_step(step)
    return path
