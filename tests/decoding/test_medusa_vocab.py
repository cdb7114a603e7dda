"""Medusa heads on a draft vocabulary (`medusa.draft_vocab`): the heads score N target ids, the drafter maps the
rows it picks back to target ids and, when sampling, gives the verifier a distribution that is 0 outside them.
Decoding with trimmed heads is exactly autoregressive, heads planted to know the target reach tau = depth + 1,
and heads and a vocabulary of different sizes are refused by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxspec.decoding import api, methods
from jaxspec.decoding.drafters import Context
from jaxspec.decoding.method import Target
from jaxspec.errors import InputError
from jaxspec.models.heads import MedusaHeads, lm_head_kernel

NUM_HEADS = 3
DRAFT_VOCAB = np.arange(1, 64, 2)  # the odd ids of the tiny targets' 64
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [4, 4, 4, 4, 4, 4], [30, 2, 7]]
NEW_TOKENS = 17


@pytest.fixture(scope="module")
def target(make_model):
    return make_model("A", seed=5, max_len=64)


def random_heads(d_model: int, outputs: int, share: bool, seed: int = 0):
    """Heads scoring `outputs` ids with random weights (kernels ~ N(0, 1/fan_in)): away from the initialiser's zero
    blocks, each head disagrees with the target."""
    heads = MedusaHeads(NUM_HEADS, d_model, outputs, share_lm_head=share)
    kernel = jnp.zeros((d_model, outputs)) if share else None
    shapes = jax.eval_shape(lambda: heads.init(jax.random.key(0), jnp.zeros((1, 1, d_model)), kernel)["params"])
    rng = np.random.default_rng(seed)
    return heads, jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[0]),
                                                     jnp.float32), shapes)


@pytest.fixture(scope="module")
def autoregressive(target):
    """Greedy autoregressive output for PROMPTS; rows are independent, so its first row is also PROMPTS[:1]'s."""
    model, params = target
    return api.generate(model, params, PROMPTS, max_new_tokens=NEW_TOKENS).tokens


@pytest.mark.parametrize("rows, share", [(1, False), (4, True)], ids=["batch1_own", "batch4_shared"])
def test_decoding_with_trimmed_heads_equals_autoregressive(target, autoregressive, rows, share):
    model, params = target
    heads, heads_params = random_heads(model.model_cfg.d_model, len(DRAFT_VOCAB), share)
    out = api.generate(model, params, PROMPTS[:rows], max_new_tokens=NEW_TOKENS, method="medusa", heads=heads,
                       heads_params=heads_params, vocab_ids=DRAFT_VOCAB)
    assert out.tokens == autoregressive[:rows]
    assert np.all(out.accepted >= out.target_steps)


def test_sampled_proposal_is_a_distribution_over_the_draft_vocabulary_only(target):
    """At T > 0 every drafted node comes with the distribution it was drawn from: head d-1's softmax at T over the
    draft vocabulary, scattered to the target ids (0 elsewhere); its tokens follow it (many rows, one hidden)."""
    model, params = target
    d, vocab, rows = model.model_cfg.d_model, model.model_cfg.vocab_size, 4000
    heads, heads_params = random_heads(d, len(DRAFT_VOCAB), share=True)
    drafter, dparams = methods.make("medusa", tree="medusa_small").build(
        Target(model, params), heads=heads, heads_params=heads_params, vocab_ids=DRAFT_VOCAB)
    hidden = jax.random.normal(jax.random.key(3), (d,))
    prop = jax.jit(lambda p, h: drafter.propose(p, (), Context(jnp.full((rows,), 4), None, None, h,
                                                               jax.random.key(1), 0.8)))(
        dparams, jnp.broadcast_to(hidden, (rows, d)))
    probs, tokens = np.asarray(prop.draft_probs), np.asarray(prop.tokens)
    outside = np.setdiff1d(np.arange(vocab), DRAFT_VOCAB)
    assert probs.shape == (rows, drafter.tree.num_nodes, vocab)
    assert np.all(probs[:, 1:, outside] == 0) and np.all(probs[:, 0] == 0)  # the root is no draft
    np.testing.assert_allclose(probs[:, 1:].sum(-1), 1.0, rtol=1e-5)
    assert np.all(tokens[:, 0] == 4)
    kernel = jnp.asarray(np.asarray(lm_head_kernel(params, model.model_cfg))[:, DRAFT_VOCAB])
    logits = np.asarray(heads.apply({"params": heads_params}, hidden[None, None], kernel))[0, 0]  # [heads, N]
    for node in range(1, drafter.tree.num_nodes):
        want = np.asarray(jax.nn.softmax(logits[drafter.tree.depths[node] - 1] / 0.8), np.float64)
        np.testing.assert_allclose(probs[0, node, DRAFT_VOCAB], want, rtol=1e-5, atol=1e-7)
        want = want / want.sum()  # float64: the chi-square test wants the expected counts to sum to `rows`
        counts = np.bincount(tokens[:, node], minlength=vocab)
        assert counts[outside].sum() == 0
        observed, expected = counts[DRAFT_VOCAB], want * rows
        rare = expected < 5  # the chi-square approximation needs >= 5 expected per cell: the rare ones pooled
        if rare.any():
            observed = np.append(observed[~rare], observed[rare].sum())
            expected = np.append(expected[~rare], expected[rare].sum())
        assert stats.chisquare(observed, expected).pvalue > 1e-3, node


