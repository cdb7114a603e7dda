"""Hydra heads (Ankner et al., 2024): Medusa heads made sequentially dependent. A node at depth d of the tree is
drafted by head d-1 from the target's last hidden state and the embeddings of its path's tokens (the root, then
its ancestors' drafts); its siblings take the next-best tokens of the same head. Trained by `python -m
launch.train --config=configs/hydra.py` on a self-distillation set; the LM head is the target's own, restricted
to the draft vocabulary the run saved (`models.eagle.target_side`, as the EAGLE drafter reads it).

With `expand` > 0 the tree is EAGLE-2's dynamic tree (`jaxspec.decoding.dynamic_tree`): the children of a node
at depth d are scored by head d over the node's path, and the best-scoring paths are kept per row and round.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding import methods
from jaxspec.decoding.drafters import (
    Context,
    Proposal,
    check_breadth_first,
    children_tokens,
    sibling_ranks,
    to_target_vocab,
)
from jaxspec.decoding.dynamic_tree import DynamicTree, check_drafter_tree, grow, paths_to_newest
from jaxspec.decoding.method import DynamicTreeDrafting, Target, check_vocab_ids, restore_drafter_run
from jaxspec.decoding.trees import TokenTree
from jaxspec.errors import InputError
from jaxspec.models.eagle import target_side
from jaxspec.models.hydra import HydraHeads, check_params
from jaxspec.models.layers import matmul_t


def path_to(tree: TokenTree, node: int) -> np.ndarray:
    """The nodes from the root down to `node` (inclusive), root first: ancestors come before their descendants
    in a topological order, so the ancestor mask's row lists them in path order."""
    return np.flatnonzero(tree.ancestor_mask[node])


@dataclasses.dataclass(frozen=True)
class HydraDrafter:
    """Drafts a static tree depth by depth. Params: {"heads", "embedding", "head_t", "vocab_ids", ...}
    (`models.eagle.target_side` plus the trained heads)."""

    heads: HydraHeads
    tree: TokenTree  # the static tree; with `dynamic`, only its node count (dynamic.nodes + 1) matters
    dynamic: DynamicTree | None = None

    def __post_init__(self):
        check_breadth_first(self.tree)
        check_drafter_tree(self.tree, self.dynamic, self.heads.num_heads, "Hydra")

    def init(self, params, prompts, prompt_lens, max_len, first_token):
        return ()

    def _features(self, params, hidden, path_tokens):
        """The head for paths of this length over each path: hidden [B, d], path_tokens [B, P, L] (root first)
        -> features [B, P, d]."""
        path_embeddings = jnp.take(params["embedding"], path_tokens, axis=0)  # [B, P, L, dm]
        per_path = jnp.broadcast_to(hidden[:, None], (*path_tokens.shape[:2], hidden.shape[-1]))
        return self.heads.apply({"params": params["heads"]}, per_path, path_embeddings, method=HydraHeads.head)

    def propose(self, params, dstate, ctx: Context) -> Proposal:
        if self.dynamic is not None:
            hidden = ctx.target_hidden.astype(jnp.float32)

            def score_children(carry, pool_tokens, pool_parents):
                m = 1 if pool_tokens.shape[1] == 1 else self.dynamic.expand
                feats = self._features(params, hidden, paths_to_newest(pool_tokens, pool_parents, m))
                return jax.nn.log_softmax(matmul_t(feats, params["head_t"]), axis=-1), carry

            tokens, parents = grow(self.dynamic, score_children, (), ctx.root, params["vocab_ids"])
            return Proposal(tokens, None, None, dstate, parents)
        return self._static_tree(params, dstate, ctx)

    def _static_tree(self, params, dstate, ctx: Context) -> Proposal:
        tree = self.tree
        b, k = ctx.root.shape[0], tree.num_nodes
        hidden = ctx.target_hidden.astype(jnp.float32)
        tokens = jnp.zeros((b, k), jnp.int32).at[:, 0].set(ctx.root.astype(jnp.int32))
        vocab = params["embedding"].shape[0]
        draft_probs = None if ctx.temperature == 0 else jnp.zeros((b, k, vocab), jnp.float32)
        depths, parents, ranks = tree.depths, tree.parents_array, sibling_ranks(tree)
        widest = int(ranks.max()) + 1
        keys = jax.random.split(ctx.key, tree.max_depth + 1)
        for d in range(1, tree.max_depth + 1):
            nodes = np.flatnonzero(depths == d)
            # Siblings share their parent's head output: run the head once per parent of this depth.
            heads_at, parent_of_node = np.unique(parents[nodes], return_inverse=True)
            paths = np.stack([path_to(tree, p) for p in heads_at])  # [P, d]: root .. parent
            feats = self._features(params, hidden, tokens[:, paths])
            logits = matmul_t(feats, params["head_t"])[:, parent_of_node]  # [B, n, N]: the draft vocabulary
            picked, probs = children_tokens(keys[d], logits, ranks[nodes], ctx.temperature, widest)
            drafts, probs = to_target_vocab(picked, probs, params["vocab_ids"], vocab)
            tokens = tokens.at[:, nodes].set(drafts)
            if probs is not None:  # over the whole vocabulary (0 outside the draft vocabulary)
                draft_probs = draft_probs.at[:, nodes].set(probs)
        return Proposal(tokens, draft_probs, None, dstate)

    def update(self, dstate, emitted, num_emitted):
        return dstate


def load_heads(workdir: str, target: Target) -> tuple[HydraHeads, dict, np.ndarray]:
    """(heads, their params, draft vocabulary) of a Hydra training run, refused when trained for another
    target."""
    params, cfg, vocab = restore_drafter_run(workdir, target, "hydra", "a Hydra heads", with_vocab=True)
    h = cfg.hydra
    return HydraHeads(h.num_heads, cfg.model.d_model, h.num_layers), params, vocab


@methods.register
@dataclasses.dataclass(frozen=True)
class Hydra(DynamicTreeDrafting):
    """`draft_workdir`: a Hydra heads training run for this target (or pass `heads`, `heads_params` and, for
    heads trained on a draft vocabulary, `vocab_ids`). `expand` > 0 drafts EAGLE-2's dynamic tree (depth at most
    the number of heads) in place of the static `tree`."""

    name = "hydra"
    needs = "trained Hydra heads"
    objects = ("heads", "heads_params", "vocab_ids")
    default_tree = "medusa_small"
    draft_workdir: str = ""

    def build(self, target: Target, heads: HydraHeads | None = None, heads_params=None, vocab_ids=None):
        if heads is None and heads_params is None:
            if not self.draft_workdir:
                raise InputError("method 'hydra' needs trained heads: draft_workdir (--draft_workdir, a Hydra heads "
                                 "run), or heads and heads_params")
            heads, heads_params, vocab_ids = load_heads(self.draft_workdir, target)
        if heads is None or heads_params is None:
            raise InputError("method 'hydra' needs both heads and heads_params")
        cfg = target.model.model_cfg
        if heads.d_model != cfg.d_model:
            raise InputError(f"Hydra heads were built for d_model={heads.d_model}; the target has d_model="
                             f"{cfg.d_model}: heads trained for another target")
        check_params(heads, heads_params)
        vocab_ids = check_vocab_ids(vocab_ids, cfg.vocab_size)
        dparams = {"heads": heads_params, **target_side(target.params, cfg, vocab_ids)}
        return HydraDrafter(heads, self.token_tree(), self.dynamic), dparams
