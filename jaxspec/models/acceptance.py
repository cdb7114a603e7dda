"""SpecDec++'s acceptance predictor: how likely the target accepts the token a drafter proposes.

At a draft position the drafter has its final hidden state h (after the final norm) and its next-token
logits; the head maps [h; log of the top probability; entropy] (logistic regression, or a small SiLU MLP) to
the logit of the probability that the drafter's top token is the one the target takes there, given that every
earlier token was. A drafter stops a branch once the probability of at least one rejection along it,
1 - prod(p_accept), passes a threshold (`drafters.ModelDrafter`, `stop_threshold`); the head is trained on a
self-distillation set by `jaxspec.training.acceptance`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_EXTRA_FEATURES = 2  # log top probability, entropy


def acceptance_features(hidden, logits):
    """[..., d + 2]: the drafter's hidden state with two summaries of its next-token distribution."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top = jnp.max(logp, axis=-1, keepdims=True)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1, keepdims=True)
    return jnp.concatenate([hidden.astype(jnp.float32), top, entropy], axis=-1)


class AcceptanceHead(nn.Module):
    """features [..., d + 2] -> logit [...] of the acceptance probability: a SiLU MLP of `hidden` units, or
    logistic regression on the features (hidden = 0)."""

    hidden: int = 0

    @nn.compact
    def __call__(self, features):
        h = features if self.hidden == 0 else jax.nn.silu(nn.Dense(self.hidden, name="hidden")(features))
        return nn.Dense(1, name="out")(h)[..., 0]
