"""Hydra heads: a proposal is the tree each node's head drafts from its path (recomputed node by node), decoding
with them is exactly autoregressive, heads planted to know the target reach tau = depth + 1, and heads for
another target are refused by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.config import ConfigError
from jaxspec.decoding import api, trees
from jaxspec.decoding.drafters import Context
from jaxspec.decoding.dynamic_tree import DynamicTree
from jaxspec.decoding.methods.hydra import HydraDrafter
from jaxspec.errors import InputError
from jaxspec.models.eagle import target_side
from jaxspec.models.hydra import HydraHeads

NUM_HEADS = 3


@pytest.fixture(scope="module")
def target(make_model):
    return make_model("A", seed=5, max_len=64)


def random_heads(d_model: int, seed: int = 0, num_heads: int = NUM_HEADS):
    """Heads with random weights (kernels ~ N(0, 1/fan_in)) in the shapes `init` gives (traced, never compiled):
    away from the initialiser's identity and zeros, every input block and every layer matters."""
    heads = HydraHeads(num_heads, d_model, num_layers=1)
    shapes = jax.eval_shape(lambda: heads.init(jax.random.key(0), jnp.zeros((1, 1, d_model)),
                                               jnp.zeros((1, 1, num_heads, d_model)))["params"])
    rng = np.random.default_rng(seed)
    draw = lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0]), jnp.float32)
    return heads, jax.tree.map(draw, shapes)


def head_reference(params, hidden, path_embeddings) -> np.ndarray:
    """Hydra head k = len(path) - 1 in NumPy: [h; E(x_1); ...] through its projection and residual SiLU block."""
    k = len(path_embeddings) - 1
    silu = lambda x: x / (1 + np.exp(-x))
    p = jax.tree.map(np.asarray, params)
    x = np.concatenate([hidden, *path_embeddings]) @ p[f"projections_{k}"]["kernel"] + p[f"projections_{k}"]["bias"]
    return x + silu(x @ p[f"blocks_{k}_0"]["kernel"] + p[f"blocks_{k}_0"]["bias"])


def reference_tree(params, side, hidden, root, tree) -> list[int]:
    """Each node's token recomputed on its own: head (depth - 1) over [h; E(root); E(its ancestors' tokens)],
    the (rank)-th best draft-vocabulary token of its parent's head output."""
    vocab, embedding = np.asarray(side["vocab_ids"]), np.asarray(side["embedding"])
    tokens, ranks, seen = [int(root)], [0], {}
    for i in range(1, tree.num_nodes):
        p = tree.parents[i]
        ranks.append(seen.get(p, 0))
        seen[p] = ranks[-1] + 1
        path, node = [], p
        while node >= 0:
            path.insert(0, tokens[node])
            node = tree.parents[node]
        logits = np.asarray(side["head_t"]) @ head_reference(params, np.asarray(hidden), embedding[path])
        tokens.append(int(vocab[np.argsort(-logits, kind="stable")[ranks[i]]]))
    return tokens


def test_proposal_is_each_nodes_head_over_its_path(target):
    model, tparams = target
    d = model.model_cfg.d_model
    heads, params = random_heads(d)
    side = target_side(tparams, model.model_cfg, np.arange(1, 64, 2))  # a trimmed draft vocabulary: odd ids
    tree = trees.tree_from_spec("medusa_small")  # three siblings, two below the first, one at depth three
    drafter = HydraDrafter(heads, tree)
    hidden = jax.random.normal(jax.random.key(9), (2, d))
    roots = jnp.asarray([4, 11])
    prop = jax.jit(lambda p, h, r: drafter.propose(p, (), Context(r, None, None, h, jax.random.key(0), 0.0)))(
        {"heads": params, **side}, hidden, roots)
    assert prop.tokens.shape == (2, tree.num_nodes) and prop.draft_probs is None and prop.parents is None
    for row in range(2):
        assert np.asarray(prop.tokens[row]).tolist() == reference_tree(params, side, hidden[row], roots[row], tree)


