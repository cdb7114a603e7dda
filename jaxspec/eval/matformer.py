"""MatFormer sub-models: the held-out loss of any granularity choice (its size is
`jaxspec.models.matformer.submodel_param_count`).

A granularity is one FFN width index for every layer, or one index per layer (Mix'n'Match).

    submodel_loss(model, params, batches, granularity=1, pad_id=tok.pad_id)   # nats per token
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import config as config_lib
from jaxspec.errors import InputError

# Weights of a SwiGLU FFN: each holds d_model values per hidden unit.
_FFN_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


@functools.partial(jax.jit, static_argnames=("model", "granularity", "pad_id"))
def _loss_sums(model, params, inputs, targets, *, granularity, pad_id):
    logits = model.apply({"params": params}, inputs, granularity=granularity)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = targets != pad_id
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)


def submodel_loss(model, params, batches: Iterable[Mapping[str, np.ndarray]], *, granularity=None,
                  pad_id: int) -> float:
    """Mean cross-entropy (nats per token) of a sub-model over `batches` of {"inputs", "targets"}."""
    per_layer = config_lib.validate_granularity(model.model_cfg, granularity)
    total, tokens = 0.0, 0
    for batch in batches:
        inputs, targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])
        loss_sum, count = _loss_sums(model, params, inputs, targets, granularity=per_layer, pad_id=pad_id)
        total, tokens = total + float(loss_sum), tokens + int(count)
    if tokens == 0:
        raise InputError("submodel_loss saw no target tokens (no batches, or every target is padding)")
    return total / tokens
