"""Medusa draft heads: head k reads the target's final hidden state at position t and predicts token t+k+2
(the LM head itself predicts t+1). Each head is a residual SiLU block followed by a projection to the
vocabulary; the projection is the head's own or, with `share_lm_head`, the target's LM head.

The heads score `vocab_size` ids: the target's whole vocabulary, or a draft vocabulary of its most frequent
reply tokens (VocabTrim; `medusa.draft_vocab`), whose rows the decoder maps back to target ids. Shared heads
then read the target's LM head restricted to those rows.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspec.errors import InputError


class MedusaHeads(nn.Module):
    num_heads: int
    d_model: int
    vocab_size: int  # ids scored: the target's vocabulary, or the size of a draft vocabulary of it
    num_layers: int = 1  # residual blocks per head
    share_lm_head: bool = False

    @nn.compact
    def __call__(self, hidden, lm_head_kernel=None):
        """hidden [B, T, d_model] -> logits [B, T, num_heads, vocab_size]. lm_head_kernel [d_model, vocab_size]
        when shared (the target's LM head, or its columns of the draft vocabulary)."""
        if self.share_lm_head and lm_head_kernel is None:
            raise InputError("MedusaHeads(share_lm_head=True) needs the target's lm_head_kernel [d_model, vocab]")
        if self.share_lm_head and lm_head_kernel.shape != (self.d_model, self.vocab_size):
            raise InputError(f"MedusaHeads(d_model={self.d_model}, vocab_size={self.vocab_size}) got an "
                             f"lm_head_kernel of shape {lm_head_kernel.shape}; it needs "
                             f"[{self.d_model}, {self.vocab_size}]")
        outs = []
        for k in range(self.num_heads):
            h = hidden.astype(jnp.float32)
            for layer in range(self.num_layers):
                # Zero-initialised residual blocks: each head starts as the target's own next-token head.
                block = nn.Dense(self.d_model, kernel_init=nn.initializers.zeros, name=f"head_{k}_block_{layer}")
                h = h + jax.nn.silu(block(h))
            if self.share_lm_head:
                outs.append(h @ lm_head_kernel.astype(jnp.float32))
            else:
                outs.append(nn.Dense(self.vocab_size, use_bias=False, name=f"head_{k}_out")(h))
        return jnp.stack(outs, axis=2)


def lm_head_kernel(target_params, model_cfg):
    """The target's [d_model, V] output projection (the tied embedding's transpose when tied), float32, from
    standard or decode-layout params (int8 ones dequantised)."""
    entry = target_params["embed"] if model_cfg.tie_embeddings else target_params["lm_head"]
    if "kernel" in entry:  # untied, standard layout
        return entry["kernel"]
    weight = entry["embedding"] if model_cfg.tie_embeddings else entry["kernel_t"]  # [V, d_model]
    if "scale" in entry:
        weight = weight.astype(jnp.float32) * entry["scale"][:, None]
    return weight.T
