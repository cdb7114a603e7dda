"""Speculative decoding is exact: greedy output equals autoregressive greedy for every method and model
family, per batch row; rejection sampling reproduces the target's distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from configs import lm
from jaxspec.decoding import api, engine
from jaxspec.decoding.drafters import MedusaDrafter
from jaxspec.models.eagle import EagleNet, drafter_model_cfg
from jaxspec.models.heads import MedusaHeads
from jaxspec.models.hydra import HydraHeads
from jaxspec.models.lm import build_model, init_params

VOCAB = 48
SHARPEN = 8.0  # scales the embedding so the lossless test's target is peaked, not near-uniform
PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3, 4], [7, 8, 9], [4, 4, 4, 4, 4, 4], [1, 5, 9, 1, 5]]


def tiny_cfg(pattern, d_model=32, n_layers=2, vocab=VOCAB, fractions=(0.5, 1.0)):
    cfg = lm.get_config("tiny").model
    cfg.update(dict(layer_pattern=pattern, n_layers=n_layers, d_model=d_model, d_ff=2 * d_model, n_heads=4,
                    n_kv_heads=2, vocab_size=vocab, max_len=96, matformer_fractions=fractions))
    return cfg


def family(pattern):
    model = build_model(tiny_cfg(pattern))
    params = init_params(model, jax.random.key(0))
    draft = build_model(tiny_cfg(pattern, d_model=16, n_layers=1, fractions=(1.0,)))
    heads = MedusaHeads(num_heads=3, d_model=32, vocab_size=VOCAB)
    # Random (non-zero) head blocks so the heads disagree with the LM head and rejections happen.
    heads_params = heads.init(jax.random.key(2), jnp.zeros((1, 1, 32)))["params"]
    heads_params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape), heads_params)
    return model, params, dict(
        draft_chain=dict(method="draft", draft_model=draft, draft_params=init_params(draft, jax.random.key(1)),
                         tree="chain:3"),
        draft_tree=dict(method="draft", draft_model=draft, draft_params=init_params(draft, jax.random.key(1)),
                        tree="branching:2,2"),
        medusa=dict(method="medusa", heads=heads, heads_params=heads_params, tree="medusa_small"),
        matformer=dict(method="matformer", granularity=0, tree="chain:3"),
        layerskip=dict(method="layerskip", skip_layers=(1,), tree="chain:3"),
        lookup=dict(method="lookup", tree="chain:4"),
        adaptive=dict(method="matformer", granularity=0, tree="chain:4", adaptive=2, confidence_threshold=0.05),
    )


# Every method on attention and the hybrid; on the pure linear-attention and Mamba stacks, one method per kind of
# draft state (a draft model's own cache, heads on the target, the target's own sub-model with an adaptive length).
@pytest.mark.parametrize("pattern, names", [("A", None), ("ALM", None), ("L", ("draft_tree", "medusa", "adaptive")),
                                            ("M", ("draft_tree", "medusa", "adaptive"))])
def test_greedy_speculative_equals_autoregressive(pattern, names):
    model, params, methods = family(pattern)
    ar = api.generate(model, params, PROMPTS, method="ar", max_new_tokens=16)
    assert all(len(t) == 16 for t in ar.tokens)
    for name, kwargs in methods.items():
        if names is not None and name not in names:
            continue
        out = api.generate(model, params, PROMPTS, max_new_tokens=16, **kwargs)
        assert out.tokens == ar.tokens, f"{pattern} {name}"
        assert np.all(out.accepted >= out.target_steps), name  # every step commits at least its bonus
        assert np.all(out.target_steps <= ar.target_steps), name


@pytest.mark.parametrize("pattern", ["A", "ALM"])
def test_batch_of_one_and_eos(pattern):
    model, params, methods = family(pattern)
    ar = api.generate(model, params, PROMPTS[:1], method="ar", max_new_tokens=12)
    for name in ("draft_tree", "medusa", "lookup"):
        out = api.generate(model, params, PROMPTS[:1], max_new_tokens=12, **methods[name])
        assert out.tokens == ar.tokens, name
    # Stop on EOS: pick the 4th generated token of row 0 as "EOS"; output ends right there, in both.
    eos = ar.tokens[0][3]
    ar_eos = api.generate(model, params, PROMPTS, method="ar", max_new_tokens=12, eos_ids=eos)
    sp_eos = api.generate(model, params, PROMPTS, max_new_tokens=12, eos_ids=[eos], **methods["draft_chain"])
    assert ar_eos.tokens == sp_eos.tokens
    assert ar_eos.tokens[0][-1] == eos and len(ar_eos.tokens[0]) == ar.tokens[0].index(eos) + 1


def _exact_joint(model, params, prompt, temperature, vocab):
    """p(t1, t2 | prompt) of the target under temperature, from full forwards."""
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    p1 = jax.nn.softmax(apply(jnp.asarray([prompt]))[0, -1] / temperature)
    ctx = jnp.asarray([prompt + [t] for t in range(vocab)])
    p2 = jax.nn.softmax(apply(ctx)[:, -1] / temperature, axis=-1)
    return np.asarray(p1[:, None] * p2, np.float64)


def _chi_square_pvalue(observed, expected_probs):
    expected = expected_probs.ravel() / expected_probs.sum() * observed.sum()
    observed = observed.ravel()
    order = np.argsort(expected)
    # Pool the rare cells so every cell expects >= 5 (the chi-square approximation needs it).
    obs_pooled, exp_pooled, o_acc, e_acc = [], [], 0.0, 0.0
    for i in order:
        o_acc, e_acc = o_acc + observed[i], e_acc + expected[i]
        if e_acc >= 5:
            obs_pooled.append(o_acc)
            exp_pooled.append(e_acc)
            o_acc = e_acc = 0.0
    exp_pooled[-1] += e_acc
    obs_pooled[-1] += o_acc
    return stats.chisquare(obs_pooled, exp_pooled).pvalue


def _sharpened_pair(vocab: int, target_seed: int, draft_seed: int, sharpen_draft: bool = False):
    """(target, its params, draft, its params) on a tiny vocabulary; the target sharpened so that a wrong
    acceptance rule would visibly distort it (the draft too when asked)."""
    model = build_model(tiny_cfg("A", vocab=vocab))
    params = init_params(model, jax.random.key(target_seed))
    params["embed"]["embedding"] = params["embed"]["embedding"] * SHARPEN
    draft = build_model(tiny_cfg("A", d_model=16, n_layers=1, vocab=vocab, fractions=(1.0,)))
    dparams = init_params(draft, jax.random.key(draft_seed))
    if sharpen_draft:
        dparams["embed"]["embedding"] = dparams["embed"]["embedding"] * SHARPEN
    return model, params, draft, dparams


def _emitted_counts(out, depth: int, vocab: int) -> np.ndarray:
    """Counts [V] * depth of the first `depth` tokens emitted per row."""
    firsts = np.asarray([t[:depth] for t in out.tokens])
    counts = np.zeros((vocab,) * depth)
    np.add.at(counts, tuple(firsts.T), 1)
    return counts


@pytest.mark.slow
def test_rejection_sampling_is_lossless():
    vocab = 8
    model, params, draft, dparams = _sharpened_pair(vocab, 0, 5)
    prompt, n, temperature = [1, 2, 3], 6000, 1.0
    exact = _exact_joint(model, params, prompt, temperature, vocab)
    for kwargs in (dict(tree="chain:3"), dict(tree="branching:2,2")):
        out = api.generate(model, params, [prompt] * n, method="draft", draft_model=draft, draft_params=dparams,
                           max_new_tokens=2, temperature=temperature, seed=11, **kwargs)
        assert _chi_square_pvalue(_emitted_counts(out, 2, vocab), exact) > 1e-3, kwargs
    # Power check: the same test rejects a lossy rule (typical acceptance) on this target.
    lossy = api.generate(model, params, [prompt] * n, method="draft", draft_model=draft, draft_params=dparams,
                         max_new_tokens=2, temperature=temperature, rule="typical", seed=11, tree="chain:3")
    assert _chi_square_pvalue(_emitted_counts(lossy, 2, vocab), exact) < 1e-3


def _exact_joint3(model, params, prompt, temperature, vocab):
    """p(t1, t2, t3 | prompt) [V, V, V] of the target under temperature, from full forwards."""
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    p1 = jax.nn.softmax(apply(jnp.asarray([prompt]))[0, -1] / temperature)
    p2 = jax.nn.softmax(apply(jnp.asarray([prompt + [t] for t in range(vocab)]))[:, -1] / temperature, axis=-1)
    pairs = [[a, b] for a in range(vocab) for b in range(vocab)]
    p3 = jax.nn.softmax(apply(jnp.asarray([prompt + ab for ab in pairs]))[:, -1] / temperature, axis=-1)
    p3 = np.asarray(p3, np.float64).reshape(vocab, vocab, vocab)
    return np.asarray(p1, np.float64)[:, None, None] * np.asarray(p2, np.float64)[:, :, None] * p3


@pytest.mark.slow
def test_rejection_sampling_is_lossless_at_draft_depth_two():
    """The first three emitted tokens: the prefill's, then drafted depths 1 and 2 of the first round, where the
    draft model's probabilities at depth 2 are conditioned on its own depth-1 draw."""
    vocab = 6
    model, params, draft, dparams = _sharpened_pair(vocab, 1, 6)
    prompt, n, temperature = [1, 2, 3], 8000, 1.0
    exact = _exact_joint3(model, params, prompt, temperature, vocab)

    for tree, rule in (("chain:3", "rejection"), ("branching:2,2", "rejection"), ("branching:2,2", "kseq")):
        out = api.generate(model, params, [prompt] * n, method="draft", draft_model=draft, draft_params=dparams,
                           max_new_tokens=3, temperature=temperature, seed=21, tree=tree, rule=rule)
        assert np.mean(out.accepted > 2 * out.target_steps) > 0.05, tree  # depth 2 is reached and accepted
        assert _chi_square_pvalue(_emitted_counts(out, 3, vocab), exact) > 1e-3, (tree, rule)
    # An EAGLE feature drafter whose trimmed vocabulary leaves two tokens out (its draft distribution is 0 there),
    # sampled on a chain, and EAGLE-2's dynamic tree (deterministic top-k drafts, verified as point masses).
    net = EagleNet(drafter_model_cfg(model.model_cfg, 1))
    net_params = net.init(jax.random.key(4), jnp.zeros((1, 1, 32)), jnp.zeros((1, 1, 32)))["params"]
    eagle = dict(method="eagle", net=net, net_params=net_params, vocab_ids=[0, 2, 3, 5])
    # Hydra heads sampled the same way: siblings over a trimmed vocabulary on a static tree (its dynamic tree's
    # drafts are deterministic, verified as point masses like EAGLE-2's above).
    heads = HydraHeads(2, 32)
    heads_params = heads.init(jax.random.key(5), jnp.zeros((1, 32)), jnp.zeros((1, 2, 32)))["params"]
    heads_params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(6), x.shape), heads_params)
    hydra = dict(method="hydra", heads=heads, heads_params=heads_params, vocab_ids=[0, 1, 3, 4])
    for drafter, options in ((eagle, dict(tree="chain:3")), (eagle, dict(expand=2, depth=2, nodes=4)),
                             (hydra, dict(tree="branching:2,1"))):
        out = api.generate(model, params, [prompt] * n, max_new_tokens=3, temperature=temperature, seed=23,
                           **drafter, **options)
        what = (drafter["method"], options)
        assert np.mean(out.accepted > 2 * out.target_steps) > 0.05, what
        assert _chi_square_pvalue(_emitted_counts(out, 3, vocab), exact) > 1e-3, what
    # Negative control: the same test rejects typical acceptance (lossy) on this target.
    lossy = api.generate(model, params, [prompt] * n, method="draft", draft_model=draft, draft_params=dparams,
                         max_new_tokens=3, temperature=temperature, rule="typical", seed=21, tree="chain:3")
    assert _chi_square_pvalue(_emitted_counts(lossy, 3, vocab), exact) < 1e-3


