"""Token Recycling (Luo et al., 2024, "Turning Trash into Treasure"): the target's own top-k next tokens,
recorded at every token it has scored, are the drafts (no model, no training).

Each batch row keeps an adjacency matrix [V, k]: row t holds the k tokens the target ranked highest after the
latest scored occurrence of token t (-1 while t has not been scored). The prompt's prefill seeds it and every
verification forward refreshes it: the engine hands the target's top-k at each scored token to `observe`
(the drafter asks for them with `feedback_top_k`). Each round the draft tree is filled breadth-first over a
static template: a node's token is its parent token's successor at the node's sibling rank.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.decoding import methods
from jaxspec.decoding.drafters import Context, Proposal, fill_tree, sibling_ranks
from jaxspec.decoding.method import Speculative, Target
from jaxspec.decoding.trees import TokenTree
from jaxspec.errors import InputError

UNSET = -1  # a matrix entry no forward has written yet


@dataclasses.dataclass(frozen=True)
class RecyclingDrafter:
    """Drafts from the adjacency matrix of the target's top-k successors; the matrix is the drafter state."""

    tree: TokenTree
    vocab_size: int

    def __post_init__(self):
        if self.tree.num_drafts < 1:
            raise InputError("token recycling needs a tree with at least one draft node; got the root alone")
        if self.vocab_size < 1:
            raise InputError(f"token recycling needs vocab_size >= 1, got {self.vocab_size}")

    @property
    def feedback_top_k(self) -> int:
        """Successors kept per token: as many as the widest sibling rank of the tree needs."""
        return int(sibling_ranks(self.tree).max()) + 1

    def init(self, params, prompts, prompt_lens, max_len, first_token):
        return jnp.full((prompts.shape[0], self.vocab_size, self.feedback_top_k), UNSET, jnp.int32)

    def propose(self, params, matrix, ctx: Context) -> Proposal:
        rows = jnp.arange(ctx.root.shape[0])[:, None]
        parents, ranks = self.tree.parents_array, sibling_ranks(self.tree)
        # A node takes its parent token's successor at its sibling rank (UNSET: no draft there).
        tokens, known = fill_tree(self.tree, ctx.root,
                                  lambda tokens, nodes: matrix[rows, tokens[:, parents[nodes]], ranks[nodes]])
        return Proposal(tokens, None, known, matrix)

    def update(self, matrix, emitted, num_emitted):
        return matrix  # the matrix learns from the target's logits (`observe`), not from the emitted tokens

    def observe(self, matrix, tokens, successors, valid):
        """Overwrite the row of each valid token [B, N] with the target's top-k after it (successors
        [B, N, k]). A token met at several positions keeps the last one's successors: the latest in the text,
        or the last in the tree's breadth-first order."""
        if successors.shape[-1] != matrix.shape[-1]:
            raise InputError(f"token recycling keeps {matrix.shape[-1]} successors per token; got top-k "
                             f"successors of shape {successors.shape}")
        n = tokens.shape[1]
        later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]  # later[i, j]: j comes after i
        repeated = (tokens[:, :, None] == tokens[:, None, :]) & valid[:, None, :] & later[None]
        keep = valid & ~repeated.any(axis=-1)
        index = jnp.where(keep, tokens, matrix.shape[1])  # out of range: the write is dropped
        rows = jnp.arange(tokens.shape[0])[:, None]
        return matrix.at[rows, index].set(successors.astype(jnp.int32), mode="drop")


@methods.register
@dataclasses.dataclass(frozen=True)
class TokenRecycling(Speculative):
    """Drafts from the target's recycled top-k successors of each token. `tree` is the static template the
    drafts fill breadth-first (node i takes rank node_rank[i] of its parent token's successors)."""

    name = "recycling"
    default_tree = "branching:2,1,1"  # 7 nodes: the tree that paid best on a 2-core CPU

    def __post_init__(self):
        super().__post_init__()
        self.check(self.token_tree().num_drafts >= 1, "tree", "a tree with at least one draft node")

    def build(self, target: Target, **objects):
        return RecyclingDrafter(self.token_tree(), int(target.model.model_cfg.vocab_size)), ()

