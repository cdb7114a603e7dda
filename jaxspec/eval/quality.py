"""Quality figures of a lossy decoding mode's output, against autoregressive decoding of the same target.

    agreement_with(tokens, ar_tokens)          # share of AR's tokens reproduced before the first difference
    mean_log_likelihood(model, params, prompts, outputs)   # the target's mean log-probability per output token

Greedy agreement is strict (one changed argmax ends it); the log-likelihood says how plausible the target finds
the output even where it is not its own (AR's own output is the reference value).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def agreement_with(tokens: list[int], reference: list[int]) -> float:
    """The share of `reference` (the autoregressive output) that `tokens` reproduces before their first
    difference (1.0 when identical; a shorter output stops matching where it ends)."""
    if not reference:
        return float(tokens == reference)
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return same / len(reference)


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(model, params, tokens):
    return jax.nn.log_softmax(model.apply({"params": params}, tokens).astype(jnp.float32), axis=-1)


def mean_log_likelihood(model, params, prompts: list[list[int]], outputs: list[list[int]], multiple: int = 64
                        ) -> float:
    """The target's mean log-probability of each output token given its prompt and the output before it
    (teacher-forced, over all outputs together). Each sequence is right-padded to a multiple of `multiple`
    (few compiled shapes; padding changes no earlier position of a causal model)."""
    total, count = 0.0, 0
    for prompt, out in zip(prompts, outputs, strict=True):
        if not out:
            continue
        seq = list(prompt) + list(out)
        logp = np.asarray(_log_probs(model, params, jnp.asarray([seq + [0] * (-len(seq) % multiple)], jnp.int32)))[0]
        total += float(logp[np.arange(len(prompt) - 1, len(seq) - 1), np.asarray(out)].sum())
        count += len(out)
    return total / max(count, 1)