@pytest.mark.slow
def test_rsd_siblings_without_replacement_are_lossless():
    """RSD end to end: three siblings drawn without replacement, verified with their conditional draft
    distributions, give the target's joint law of the first two tokens."""
    vocab = 8
    # A peaked draft, so that removing an earlier sibling's token changes the next sibling's law a lot.
    model, params, draft, dparams = _sharpened_pair(vocab, 0, 5, sharpen_draft=True)
    prompt, n, temperature = [1, 2, 3], 6000, 1.0
    exact = _exact_joint(model, params, prompt, temperature, vocab)

    options = dict(max_new_tokens=2, temperature=temperature, seed=13, tree="branching:3")
    out = api.generate(model, params, [prompt] * n, method="rsd", draft_model=draft, draft_params=dparams,
                       **options)
    # The negative control is verify-level (test_verify.py).
    assert _chi_square_pvalue(_emitted_counts(out, 2, vocab), exact) > 1e-3


@pytest.mark.parametrize("rule, drawn_at", [("typical", 0.0), ("rejection", 0.7)])
def test_drafts_are_sampled_only_for_rules_that_read_their_distribution(monkeypatch, rule, drawn_at):
    # Typical acceptance verifies the drafter's top-k candidates, as in Medusa; a sampled candidate would only add
    # noise. Rejection (and kseq) needs the distribution each draft was drawn from, so it gets sampled drafts.
    model, params, methods = family("A")
    seen, propose = [], MedusaDrafter.propose

    def recording(self, dparams, dstate, ctx):
        seen.append(ctx.temperature)
        return propose(self, dparams, dstate, ctx)

    monkeypatch.setattr(MedusaDrafter, "propose", recording)
    engine.clear_compiled()
    api.generate(model, params, PROMPTS[:1], max_new_tokens=4, temperature=0.7, rule=rule, **methods["medusa"])
    assert seen and set(seen) == {drawn_at}


