"""EAGLE-2's dynamic tree (`dynamic_tree.grow`) equals a plain Python beam search over the same draft scores, and
`paths_to_newest` reads each newest node's path from the pool's parents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding.dynamic_tree import DynamicTree, grow, paths_to_newest
from jaxspec.errors import InputError

VOCAB = 7  # draft-vocabulary rows
TARGET_IDS = np.asarray([3, 10, 11, 20, 2, 5, 8])  # the target id of each row


def scores_table(seed: int, rows: int, depth: int) -> np.ndarray:
    """log-probabilities [B, depth, V_target, N]: a child's score depends on its row, its depth and its parent's
    token, so different paths to the same depth get different children."""
    logits = np.random.default_rng(seed).normal(size=(rows, depth, 21, VOCAB)) * 2
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def reference(table: np.ndarray, row: int, root: int, dynamic: DynamicTree) -> set[tuple[int, ...]]:
    """The chosen drafts as token paths: per level, the `expand` best children of the last level's nodes by summed
    score; then the `nodes` best of the pool."""
    level, pool = [((root,), 0.0)], []
    for d in range(dynamic.depth):
        candidates = []
        for path, score in level:
            logp = table[row, d, path[-1]]
            candidates += [(path + (int(TARGET_IDS[i]),), score + logp[i])
                           for i in np.argsort(-logp, kind="stable")[:dynamic.expand]]
        level = sorted(candidates, key=lambda c: -c[1])[:dynamic.expand]
        pool += level
    return {path[1:] for path, _ in sorted(pool, key=lambda c: -c[1])[:dynamic.nodes]}


@pytest.mark.parametrize("expand,depth,nodes", [(1, 3, 3), (2, 3, 5), (3, 4, 9), (3, 2, 6)])
def test_grow_equals_a_python_beam_search(tree_paths, expand, depth, nodes):
    dynamic = DynamicTree(expand, depth, nodes)
    roots = np.asarray([4, 17, 0])
    table = jnp.asarray(scores_table(expand * 10 + depth, len(roots), depth))
    seen_depths = []

    def score_children(calls, pool_tokens, pool_parents):
        m = 1 if pool_tokens.shape[1] == 1 else expand
        newest = pool_tokens[:, -m:]  # [B, m]; depth of the newest level = calls
        seen_depths.append(paths_to_newest(pool_tokens, pool_parents, m).shape[-1] - 1)
        return table[jnp.arange(len(roots))[:, None], calls, newest], calls + 1

    tokens, parents = jax.jit(lambda r: grow(dynamic, score_children, 0, r, jnp.asarray(TARGET_IDS)))(
        jnp.asarray(roots))
    assert seen_depths == list(range(depth))
    assert tokens.shape == parents.shape == (len(roots), nodes + 1)
    for row, root in enumerate(roots):
        tok, par = np.asarray(tokens[row]), np.asarray(parents[row])
        assert tok[0] == root and par[0] == -1 and all(0 <= par[i] < i for i in range(1, nodes + 1))
        got = set(tree_paths(tok, par))
        assert len(got) == nodes and got == reference(np.asarray(table), row, int(root), dynamic)


def test_paths_to_newest_follows_the_parents():
    # Pool: root 9; level 1: 4, 5 (children of the root); level 2: 6 (child of 5), 7 (child of 4).
    pool_tokens = jnp.asarray([[9, 4, 5, 6, 7]])
    pool_parents = jnp.asarray([[-1, 0, 0, 2, 1]])
    assert paths_to_newest(pool_tokens, pool_parents, 2).tolist() == [[[9, 5, 6], [9, 4, 7]]]
    assert paths_to_newest(pool_tokens[:, :3], pool_parents[:, :3], 2).tolist() == [[[9, 4], [9, 5]]]
    assert paths_to_newest(pool_tokens[:, :1], pool_parents[:, :1], 1).tolist() == [[[9]]]


def test_impossible_trees_are_refused():
    with pytest.raises(InputError, match="nodes <= expand \\* depth; got expand=2, depth=2, nodes=5"):
        DynamicTree(2, 2, 5)
    with pytest.raises(InputError, match="expand >= 1"):
        DynamicTree(0, 2, 1)