def test_planted_exact_heads_on_a_draft_vocabulary_reach_tau_depth_plus_one(make_model, apply):
    """A target whose layers add nothing has a final hidden state h(x) that depends on the last token x alone. Its
    LM head is planted so that next(x) = pi(x), pi a cycle through the draft vocabulary: column pi(x) is the unit
    vector of h(x) (largest score at x by Cauchy-Schwarz), columns outside the vocabulary are 0. Head k reads h at
    the root's parent x_t and must guess pi^(k+2)(x_t): its own output row of that id is the unit vector of h(x_t).
    Every draft of the top-1 path is then accepted: tau = depth + 1."""
    model, params = make_model("A", seed=4, max_len=64, tie_embeddings=False)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if any(getattr(k, "key", "") in ("o_proj", "down_proj") for k in path)
        else x, params)
    vocab, d = model.model_cfg.vocab_size, model.model_cfg.d_model
    hidden = np.asarray(apply(model, params, jnp.arange(vocab)[None], return_hidden=True).hidden[0])
    unit = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
    cycle = np.random.default_rng(0).permutation(DRAFT_VOCAB)
    step = {int(x): int(y) for x, y in zip(cycle, np.roll(cycle, -1), strict=True)}  # pi on the draft vocabulary

    def ahead(x, n):
        for _ in range(n):
            x = step[x]
        return x

    lm_head = np.zeros((d, vocab), np.float32)
    lm_head[:, [step[x] for x in cycle]] = unit[cycle].T
    params = {**params, "lm_head": {"kernel": jnp.asarray(lm_head)}}
    heads, planted = random_heads(d, len(DRAFT_VOCAB), share=False)
    row = {int(x): i for i, x in enumerate(DRAFT_VOCAB)}
    for k in range(NUM_HEADS):
        out = np.zeros((d, len(DRAFT_VOCAB)), np.float32)
        out[:, [row[ahead(int(x), k + 2)] for x in cycle]] = unit[cycle].T
        planted[f"head_{k}_out"] = {"kernel": jnp.asarray(out)}
        planted[f"head_{k}_block_0"] = jax.tree.map(jnp.zeros_like, planted[f"head_{k}_block_0"])
    prompts = [[2, 7, int(x)] for x in cycle[:4]]  # each ends inside the cycle
    out = api.generate(model, params, prompts, max_new_tokens=NEW_TOKENS, method="medusa", heads=heads,
                       heads_params=planted, vocab_ids=DRAFT_VOCAB)
    # The target's own greedy output: pi applied again and again.
    assert out.tokens == [[ahead(p[-1], n) for n in range(1, NEW_TOKENS + 1)] for p in prompts]
    # The default tree, medusa_small, has depth 3: 4 tokens a round, the 16 after the prefill's in 4 rounds.
    assert out.target_steps.tolist() == [4] * 4 and out.accepted.tolist() == [16] * 4