def dynamic_reference(params, side, hidden, root, dynamic: DynamicTree) -> set[tuple[int, ...]]:
    """EAGLE-2's tree over Hydra heads, node by node: a node's children are scored by head (its depth) over its
    path; per level the `expand` best by summed log-probability, then the `nodes` best of all (token paths)."""
    vocab, embedding, head_t = (np.asarray(side[k]) for k in ("vocab_ids", "embedding", "head_t"))
    level, pool = [((int(root),), 0.0)], []
    for _ in range(dynamic.depth):
        candidates = []
        for path, score in level:
            logits = head_t @ head_reference(params, np.asarray(hidden), embedding[list(path)])
            logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            candidates += [(path + (int(vocab[i]),), score + logp[i])
                           for i in np.argsort(-logp, kind="stable")[:dynamic.expand]]
        level = sorted(candidates, key=lambda c: -c[1])[:dynamic.expand]
        pool += level
    return {path[1:] for path, _ in sorted(pool, key=lambda c: -c[1])[:dynamic.nodes]}


@pytest.mark.parametrize("expand,depth,nodes", [(2, 3, 5), (3, 2, 6)])
def test_dynamic_proposal_is_eagle2s_tree_over_the_heads(target, tree_paths, expand, depth, nodes):
    model, tparams = target
    d = model.model_cfg.d_model
    heads, params = random_heads(d, seed=1)
    side = target_side(tparams, model.model_cfg, np.arange(1, 64, 2))
    dynamic = DynamicTree(expand, depth, nodes)
    drafter = HydraDrafter(heads, trees.chain(nodes), dynamic)
    hidden = jax.random.normal(jax.random.key(8), (2, d))
    roots = jnp.asarray([4, 11])
    prop = jax.jit(lambda p, h, r: drafter.propose(p, (), Context(r, None, None, h, jax.random.key(0), 0.0)))(
        {"heads": params, **side}, hidden, roots)
    assert prop.tokens.shape == prop.parents.shape == (2, nodes + 1) and prop.draft_probs is None
    for row in range(2):
        tokens, parents = np.asarray(prop.tokens[row]), np.asarray(prop.parents[row])
        assert tokens[0] == roots[row] and parents[0] == -1 and all(0 <= parents[i] < i for i in range(1, nodes + 1))
        assert set(tree_paths(tokens, parents)) == dynamic_reference(params, side, hidden[row], roots[row], dynamic)


# One batch of four for the exactness and the planted test: the loop compiles once for both.
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [4, 4, 4, 4, 4, 4], [30, 2, 7]]
NEW_TOKENS = 17  # the longest prompt plus these fit the full-forward references' 24 positions


def greedy_continuations(full_logits, model, params, prompts, n: int) -> list[list[int]]:
    """Autoregressive greedy decoding by full forwards (one compiled shape), independent of the decode loop."""
    sequences = [list(p) for p in prompts]
    for _ in range(n):
        for seq, logits in zip(sequences, full_logits(model, params, sequences), strict=True):
            seq.append(int(np.argmax(logits[-1])))
    return [seq[len(p):] for seq, p in zip(sequences, prompts, strict=True)]


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
@pytest.mark.parametrize("tree", [dict(), dict(expand=2, depth=3, nodes=5)])
def test_decoding_with_hydra_equals_autoregressive(target, full_logits, prompts, tree):
    model, tparams = target
    heads, params = random_heads(model.model_cfg.d_model)
    out = api.generate(model, tparams, prompts, method="hydra", heads=heads, heads_params=params,
                       vocab_ids=np.arange(40), max_new_tokens=NEW_TOKENS, **tree)
    assert out.tokens == greedy_continuations(full_logits, model, tparams, prompts, NEW_TOKENS)


