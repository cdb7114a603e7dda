"""EAGLE-2's dynamic draft tree (Li et al., 2024), for any drafter that can score the children of a set of nodes.

Each round, per row: a beam of the `expand` best nodes per depth by summed draft log-probability, each expanded
by its `expand` best children, down to `depth`; then the `nodes` best drafts of the whole pool. The tree changes
per row and round, so the proposal carries its (traced) parents.

A drafter supplies one function, `score_children(carry, pool_tokens, pool_parents) -> (log_probs, carry)`: given
the pool so far (target ids [B, n] with the root at 0; parents [B, n], -1 for the root), the log-probabilities
over the draft vocabulary [B, m, N] of the children of the pool's newest `m` nodes (m = 1 at the root, then
`expand`); `carry` is the drafter's own (e.g. the guessed features of the pool, EAGLE). Its drafts are
deterministic (no draft distribution): at T > 0 the verifier treats each as a point mass, and recursive
rejection over point masses is lossless (a rejected sibling's token leaves the residual).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxspec.errors import InputError

ScoreChildren = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """The `expand` best nodes of each depth, each expanded by its `expand` best children, down to `depth`; then
    the `nodes` best drafts by summed draft log-probability."""

    expand: int
    depth: int
    nodes: int

    def __post_init__(self):
        if self.expand < 1 or self.depth < 1 or not 1 <= self.nodes <= self.expand * self.depth:
            raise InputError(f"a dynamic tree needs expand >= 1, depth >= 1 and 1 <= nodes <= expand * depth; got "
                             f"expand={self.expand}, depth={self.depth}, nodes={self.nodes}")


def check_drafter_tree(tree, dynamic: DynamicTree | None, heads: int | None = None, what: str = "") -> None:
    """A drafter's trees: with `dynamic`, its static stand-in `tree` has dynamic.nodes + 1 nodes (the proposal's
    width); the depth it drafts (the static tree's or the dynamic one's) needs at most `heads` heads (`what`
    names them in the error), when the drafter has one head per depth."""
    if dynamic is not None and tree.num_nodes != dynamic.nodes + 1:
        raise InputError(f"a dynamic tree of {dynamic.nodes} drafts needs tree.num_nodes = {dynamic.nodes + 1}, "
                         f"got {tree.num_nodes}")
    depth = tree.max_depth if dynamic is None else dynamic.depth
    if heads is not None and depth > heads:
        raise InputError(f"tree depth {depth} needs at least that many {what} heads; the heads have "
                         f"num_heads={heads}")


def grow(dynamic: DynamicTree, score_children: ScoreChildren, carry, root, vocab_ids) -> tuple[jax.Array, jax.Array]:
    """(tokens [B, nodes + 1], parents [B, nodes + 1]) of each row's tree in topological order, the root first.
    `root` [B]: target ids; `vocab_ids` [N]: the target id of each draft-vocabulary row (None: rows are ids)."""
    expand, b = dynamic.expand, root.shape[0]
    rows = jnp.arange(b)[:, None]
    pool_tokens = root[:, None].astype(jnp.int32)
    pool_parents = jnp.full((b, 1), -1, jnp.int32)
    pool_scores = jnp.zeros((b, 1), jnp.float32)
    newest = 0  # the pool index of the newest level's first node
    for _ in range(dynamic.depth):
        log_probs, carry = score_children(carry, pool_tokens, pool_parents)  # [B, m, N]
        m = log_probs.shape[1]
        child_score, child_row = jax.lax.top_k(log_probs, expand)  # [B, m, expand]
        total = (pool_scores[:, newest:, None] + child_score).reshape(b, m * expand)
        score, flat = jax.lax.top_k(total, expand)  # the beam: ties to the earlier parent, then child
        picked = jnp.take_along_axis(child_row.reshape(b, -1), flat, axis=1)
        newest = pool_tokens.shape[1]
        pool_parents = jnp.concatenate([pool_parents, (newest - m + flat // expand).astype(jnp.int32)], 1)
        ids = picked if vocab_ids is None else jnp.take(vocab_ids, picked)
        pool_tokens = jnp.concatenate([pool_tokens, ids.astype(jnp.int32)], 1)
        pool_scores = jnp.concatenate([pool_scores, score], 1)
    # The best `nodes` drafts (ties to the earlier node): a child never scores above its parent, so the set holds
    # every chosen node's ancestors; kept in pool order, which is topological.
    _, best = jax.lax.top_k(pool_scores[:, 1:], dynamic.nodes)
    chosen = jnp.sort(best, axis=1) + 1  # [B, nodes] pool indices
    new_index = jnp.zeros_like(pool_parents).at[rows, chosen].set(
        jnp.arange(1, dynamic.nodes + 1, dtype=jnp.int32)[None])
    tokens = jnp.concatenate([pool_tokens[:, :1], pool_tokens[rows, chosen]], 1)
    parents = jnp.concatenate([pool_parents[:, :1], new_index[rows, pool_parents[rows, chosen]]], 1)
    return tokens, parents


def paths_to_newest(pool_tokens, pool_parents, m: int) -> jax.Array:
    """[B, m, L + 1]: the tokens from the root down to each of the pool's newest `m` nodes, which all sit at depth
    L = (pool size - 1) / m (0: the root alone)."""
    b, n = pool_tokens.shape
    rows = jnp.arange(b)[:, None]
    depth = (n - 1) // m
    node = jnp.broadcast_to(jnp.arange(n - m, n, dtype=jnp.int32), (b, m))
    path = [pool_tokens[rows, node]]
    for _ in range(depth):
        node = pool_parents[rows, node]
        path.append(pool_tokens[rows, node])
    return jnp.stack(path[::-1], axis=-1)