def test_heads_and_vocabulary_of_different_sizes_are_refused(target):
    model, params = target
    d = model.model_cfg.d_model
    heads, heads_params = random_heads(d, len(DRAFT_VOCAB), share=False)
    spec = methods.make("medusa", tree="chain:2")
    with pytest.raises(InputError, match=r"vocab_ids has 31 ids but the drafter.s head scores 32"):
        spec.build(Target(model, params), heads=heads, heads_params=heads_params, vocab_ids=DRAFT_VOCAB[:-1])
    with pytest.raises(InputError, match=r"vocab_size=32; the target has .* vocab_size=64.*pass its vocab_ids"):
        spec.build(Target(model, params), heads=heads, heads_params=heads_params)
    with pytest.raises(InputError, match=r"vocab_ids must be distinct target ids in \[0, 64\)"):
        spec.build(Target(model, params), heads=heads, heads_params=heads_params, vocab_ids=[*DRAFT_VOCAB[:-1], 1])
    with pytest.raises(InputError, match=r"vocab_ids must be distinct target ids in \[0, 64\)"):
        spec.build(Target(model, params), heads=heads, heads_params=heads_params, vocab_ids=[*DRAFT_VOCAB[:-1], 64])
    shared, shared_params = random_heads(d, 16, share=True)
    with pytest.raises(InputError, match=r"lm_head_kernel of shape \(32, 64\); it needs \[32, 16\]"):
        shared.apply({"params": shared_params}, jnp.zeros((1, 1, d)), lm_head_kernel(params, model.model_cfg))


def test_dynamic_tree_over_the_heads_is_the_best_paths(target, tree_paths):
    """With `expand`, Medusa drafts EAGLE-2's tree over its heads' log-probabilities: as the heads ignore the path,
    the chosen drafts are the `nodes` best of the beam over per-depth scores (a plain Python beam search)."""
    model, params = target
    d = model.model_cfg.d_model
    heads, heads_params = random_heads(d, len(DRAFT_VOCAB), share=False, seed=2)
    expand, depth, nodes = 2, 3, 5
    drafter, dparams = methods.make("medusa", expand=expand, depth=depth, nodes=nodes).build(
        Target(model, params), heads=heads, heads_params=heads_params, vocab_ids=DRAFT_VOCAB)
    hidden = jax.random.normal(jax.random.key(4), (2, d))
    prop = jax.jit(lambda p, h: drafter.propose(p, (), Context(jnp.asarray([4, 9]), None, None, h,
                                                               jax.random.key(0), 0.0)))(dparams, hidden)
    for row in range(2):
        logits = np.asarray(heads.apply({"params": heads_params}, hidden[row][None, None]))[0, 0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        level, pool = [((), 0.0)], []
        for level_depth in range(depth):
            best = np.argsort(-logp[level_depth], kind="stable")[:expand]
            candidates = [(path + (int(DRAFT_VOCAB[i]),), score + logp[level_depth, i])
                          for path, score in level for i in best]
            level = sorted(candidates, key=lambda c: -c[1])[:expand]
            pool += level
        want = {path for path, _ in sorted(pool, key=lambda c: -c[1])[:nodes]}
        tokens, parents = np.asarray(prop.tokens[row]), np.asarray(prop.parents[row])
        assert set(tree_paths(tokens, parents)) == want and tokens[0] == [4, 9][row]


def test_dynamic_tree_decoding_equals_autoregressive(target, autoregressive):
    model, params = target
    heads, heads_params = random_heads(model.model_cfg.d_model, len(DRAFT_VOCAB), share=True, seed=3)
    out = api.generate(model, params, PROMPTS, max_new_tokens=NEW_TOKENS, method="medusa", heads=heads,
                       heads_params=heads_params, vocab_ids=DRAFT_VOCAB, expand=2, depth=3, nodes=4)
    assert out.tokens == autoregressive
    with pytest.raises(InputError, match="tree depth 4 needs at least that many Medusa heads"):
        api.generate(model, params, PROMPTS, method="medusa", heads=heads, heads_params=heads_params,
                     vocab_ids=DRAFT_VOCAB, expand=2, depth=4, nodes=4)
