"""The mixer contract: what `lm.Block` expects of the token mixer of a layer.

One mixer module per `config.MixerKind` (a letter of `model.layer_pattern`):

  kind                         module                             decode state it keeps (state.py)
  MixerKind.ATTENTION          attention.Attention                KVCache(k, v)      [B, Hkv, L, D] each
  MixerKind.LINEAR_ATTENTION   linear_attention.LinearAttention   LinearState(s)     [B, H, dk, dv]
  MixerKind.MAMBA              mamba.Mamba                        MambaState(conv, ssm)
                                                                  [B, d_conv - 1, d_inner], [B, d_inner, d_state]

Attention may instead keep a budgeted HeavyHitterCache(k, v, score, position) [B, Hkv, budget, ...] (DecoderLM's
`kv_budget` option, jaxspec.ops.heavy_hitter): extend evicts to the budget, tree reads it, commit refuses it.

Each takes every `step.Mode`:
  Mode.FULL    no cache in, none out (training, scoring); under a mesh with a "sequence" axis of size > 1 the
               forward is sequence-parallel (LASP-2H for attention, LASP-2 for linear attention and Mamba).
  Mode.EXTEND  cache in, the updated cache out, as if the valid new tokens were appended one by one
               (`step.valid` masks right padding; `step.fresh` promises an empty cache).
  Mode.TREE    cache in and left unchanged; out comes the *pending* state of every node, each computed from
               its ancestors only: attention the nodes' own keys/values (KVCache [B, Hkv, K, D]); linear
               attention and Mamba one recurrent state per node (a K axis after the batch axis). A tree
               with no cache (`lm.context_free_tree_step`, EAGLE training) is attention's alone.

`jaxspec.state.commit(state, path, num_accepted)` turns the pending state into context, per row: a KVCache
has the accepted path's entries gathered and written at the row's length; a LinearState or MambaState is
replaced by the last accepted node's entry (kept as it was where a row accepts nothing). A layer skipped in
the forward leaves None as its pending entry and its state untouched.
"""

from __future__ import annotations

from typing import Protocol

import jax

from jaxspec.models.step import Step
from jaxspec.state import KVCache, LinearState, MambaState

MixerState = KVCache | LinearState | MambaState


class Mixer(Protocol):
    """A layer's token mixer (see the module docstring for the state it keeps and the modes it takes)."""

    def __call__(self, x: jax.Array, step: Step, cache: MixerState | None) -> tuple[jax.Array, MixerState | None]:
        """x [B, T, d_model] (normalised) -> (y [B, T, d_model], new state: None for Mode.FULL, the updated
        cache for Mode.EXTEND, the pending per-node state for Mode.TREE)."""
        ...