def test_bad_requests_fail_before_compute():
    model, params, methods = family("A")
    with pytest.raises(ValueError, match="unknown decoding method"):
        api.generate(model, params, PROMPTS, method="beam")
    with pytest.raises(ValueError, match="unknown verification rule"):
        api.generate(model, params, PROMPTS, method="lookup", tree="chain:2", rule="nucleus")
    with pytest.raises(ValueError, match="max_len"):
        api.generate(model, params, [[1] * 90], method="ar", max_new_tokens=16)
    with pytest.raises(ValueError, match="rule='kseq' samples"):
        api.generate(model, params, PROMPTS, method="lookup", rule="kseq")
    with pytest.raises(ValueError, match="'kseq' .* needs draft_probs"):  # lookup's drafts are deterministic
        api.generate(model, params, PROMPTS, method="lookup", rule="kseq", temperature=1.0)
    with pytest.raises(ValueError, match="without replacement"):
        api.generate(model, params, PROMPTS, **{**methods["draft_tree"], "method": "rsd"}, rule="kseq", temperature=1.0)
    other = build_model(tiny_cfg("A", d_model=16, n_layers=1, vocab=VOCAB + 8, fractions=(1.0,)))
    with pytest.raises(ValueError, match="vocab_size"):
        api.generate(model, params, PROMPTS, method="draft", draft_model=other,
                     draft_params=init_params(other, jax.random.key(0)))
    heads = MedusaHeads(num_heads=3, d_model=64, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="another target"):
        api.generate(model, params, PROMPTS, method="medusa", heads=heads, heads_params={})
    with pytest.raises(ValueError, match="tree spec"):
        api.generate(model, params, PROMPTS, method="lookup", tree="chain:x")
    with pytest.raises(ValueError, match="tree depth"):
        api.generate(model, params, PROMPTS, **{**methods["medusa"], "tree": "chain:5"})
    with pytest.raises(ValueError, match="granularity"):
        api.generate(model, params, PROMPTS, method="matformer", granularity=5)
    with pytest.raises(ValueError, match="every prompt"):
        engine.pad_prompts([[1], []])
