"""Every drafter called directly: the tokens and tree it proposes for a known context, against a reference
computed another way (full forwards, plain numpy), and its bookkeeping over several rounds. Greedy equality
with autoregressive decoding holds whatever a drafter proposes, so these tests are what catches a drafter
that proposes the wrong tokens. (Token recycling and n-grams have their own files.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import api, trees
from jaxspec.decoding.drafters import Context, MedusaDrafter, ModelDrafter, PromptLookupDrafter
from jaxspec.models.heads import MedusaHeads


def context(root, seq=None, hidden=None, temperature=0.0):
    root = jnp.asarray(root, jnp.int32)
    seq = jnp.zeros((root.shape[0], 1), jnp.int32) if seq is None else jnp.asarray(seq, jnp.int32)
    lens = jnp.asarray([int(np.max(np.nonzero(np.asarray(r) >= 0)[0])) + 1 for r in np.asarray(seq)], jnp.int32)
    hidden = jnp.zeros((root.shape[0], 4)) if hidden is None else hidden
    return Context(root, jnp.maximum(seq, 0), lens, hidden, jax.random.key(0), temperature)


# --- prompt lookup -------------------------------------------------------------------------------------------


def test_lookup_continues_the_latest_longest_match_periodically():
    drafter = PromptLookupDrafter(trees.chain(4), max_ngram=3, min_ngram=1)
    seq = [
        [5, 6, 7, 8, 5, 6, -1, -1, -1, -1],  # [5, 6] follows at 0: 7, 8, 5, 6 (the period n - start = 4)
        [1, 2, 3, 9, 2, 3, 4, 1, 2, 3],  # [1, 2, 3] (at 0) beats the later [2, 3] (at 4): 9, 2, 3, 4
        [4, 5, 6, 7, -1, -1, -1, -1, -1, -1],  # 7 was never seen before: no draft
        [2, 2, -1, -1, -1, -1, -1, -1, -1, -1],  # [2] at 0, period 1: 2, 2, 2, 2
    ]
    roots = [s[max(i for i, t in enumerate(s) if t >= 0)] for s in seq]
    prop = drafter.propose((), (), context(roots, seq))
    tokens, valid = np.asarray(prop.tokens), np.asarray(prop.node_valid)
    assert tokens[0].tolist() == [6, 7, 8, 5, 6] and valid[0].all()
    assert tokens[1].tolist() == [3, 9, 2, 3, 4] and valid[1].all()
    assert valid[2].tolist() == [True, False, False, False, False]
    assert tokens[3].tolist() == [2, 2, 2, 2, 2] and valid[3].all()
    assert prop.draft_probs is None and drafter.update((), None, None) == ()


def test_lookup_min_ngram_refuses_shorter_matches():
    drafter = PromptLookupDrafter(trees.chain(2), max_ngram=3, min_ngram=2)
    prop = drafter.propose((), (), context([6], [[6, 1, 7, 6]]))  # only the 1-gram [6] matched before
    assert np.asarray(prop.node_valid).tolist() == [[True, False, False]]


# --- model drafters: a draft model, layer skipping, MatFormer sub-models ---------------------------------------


def greedy_tree_reference(full_logits, model, params, history, tree, **apply_kw):
    """Tokens of each node of `tree` drafted greedily by `model` after `history` (root = history[-1]): a node
    of sibling rank r takes the r-th most likely token after its root path, from full forwards."""
    ranks = np.zeros(tree.num_nodes, int)
    tokens = [history[-1]]
    for i in range(1, tree.num_nodes):
        parent = tree.parents[i]
        ranks[i] = sum(1 for j in range(1, i) if tree.parents[j] == parent)
        path, node = [], parent
        while node > 0:
            path.append(tokens[node])
            node = tree.parents[node]
        logits = full_logits(model, params, [list(history) + path[::-1]], **apply_kw)[0][-1]
        tokens.append(int(np.argsort(-logits, kind="stable")[ranks[i]]))
    return tokens


SELF_DRAFTS = {"draft_model": {}, "layer_skip": {"skip_layers": (1,)}, "matformer": {"granularity": 0}}


@pytest.mark.parametrize("kind", sorted(SELF_DRAFTS))
@pytest.mark.parametrize("tree_spec", ["chain:3", "branching:2,2"])
def test_model_drafter_proposes_its_greedy_tree_over_rounds(make_model, full_logits, kind, tree_spec):
    """Three rounds, two rows with different prompt lengths and acceptances: the drafter's state (its cache
    plus the lag of emitted tokens it has not yet read) must always stand for prompt + everything emitted."""
    overrides = dict(matformer_fractions=(0.5, 1.0)) if kind == "matformer" else {}
    model, params = make_model("A", seed=7, n_layers=3, max_len=64, **overrides)
    apply_kw = SELF_DRAFTS[kind]
    tree = trees.tree_from_spec(tree_spec)
    drafter = ModelDrafter(model, tree, **apply_kw)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    histories = [list(p) + [r] for p, r in zip(prompts, (7, 8), strict=True)]  # + the prefill's first token
    padded, lens = np.zeros((2, 5), np.int32), np.asarray([5, 3], np.int32)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
    dstate = drafter.init(params, jnp.asarray(padded), jnp.asarray(lens), 64, jnp.asarray([7, 8]))
    # Per round and row: how many drafts the verifier "accepts" along node path 1, 2, ... and its bonus token.
    rounds = [((1, 0), (11, 12)), ((0, 2), (13, 14)), ((2, 1), (15, 16))]
    for accepted, bonus in rounds:
        prop = drafter.propose(params, dstate, context([h[-1] for h in histories]))
        tokens = np.asarray(prop.tokens)
        for row, history in enumerate(histories):
            want = greedy_tree_reference(full_logits, model, params, history, tree, **apply_kw)
            assert tokens[row].tolist() == want, (row, history)
        emitted = np.zeros((2, tree.num_nodes), np.int32)
        for row in range(2):
            path = [tokens[row, i] for i in range(1, accepted[row] + 1)]  # nodes 1, 2 are a root path (BFS)
            if tree_spec.startswith("branching"):
                path = [tokens[row, n] for n in (1, 3)][:accepted[row]]  # node 3 is node 1's first child
            emitted[row, :len(path) + 1] = path + [bonus[row]]
            histories[row] += path + [bonus[row]]
        dstate = drafter.update(prop.state, jnp.asarray(emitted), jnp.asarray([a + 1 for a in accepted]))


def test_confidence_threshold_stops_branches_by_either_rule(make_model, full_logits):
    model, params = make_model("A", seed=7, n_layers=3, max_len=64)
    prompt = [3, 1, 4, 1, 5]
    history = prompt + [7]
    top = [float(jnp.max(jax.nn.softmax(full_logits(model, params, [history])[0][-1])))]
    first = greedy_tree_reference(full_logits, model, params, history, trees.chain(2))
    top.append(float(jnp.max(jax.nn.softmax(full_logits(model, params, [history + [first[1]]])[0][-1]))))
    # top[i]: the drafter's confidence in draft i + 1. The drop rule keeps a draft while it and every draft above
    # it are confident; Kangaroo's rule (keep_unconfident) also keeps the first unconfident one, then stops.
    middle = (top[0] + top[1]) / 2
    for threshold, drop, keep_last in (
            (min(top) / 2, [True] * 3, [True] * 3),
            (max(top) + 1e-3, [True, False, False], [True, True, False]),
            (middle, [True, top[0] >= top[1], False], [True, True, top[0] >= top[1]])):
        for keep_unconfident, want in ((False, drop), (True, keep_last)):
            drafter = ModelDrafter(model, trees.chain(2), confidence_threshold=threshold,
                                   keep_unconfident=keep_unconfident)
            dstate = drafter.init(params, jnp.asarray([prompt]), jnp.asarray([5]), 64, jnp.asarray([7]))
            prop = drafter.propose(params, dstate, context([7]))
            assert np.asarray(prop.node_valid)[0].tolist() == want, (threshold, keep_unconfident)


def test_sampled_drafts_come_with_the_distribution_they_were_drawn_from(make_model, full_logits):
    model, params = make_model("A", seed=7, n_layers=3, max_len=64)
    drafter = ModelDrafter(model, trees.chain(2))
    dstate = drafter.init(params, jnp.asarray([[3, 1, 4, 1, 5]]), jnp.asarray([5]), 64, jnp.asarray([7]))
    prop = drafter.propose(params, dstate, context([7], temperature=0.7))
    tokens, probs = np.asarray(prop.tokens)[0], np.asarray(prop.draft_probs)[0]
    history = [3, 1, 4, 1, 5, 7]
    for node in (1, 2):  # node i was drawn from the drafter's distribution at its parent, warped by T
        logits = full_logits(model, params, [history + tokens[1:node].tolist()])[0][-1]
        np.testing.assert_allclose(probs[node], jax.nn.softmax(logits / 0.7), rtol=1e-4, atol=1e-6)


# --- Medusa heads -----------------------------------------------------------------------------------------------


def test_medusa_node_at_depth_d_takes_head_d_minus_1_at_its_sibling_rank():
    heads = MedusaHeads(num_heads=2, d_model=8, vocab_size=16)
    hidden = jax.random.normal(jax.random.key(1), (2, 8))
    params = heads.init(jax.random.key(2), hidden[:, None])["params"]
    params = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape), params)
    tree = trees.from_branching((2, 2))  # root; depth 1: ranks 0, 1; depth 2: ranks 0, 1, 0, 1
    drafter = MedusaDrafter(heads, tree)
    prop = drafter.propose({"heads": params}, (), context([5, 6], hidden=hidden))
    logits = np.asarray(heads.apply({"params": params}, hidden[:, None]))[:, 0]  # [B, heads, V]
    order = np.argsort(-logits, axis=-1, kind="stable")
    for row in range(2):
        want = [[5, 6][row], order[row, 0, 0], order[row, 0, 1]] + [order[row, 1, r] for r in (0, 1, 0, 1)]
        assert np.asarray(prop.tokens)[row].tolist() == want
    with pytest.raises(ValueError, match="tree depth 3 needs at least that many Medusa heads"):
        MedusaDrafter(heads, trees.chain(3))


# --- a drafter that agrees with the target is always accepted -------------------------------------------------


@pytest.mark.parametrize("pattern", ["A", "ALM"])
def test_a_drafter_equal_to_the_target_has_every_draft_accepted(make_model, pattern):
    model, params = make_model(pattern, seed=7, max_len=64)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    out = api.generate(model, params, prompts, method="draft", draft_model=model, draft_params=params,
                       tree="chain:3", max_new_tokens=13)
    ar = api.generate(model, params, prompts, max_new_tokens=13)
    assert out.tokens == ar.tokens
    # 13 tokens: 1 from the prefill, then 3 rounds of 4 (three drafts and the bonus).
    assert out.target_steps.tolist() == [3, 3] and ar.target_steps.tolist() == [12, 12]


# --- siblings sampled without replacement (RSD) ---------------------------------------------------------------


def test_siblings_without_replacement_follow_the_conditional_laws_they_report():
    """Three siblings from one parent's q over 5 tokens, 20000 draws: distinct tokens; the reported draft
    distribution of rank r is q without the r earlier draws, renormalised; the pair (rank 0, rank 1) has the
    sequential law q(a) q(b) / (1 - q(a))."""
    from scipy import stats

    from jaxspec.decoding.drafters import children_tokens

    q = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = jnp.log(jnp.asarray(q, jnp.float32))[None, None].repeat(3, axis=1)  # [1, 3 siblings, 5]
    ranks, parents = np.array([0, 1, 2]), np.array([0, 0, 0])
    draw = jax.jit(jax.vmap(lambda k: children_tokens(k, logits, ranks, 1.0, 3, parents)))
    tokens, probs = draw(jax.random.split(jax.random.key(3), 20000))
    tokens, probs = np.asarray(tokens)[:, 0], np.asarray(probs)[:, 0]  # [N, 3], [N, 3, 5]
    assert np.all(tokens[:, 0] != tokens[:, 1]) and np.all(tokens[:, 1] != tokens[:, 2])
    assert np.all(tokens[:, 0] != tokens[:, 2])
    for i in range(5):
        row = tokens[i]
        np.testing.assert_allclose(probs[i, 0], q, rtol=1e-5)
        second = np.where(np.arange(5) == row[0], 0, q)
        np.testing.assert_allclose(probs[i, 1], second / second.sum(), rtol=1e-5)
        third = np.where(np.isin(np.arange(5), row[:2]), 0, q)
        np.testing.assert_allclose(probs[i, 2], third / third.sum(), rtol=1e-5)
    expected = np.array([[q[a] * q[b] / (1 - q[a]) if a != b else 0 for b in range(5)] for a in range(5)])
    observed = np.zeros((5, 5))
    np.add.at(observed, (tokens[:, 0], tokens[:, 1]), 1)
    cells = expected > 0
    assert stats.chisquare(observed[cells], expected[cells] * len(tokens)).pvalue > 1e-3
    # Negative control: the second draw's marginal is far from q, the law an i.i.d. second draw would have.
    second = np.bincount(tokens[:, 1], minlength=5)
    assert stats.chisquare(second, q * len(tokens)).pvalue < 1e-3