def test_planted_exact_heads_reach_tau_depth_plus_one(make_model, full_logits):
    """A target whose layers add nothing (o_proj and down_proj zero) emits next(x) = argmax head(norm(E x)): a
    fixed function of the last token. Head k planted to pass E(x_{t+k+1}) (its last path token) through the final
    norm's scale guesses next(x_{t+k+1}) = x_{t+k+2} exactly (RMS normalisation only rescales, which keeps the
    argmax), so every draft of the top-1 path is accepted: tau = depth + 1."""
    model, params = make_model("A", seed=4, max_len=64)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if any(getattr(k, "key", "") in ("o_proj", "down_proj") for k in path)
        else x, params)
    # Peaked (the tied head sharpens; the heads' argmax is unchanged): the dynamic tree's best-scoring nodes are
    # then the top-1 path's.
    params["embed"]["embedding"] = params["embed"]["embedding"] * 8.0
    d = model.model_cfg.d_model
    heads, planted = random_heads(d)
    scale = jnp.diag(params["final_norm"]["scale"])
    for k in range(NUM_HEADS):
        kernel = jnp.zeros(((k + 2) * d, d)).at[(k + 1) * d:].set(scale)  # the last path embedding's block
        planted[f"projections_{k}"] = {"kernel": kernel, "bias": jnp.zeros((d,))}
        planted[f"blocks_{k}_0"] = jax.tree.map(jnp.zeros_like, planted[f"blocks_{k}_0"])
    want = greedy_continuations(full_logits, model, params, PROMPTS, NEW_TOKENS)
    # The default tree, medusa_small, and the dynamic one both have depth 3: 4 tokens a round, the 16 after the
    # prefill's in 4 rounds (the dynamic tree keeps the top-1 path: a child never scores above its parent).
    for tree in (dict(), dict(expand=2, depth=3, nodes=4)):
        out = api.generate(model, params, PROMPTS, method="hydra", heads=heads, heads_params=planted,
                           max_new_tokens=NEW_TOKENS, **tree)
        assert out.tokens == want
        assert out.target_steps.tolist() == [4] * 4 and out.accepted.tolist() == [16] * 4, tree


def test_wrong_heads_and_requests_are_refused(target):
    model, tparams = target
    d = model.model_cfg.d_model
    heads, params = random_heads(d)
    with pytest.raises(InputError, match="draft_workdir"):
        api.generate(model, tparams, [[1, 2]], method="hydra")
    other, other_params = random_heads(2 * d)
    with pytest.raises(InputError, match=f"d_model={2 * d}; the target has d_model={d}"):
        api.generate(model, tparams, [[1, 2]], method="hydra", heads=other, heads_params=other_params)
    with pytest.raises(InputError, match=r"blocks_0_0/bias has shape \(64,\); HydraHeads\(num_heads=3, d_model=32"):
        api.generate(model, tparams, [[1, 2]], method="hydra", heads=heads, heads_params=other_params)
    with pytest.raises(InputError, match=r"vocab_ids must be distinct target ids in \[0, 64\)"):
        api.generate(model, tparams, [[1, 2]], method="hydra", heads=heads, heads_params=params, vocab_ids=[3, 64])
    with pytest.raises(InputError, match="tree depth 4 needs at least that many Hydra heads; the heads have "
                       "num_heads=3"):
        api.generate(model, tparams, [[1, 2]], method="hydra", heads=heads, heads_params=params, expand=2, depth=4,
                     nodes=4)
    with pytest.raises(ConfigError, match="method 'hydra': tree='chain:2' is not allowed: left empty with a "
                       "dynamic tree"):
        api.generate(model, tparams, [[1, 2]], method="hydra", heads=heads, heads_params=params, expand=2,
                     tree="chain:2")
    with pytest.raises(InputError, match="tree depth 4 needs at least that many Hydra heads"):
        api.generate(model, tparams, [[1, 2]], method="hydra", heads=heads, heads_params=params, tree="chain:4")
