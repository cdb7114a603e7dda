"""Tests for tree verification: hand-computed greedy cases, typical acceptance and losslessness of
rejection sampling (a chi-square test on a synthetic bigram target, with wrong variants as controls)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxspec.decoding import trees, verify
from jaxspec.decoding.sampling import warp_logits
from jaxspec.decoding.verify import verify_tree

# One compilation per static configuration instead of op-by-op dispatch.
verify_jit = jax.jit(verify_tree, static_argnames=("tree", "rule", "top_k", "top_p"))
# "rbg" keys compile much faster on CPU than the default threefry ones; no rule depends on the generator.
FAST_KEY = jax.random.key(0, impl="rbg")


def _logits_with_argmax(argmax: np.ndarray, vocab: int) -> jnp.ndarray:
    """Logits [B, K, V] whose argmax at each node is ``argmax[b, k]``."""
    noise = np.random.default_rng(0).normal(scale=0.1, size=argmax.shape + (vocab,))
    return jnp.asarray(noise + 5.0 * np.eye(vocab)[argmax], jnp.float32)


def _as_np(result: verify.VerifyResult) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in result._asdict().items()}


def test_greedy_chain_batch_of_three():
    argmax = np.array([[1, 2, 3, 4]] * 3)
    tokens = np.array(
        [
            [0, 1, 2, 3],  # every draft matches
            [0, 1, 5, 3],  # mismatch at depth 2
            [0, 3, 2, 3],  # mismatch at depth 1
        ]
    )
    out = _as_np(verify_jit(_logits_with_argmax(argmax, 6), tokens, trees.chain(3), rule="greedy"))
    np.testing.assert_array_equal(out["num_accepted"], [4, 2, 1])
    np.testing.assert_array_equal(out["path"], [[0, 1, 2, 3], [0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["bonus"], [4, 2, 1])
    np.testing.assert_array_equal(out["accepted_tokens"], [[1, 2, 3, 4], [1, 2, 0, 0], [1, 0, 0, 0]])
    assert all(v.dtype == np.int32 for v in out.values())


def test_greedy_tree_with_masking_and_sibling_skip():
    tree = trees.TokenTree((-1, 0, 0, 1, 2, 2))
    argmax = np.array(
        [
            [2, 0, 4, 0, 0, 5],
            [2, 0, 4, 0, 0, 5],
            [1, 0, 0, 3, 0, 0],
        ]
    )
    tokens = np.array(
        [
            [9, 1, 2, 0, 3, 4],  # node 1 fails, node 2 passes, then node 4 fails and node 5 passes
            [9, 1, 2, 0, 3, 4],  # the same, but node 2 is invalid: nothing is accepted
            [9, 1, 1, 0, 7, 7],  # node 1 passes; its sibling 2 (same token) is skipped; node 3 passes
        ]
    )
    node_valid = np.ones((3, 6), bool)
    node_valid[1, 2] = False
    out = _as_np(
        verify_jit(_logits_with_argmax(argmax, 10), tokens, tree, rule="greedy", node_valid=node_valid)
    )
    np.testing.assert_array_equal(out["num_accepted"], [3, 1, 3])
    np.testing.assert_array_equal(out["path"], [[0, 2, 5, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 3, 0, 0, 0]])
    np.testing.assert_array_equal(out["bonus"], [5, 2, 3])
    np.testing.assert_array_equal(
        out["accepted_tokens"], [[2, 4, 5, 0, 0, 0], [2, 0, 0, 0, 0, 0], [1, 0, 3, 0, 0, 0]]
    )


def _random_parents(rng: np.random.Generator, batch: int, num_nodes: int) -> np.ndarray:
    parents = np.full((batch, num_nodes), -1)
    for i in range(1, num_nodes):
        parents[:, i] = rng.integers(0, i, size=batch)
    return parents


def test_per_row_parents_match_static_trees_row_by_row():
    rng = np.random.default_rng(1)
    batch, num_nodes, vocab = 4, 7, 3
    parents = _random_parents(rng, batch, num_nodes)
    logits = rng.normal(size=(batch, num_nodes, vocab)).astype(np.float32)
    # Most nodes copy their parent's argmax, so that deep paths get accepted.
    parent_argmax = logits.argmax(-1)[np.arange(batch)[:, None], np.maximum(parents, 0)]
    tokens = np.where(
        rng.random((batch, num_nodes)) < 0.7, parent_argmax, rng.integers(0, vocab, parents.shape)
    )
    batched = _as_np(jax.jit(functools.partial(verify_tree, rule="greedy"))(logits, tokens, parents))
    assert batched["num_accepted"].max() > 2 and batched["num_accepted"].min() < batched["num_accepted"].max()
    for b in range(batch):
        row = verify_jit(logits[b : b + 1], tokens[b : b + 1], trees.TokenTree(parents[b]), rule="greedy")
        for name, value in _as_np(row).items():
            np.testing.assert_array_equal(batched[name][b : b + 1], value, err_msg=f"row {b} {name}")


@pytest.mark.parametrize("rule", ["rejection", "typical"])
@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_sampling_rules_at_temperature_zero_equal_greedy(rule, with_draft_probs):
    rng = np.random.default_rng(2)
    tree = trees.from_branching((3, 2))
    batch, vocab = 16, 3
    logits = jnp.asarray(rng.normal(size=(batch, tree.num_nodes, vocab)), jnp.float32)
    tokens = rng.integers(0, vocab, size=(batch, tree.num_nodes))
    draft_probs = rng.dirichlet(np.ones(vocab), size=(batch, tree.num_nodes)) if with_draft_probs else None
    expected = _as_np(verify_jit(logits, tokens, tree, rule="greedy"))
    assert expected["num_accepted"].max() >= 3
    got = verify_jit(logits, tokens, tree, rule=rule, key=FAST_KEY, temperature=0.0, draft_probs=draft_probs)
    if rule == "rejection":
        for name, value in _as_np(got).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
        return
    # Typical takes the longest passing path, greedy the first passing child: with repeated sibling tokens
    # (vocab 3, three children) typical may go deeper, through the same argmax tokens.
    got = _as_np(got)
    assert np.all(got["num_accepted"] >= expected["num_accepted"])
    assert np.any(got["num_accepted"] > expected["num_accepted"])
    for b in range(batch):
        n = expected["num_accepted"][b]
        np.testing.assert_array_equal(got["accepted_tokens"][b, :n - 1], expected["accepted_tokens"][b, :n - 1])
        if got["num_accepted"][b] == n:
            np.testing.assert_array_equal(got["accepted_tokens"][b], expected["accepted_tokens"][b])


def test_typical_accepts_the_longest_passing_path_ties_to_the_likelier():
    # Tree: root 0 -> 1, 2, 3; 2 -> 4; 3 -> 5. Tokens 1, 2, 3 pass under the root (0.3 each > eps 0.09)
    # and node 1 is first, but it is a leaf; 4 and 5 both pass, so two depth-2 paths tie on length and the
    # one with the larger summed log-probability (through node 3: 0.3 * 0.5 > 0.3 * 0.4) wins.
    vocab = 6
    tree = trees.TokenTree((-1, 0, 0, 0, 2, 3))
    root_p = np.array([0.05, 0.3, 0.3, 0.3, 0.05, 0.0])
    after_2 = np.array([0.2, 0.0, 0.0, 0.0, 0.4, 0.4])
    after_3 = np.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.5])
    leaf = np.full(vocab, 1 / vocab)
    probs = np.stack([root_p, leaf, after_2, after_3, leaf, leaf])[None]
    logits = jnp.asarray(np.log(np.where(probs > 0, probs, 1e-30)), jnp.float32)
    tokens = np.array([[0, 1, 2, 3, 4, 5]])
    out = _as_np(verify_jit(logits, tokens, tree, rule="typical", key=FAST_KEY, temperature=1.0))
    assert out["num_accepted"].tolist() == [3]
    assert out["path"][0, :3].tolist() == [0, 3, 5] and out["accepted_tokens"][0, :2].tolist() == [3, 5]
    # The first passing child alone when nothing passes below any child.
    out = _as_np(verify_jit(logits, np.array([[0, 1, 2, 3, 1, 1]]), tree, rule="typical", key=FAST_KEY,
                            temperature=1.0))
    assert out["num_accepted"].tolist() == [2] and out["path"][0, :2].tolist() == [0, 1]
    # Invalid nodes never pass.
    out = _as_np(verify_jit(logits, tokens, tree, rule="typical", key=FAST_KEY, temperature=1.0,
                            node_valid=jnp.asarray([[True, True, True, False, True, True]])))
    assert out["path"][0, :3].tolist() == [0, 2, 4]


def test_typical_accepts_above_threshold_and_rejects_below():
    # Row 0: low entropy, so the threshold is eps = 0.09. Row 1: near-uniform over 10 tokens, so the
    # threshold is alpha * exp(-H) (about 0.03), below eps.
    low = np.array([0.6, 0.25, 0.1, 0.05, 0, 0, 0, 0, 0, 0])
    flat = np.array([0.15, 0.12, 0.11, 0.11, 0.1, 0.1, 0.1, 0.1, 0.1, 0.01])
    eps, alpha = 0.09, 0.3
    thresholds = []
    for p in (low, flat):
        entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
        thresholds.append(min(eps, alpha * np.exp(-entropy)))
    assert thresholds[0] == eps and 0.025 < thresholds[1] < 0.035
    # Drafts: 2 (0.1 > 0.09) and 3 (0.05 < 0.09) under `low`; 8 (0.1 > 0.033) and 9 (0.01 < 0.033) under
    # `flat`; for `flat`, 0.1 > 0.033 would fail against eps, so the entropy term is what accepts it.
    probs = np.stack([low, low, flat, flat])
    logits = np.log(np.where(probs > 0, probs, 1e-30))[:, None, :].repeat(2, axis=1)
    tokens = np.array([[0, 2], [0, 3], [0, 8], [0, 9]])
    out = verify_jit(
        jnp.asarray(logits, jnp.float32),
        tokens,
        trees.chain(1),
        rule="typical",
        key=jax.random.key(0),
        temperature=1.0,
        typical_threshold=eps,
        typical_alpha=alpha,
    )
    np.testing.assert_array_equal(np.asarray(out.num_accepted), [2, 1, 2, 1])
    np.testing.assert_array_equal(np.asarray(out.accepted_tokens)[[0, 2], 0], [2, 8])


# ---------------------------------------------------------------------------------------------------------
# Losslessness. The target is a bigram model over a small vocabulary: the target distribution after token
# t is P[t], so the logits at a node are log P[node token]. Drafts come from another bigram model Q. Two
# verification steps are run so that the first two emitted tokens are always known: if step 1 emitted only
# its bonus, step 2 starts from it. Their joint law, given the root, must be P[root, y1] * P[y1, y2].

VOCAB = 5
ROWS = 30000


def _bigram(seed: int, floor: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ((1 - floor) * rng.dirichlet(np.ones(VOCAB), size=VOCAB) + floor / VOCAB).astype(np.float32)


TARGET = _bigram(0, floor=0.25)
DRAFT = _bigram(1, floor=0.1)
MIXED_TREES = ((-1, 0, 1, 2), (-1, 0, 0, 1), (-1, 0, 0, 0))


@dataclasses.dataclass(frozen=True)
class Case:
    tree: trees.TokenTree | None  # None: each row draws one of MIXED_TREES (traced per-row parents)
    sampled_drafts: bool = True  # draw each child from DRAFT; else the top-ranked tokens of DRAFT
    pass_draft_probs: bool = True
    mask_nodes: bool = False
    rule: str = "rejection"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def _draft_tree(rng: np.random.Generator, roots: np.ndarray, parents: np.ndarray, ranks):
    """Tokens [N, K] and the draft distribution each node came from [N, K, V]."""
    rows = np.arange(len(roots))
    tokens = np.zeros(parents.shape, np.int32)
    tokens[:, 0] = roots
    dists = np.zeros(parents.shape + (VOCAB,), np.float32)
    dists[:, 0] = DRAFT[roots]
    ranked = np.argsort(-DRAFT, axis=1, kind="stable")
    for i in range(1, parents.shape[1]):
        parent_tokens = tokens[rows, parents[:, i]]
        dists[:, i] = DRAFT[parent_tokens]
        if ranks is None:
            cdf = np.cumsum(dists[:, i], axis=1)
            tokens[:, i] = np.minimum((rng.random((len(roots), 1)) > cdf).sum(axis=1), VOCAB - 1)
        else:
            tokens[:, i] = ranked[parent_tokens, ranks[i]]
    return tokens, dists


def _first_two_emitted(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    static_tree = case.tree

    @jax.jit
    def step(logits, tokens, parents, key, draft_probs, node_valid):
        return verify_tree(
            logits,
            tokens,
            parents if static_tree is None else static_tree,
            rule=case.rule,
            key=key,
            temperature=case.temperature,
            top_k=case.top_k,
            top_p=case.top_p,
            draft_probs=draft_probs,
            node_valid=node_valid,
        )

    if case.tree is None:
        parents = np.asarray(MIXED_TREES)[rng.integers(0, len(MIXED_TREES), size=ROWS)]
    else:
        parents = np.broadcast_to(case.tree.parents_array, (ROWS, case.tree.num_nodes))
    ranks = None if case.sampled_drafts else case.tree.node_rank
    keys = jax.random.split(jax.random.fold_in(FAST_KEY, seed))

    def run(roots, key):
        tokens, dists = _draft_tree(rng, roots, parents, ranks)
        node_valid = rng.random(parents.shape) < 0.6 if case.mask_nodes else None
        draft_probs = dists if case.pass_draft_probs else None
        return step(np.log(TARGET)[tokens], tokens, parents, key, draft_probs, node_valid)

    roots = rng.integers(0, VOCAB, size=ROWS)
    first = run(roots, keys[0])
    count = np.asarray(first.num_accepted)
    emitted = np.asarray(first.accepted_tokens)
    second = run(emitted[np.arange(ROWS), count - 1], keys[1])
    later = np.where(count >= 2, emitted[:, 1], np.asarray(second.accepted_tokens)[:, 0])
    return roots, emitted[:, 0], later


def _pair_p_value(case: Case, seed: int = 0) -> float:
    """Chi-square p-value of the emitted (y1, y2) given the root against the warped target."""
    roots, first, second = _first_two_emitted(case, seed)
    target = np.asarray(warp_logits(np.log(TARGET), case.temperature, case.top_k, case.top_p))
    observed = np.zeros((VOCAB,) * 3)
    np.add.at(observed, (roots, first, second), 1)
    root_counts = np.bincount(roots, minlength=VOCAB)
    expected = root_counts[:, None, None] * target[:, :, None] * target[None, :, :]
    support = expected > 0
    assert observed[~support].sum() == 0, "a token outside the target's support was emitted"
    statistic = np.sum((observed - expected)[support] ** 2 / expected[support])
    dof = int(support.sum() - (root_counts > 0).sum())
    return float(scipy.stats.chi2.sf(statistic, dof))


CHAIN = trees.chain(3)
TREE = trees.from_branching((2, 2))

LOSSLESS_CASES = {
    "chain_sampled": Case(CHAIN),
    "tree_sampled": Case(TREE),
    "tree_top_ranked_deterministic": Case(TREE, sampled_drafts=False, pass_draft_probs=False),
    # One-hot q is exact for any drafter (it conditions on the drafted token), just less efficient.
    "tree_sampled_verified_as_deterministic": Case(TREE, pass_draft_probs=False),
    "tree_sampled_masked_nodes": Case(TREE, mask_nodes=True),
    "per_row_parents": Case(None),
    "tree_warped_target": Case(TREE, temperature=0.7, top_k=4, top_p=0.9),
    "kseq_chain": Case(CHAIN, rule="kseq"),
    "kseq_tree": Case(TREE, rule="kseq"),
    "kseq_three_children": Case(trees.from_branching((3, 1)), rule="kseq"),
    "kseq_masked_nodes": Case(TREE, rule="kseq", mask_nodes=True),
    "kseq_per_row_parents": Case(None, rule="kseq"),
    "kseq_warped_target": Case(TREE, rule="kseq", temperature=0.7, top_k=4, top_p=0.9),
}


@pytest.mark.parametrize("name", list(LOSSLESS_CASES))
def test_sampling_rules_are_lossless(name):
    assert _pair_p_value(LOSSLESS_CASES[name]) > 1e-3


def _accept_without_draft_ratio(uniform, target_prob, draft_prob):
    return uniform < target_prob


def _keep_residual(residual, draft, fallback):
    return residual


def _reset_residual(residual, draft, fallback):
    return fallback


def _rho_one(probs, q, n):
    return jnp.ones(n.shape, jnp.float32)


def _bonus_from_target(probs, q, n, rho):
    return probs


# Each wrong variant must be caught by the same statistic: this is what gives the test above its power.
WRONG_VARIANTS = {
    "greedy_rule_under_sampling": (Case(TREE, rule="greedy"), None),
    "typical_rule": (Case(TREE, rule="typical"), None),
    "accept_without_dividing_by_q": (Case(TREE), ("_accepts_draft", _accept_without_draft_ratio)),
    "no_residual_update_chain": (Case(CHAIN), ("_residual_after_reject", _keep_residual)),
    "no_residual_update_tree": (Case(TREE), ("_residual_after_reject", _keep_residual)),
    "residual_reset_between_siblings": (Case(TREE), ("_residual_after_reject", _reset_residual)),
    # SpecTr with several children: rho = 1 (each child tried as if alone) over-accepts; a bonus from p
    # ignores what the failed children took.
    "kseq_without_rho": (Case(trees.from_branching((3, 1)), rule="kseq"), ("_kseq_rho", _rho_one)),
    "kseq_bonus_from_target": (Case(trees.from_branching((3, 1)), rule="kseq"), ("_kseq_residual",
                                                                                  _bonus_from_target)),
}


@pytest.mark.parametrize("name", list(WRONG_VARIANTS))
def test_losslessness_statistic_catches_wrong_variant(name, monkeypatch):
    case, patch = WRONG_VARIANTS[name]
    if patch is not None:
        monkeypatch.setattr(verify, *patch)
    assert _pair_p_value(case) < 1e-6


def test_bad_inputs_raise_clear_errors():
    logits = jnp.zeros((2, 4, 5))
    tokens = jnp.zeros((2, 4), jnp.int32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="rule = 'beam'"):
        verify_tree(logits, tokens, CHAIN, rule="beam")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        verify_tree(logits, tokens, CHAIN, rule="rejection")
    with pytest.raises(ValueError, match="target_logits has shape"):
        verify_tree(logits[0], tokens, CHAIN, rule="greedy")
    with pytest.raises(ValueError, match="tree_tokens has shape"):
        verify_tree(logits, tokens[:, :3], CHAIN, rule="greedy")
    with pytest.raises(ValueError, match="tree_tokens has dtype"):
        verify_tree(logits, tokens.astype(jnp.float32), CHAIN, rule="greedy")
    with pytest.raises(ValueError, match="tree has 7 nodes"):
        verify_tree(logits, tokens, TREE, rule="greedy")
    with pytest.raises(ValueError, match="parent array has shape"):
        verify_tree(logits, tokens, jnp.zeros((3, 4), jnp.int32), rule="greedy")
    with pytest.raises(ValueError, match="draft_probs has shape"):
        verify_tree(logits, tokens, CHAIN, rule="rejection", key=key, draft_probs=jnp.zeros((2, 4, 6)))
    with pytest.raises(ValueError, match="node_valid has shape"):
        verify_tree(logits, tokens, CHAIN, rule="greedy", node_valid=jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="'kseq' .* needs draft_probs"):
        verify_tree(logits, tokens, CHAIN, rule="kseq", key=key)
    with pytest.raises(ValueError, match="typical_threshold"):
        verify_tree(logits, tokens, CHAIN, rule="typical", key=key, typical_threshold=0.0)


def test_siblings_without_replacement_are_lossless_only_with_their_conditional_laws():
    """RSD at one node: three siblings drawn without replacement from q, verified by recursive rejection. With
    each sibling's conditional law as its draft distribution the first emitted token follows p; with the plain
    q for every sibling (verifying them as if i.i.d.) it does not. q puts most of its mass on two tokens that p
    rarely emits, so the third sibling's conditional law is far from q."""
    from jaxspec.decoding.drafters import children_tokens

    p = np.array([0.05, 0.05, 0.1, 0.4, 0.4])
    q = np.array([0.45, 0.45, 0.05, 0.03, 0.02])
    rows, tree = 40000, trees.from_branching((3,))
    draft_logits = jnp.log(jnp.asarray(q, jnp.float32))[None, None].repeat(3, axis=1).repeat(rows, axis=0)
    drafted, conditional = children_tokens(jax.random.key(1), draft_logits, np.array([0, 1, 2]), 1.0, 3,
                                           np.array([0, 0, 0]))
    tokens = jnp.concatenate([jnp.zeros((rows, 1), jnp.int32), drafted], axis=1)
    target_logits = jnp.log(jnp.asarray(p, jnp.float32))[None, None].repeat(4, axis=1).repeat(rows, axis=0)
    zero = jnp.zeros((rows, 1, 5))

    def first_emitted(draft_probs):
        out = verify_jit(target_logits, tokens, tree, rule="rejection", key=jax.random.key(2), temperature=1.0,
                         draft_probs=jnp.concatenate([zero, draft_probs], axis=1))
        return np.bincount(np.asarray(out.accepted_tokens)[:, 0], minlength=5)

    assert scipy.stats.chisquare(first_emitted(conditional), p * rows).pvalue > 1e-3
    plain = jnp.broadcast_to(jnp.asarray(q, jnp.float32), conditional.shape)
    assert scipy.stats.chisquare(first_emitted(plain), p * rows).pvalue < 1e-3


