"""Hydra draft heads (Ankner et al., 2024): sequentially dependent Medusa heads.

Head k (k = 0..K-1) reads the target's final hidden state h_t and the embeddings of the tokens already drafted
before it on its path, x_{t+1} .. x_{t+k+1} (x_{t+1} is the tree's root, the token the target emitted), and
guesses x_{t+k+2}:

    input_k = [h_t; E(x_{t+1}); ...; E(x_{t+k+1})]      ((k + 2) * d_model)
    f_k = blocks_k(W_k input_k)                           (a projection to d_model, then residual SiLU blocks)
    logits_k = f_k @ head^T                               (the target's frozen LM head, optionally restricted
                                                           to a draft vocabulary: models.eagle.target_side)

The heads return the features f_k; whoever holds the (trimmed) LM head turns them into logits, so training and
drafting share one vocabulary mechanism with the EAGLE drafter. E is the target's frozen token embedding.

    heads = HydraHeads(num_heads=4, d_model=576)
    feats = heads.apply({"params": p}, hidden, path_embeddings)            # [B, T, K, d]: every head (training)
    feat = heads.apply({"params": p}, hidden, path_embeddings[..., :k + 1, :], method=HydraHeads.head)  # head k
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxspec.errors import InputError


def _hidden_passthrough(key, shape, dtype=jnp.float32):
    """A projection kernel [(k + 2) * d, d] that starts by passing h_t through (identity on its block, zeros on
    the embeddings'): each head starts as the target's own next-token head, as zero-initialised Medusa heads do."""
    del key
    d = shape[1]
    return jnp.zeros(shape, dtype).at[:d].set(jnp.eye(d, dtype=dtype))


class HydraHeads(nn.Module):
    num_heads: int
    d_model: int
    num_layers: int = 1  # residual SiLU blocks per head, after its input projection

    def setup(self):
        self.projections = [nn.Dense(self.d_model, kernel_init=_hidden_passthrough) for _ in range(self.num_heads)]
        # Zero-initialised residual blocks, as Medusa's: they start as the identity.
        self.blocks = [[nn.Dense(self.d_model, kernel_init=nn.initializers.zeros) for _ in range(self.num_layers)]
                       for _ in range(self.num_heads)]

    def head(self, hidden, path_embeddings):
        """Head k = path length - 1: hidden [..., d] and path_embeddings [..., k + 1, d] (the embeddings of
        x_{t+1} .. x_{t+k+1}) -> its feature [..., d], whose LM-head logits guess x_{t+k+2}."""
        k = path_embeddings.shape[-2] - 1
        if hidden.shape[-1] != self.d_model or path_embeddings.shape[-1] != self.d_model:
            raise InputError(f"HydraHeads(d_model={self.d_model}): hidden {hidden.shape} and path embeddings "
                             f"{path_embeddings.shape} must end in d_model={self.d_model}")
        if not 0 <= k < self.num_heads:
            raise InputError(f"HydraHeads(num_heads={self.num_heads}): a path of {k + 1} embeddings asks for head {k}")
        flat = path_embeddings.reshape(*path_embeddings.shape[:-2], -1)
        x = self.projections[k](jnp.concatenate([hidden.astype(jnp.float32), flat.astype(jnp.float32)], axis=-1))
        for block in self.blocks[k]:
            x = x + jax.nn.silu(block(x))
        return x

    def __call__(self, hidden, path_embeddings):
        """Every head at once (teacher forcing): hidden [B, T, d], path_embeddings [B, T, K, d] (the embeddings
        of x_{t+1} .. x_{t+K}) -> features [B, T, K, d]; head k reads the first k + 1 embeddings."""
        if path_embeddings.shape[-2] != self.num_heads:
            raise InputError(f"HydraHeads(num_heads={self.num_heads}) needs path embeddings [..., {self.num_heads}, "
                             f"d], got {path_embeddings.shape}")
        return jnp.stack([self.head(hidden, path_embeddings[..., :k + 1, :]) for k in range(self.num_heads)],
                         axis=-2)


def check_params(heads: HydraHeads, params) -> None:
    """Refuse params not made for `heads` (another d_model, head count or depth), naming the first mismatch."""
    d = heads.d_model
    want = jax.eval_shape(lambda: heads.init(jax.random.key(0), jnp.zeros((1, 1, d)),
                                             jnp.zeros((1, 1, heads.num_heads, d)))["params"])
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(want).items()}
    got = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            raise InputError(f"Hydra heads params: {name} has shape {got.get(name)}; HydraHeads(num_heads="
                             f"{heads.num_heads}, d_model={d}, num_layers={heads.num_layers}) needs {want.get(name)}")