def test_kseq_rho_is_the_smallest_lossless_one_and_sets_the_acceptance():
    """SpecTr at one node with n i.i.d. children: rho is the smallest in [1, n] with c(rho) <= rho (checked on a
    fine grid in numpy), and the chance that some child is accepted is 1 - (1 - beta(rho))^n."""
    p = np.array([0.05, 0.05, 0.1, 0.4, 0.4], np.float32)
    q = np.array([0.3, 0.3, 0.2, 0.1, 0.1], np.float32)
    for n in (1, 2, 3, 4):
        rho = float(verify._kseq_rho(jnp.asarray(p)[None], jnp.asarray(q)[None], jnp.asarray([float(n)]))[0])
        grid = np.linspace(1.0, n, 20001)
        beta = np.minimum(q[None], p[None] / grid[:, None]).sum(axis=1)
        scale = (1 - (1 - beta) ** n) / beta
        smallest = grid[np.argmax(scale <= grid + 1e-7)]
        assert rho == pytest.approx(smallest, abs=2e-4 * n), n
        assert n == 1 or rho > 1.0  # several children need rho > 1 here: q and p differ
        expected = 1 - (1 - np.minimum(q, p / rho).sum()) ** n

        rows, tree = 40000, trees.from_branching((n,))
        rng = np.random.default_rng(n)
        children = rng.choice(5, size=(rows, n), p=q / q.sum())
        tokens = jnp.asarray(np.concatenate([np.zeros((rows, 1), np.int64), children], axis=1), jnp.int32)
        logits = jnp.broadcast_to(jnp.log(jnp.asarray(p)), (rows, n + 1, 5))
        out = verify_jit(logits, tokens, tree, rule="kseq", key=jax.random.key(n), temperature=1.0,
                         draft_probs=jnp.broadcast_to(jnp.asarray(q), (rows, n + 1, 5)))
        accepted = np.mean(np.asarray(out.num_accepted) > 1)
        assert accepted == pytest.approx(expected, abs=4 * np.sqrt(expected * (1 - expected) / rows)), n
