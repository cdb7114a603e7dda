"""The EAGLE feature drafter: its training-time unrolled tree equals drafting step by step, its proposals equal
greedy drafting recomputed from full forwards over the true (feature, token) history, and decoding with it is
exact. (Its sampled losslessness is in test_engine's depth-two distribution test.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import api, trees
from jaxspec.decoding.drafters import Context
from jaxspec.decoding.dynamic_tree import DynamicTree
from jaxspec.decoding.methods.eagle import EagleDrafter
from jaxspec.models.eagle import EagleNet, drafter_model_cfg, target_side, unrolled_parents


@pytest.fixture(scope="module")
def target(make_model):
    return make_model("A", seed=3, n_layers=2, max_len=64)


PAD = 24  # causal forwards over right-padded inputs: positions before the padding do not see it (one compile)


def padded_causal(fn):
    """fn(*arrays [1, T, ...]) -> [1, T, ...] causal, run on inputs right-padded to PAD: one compiled shape."""
    jitted = jax.jit(fn)

    def call(*arrays):
        t = arrays[0].shape[1]
        pad = lambda x: jnp.pad(x, ((0, 0), (0, PAD - t)) + ((0, 0),) * (x.ndim - 2))
        return jitted(*map(pad, arrays))[:, :t]

    return call


def eagle_net(target_model, seed: int = 0):
    net = EagleNet(drafter_model_cfg(target_model.model_cfg, 1))
    d = target_model.model_cfg.d_model
    params = net.init(jax.random.key(seed), jnp.zeros((1, 1, d)), jnp.zeros((1, 1, d)))["params"]
    # Away from the initialiser's zeros and ones, so every parameter matters.
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(seed + 1), x.shape), params)
    return net, params


def test_unrolled_parents_form_the_training_time_tree():
    parents = unrolled_parents(4, 3)
    assert parents.tolist() == [-1, 0, 1, 2,  # true pairs: a chain
                                -1, 0, 1, 2,  # depth 2 reads the true step's guess one position back
                                -1, -1, 5, 6]  # depth 3 reads depth 2's; (2, 0) and (2, 1) have no round


def test_unrolled_forward_equals_drafting_step_by_step(target):
    model, _ = target
    net, params = eagle_net(model)
    d, t, steps = model.model_cfg.d_model, 6, 3
    feats = jax.random.normal(jax.random.key(5), (1, t, d))
    embeds = jax.random.normal(jax.random.key(6), (1, t, d))
    full = padded_causal(lambda f, e: net.apply({"params": params}, f, e))  # plain causal forward, no state

    guesses = None
    for depth in range(1, steps + 1):  # the objective's recomputation, stage by stage
        inputs = [feats] + ([] if guesses is None else
                            list(jnp.pad(guesses[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0))).swapaxes(0, 1)))
        out = net.apply({"params": params}, jnp.concatenate(inputs, 1), jnp.tile(embeds, (1, depth, 1)),
                        parents=unrolled_parents(t, depth))
        guesses = out.reshape(1, depth, t, d)

    for s in range(steps):
        for i in range(s, t):
            # Node (s, i): the true pairs up to i - s, then s pairs of the drafter's own guesses.
            f, e = feats[:, :i - s + 1], embeds[:, :i - s + 1]
            for r in range(1, s + 1):
                guess = full(f, e)[:, -1:]
                f, e = jnp.concatenate([f, guess], 1), jnp.concatenate([e, embeds[:, i - s + r:i - s + r + 1]], 1)
            np.testing.assert_allclose(guesses[0, s, i], full(f, e)[0, -1], rtol=2e-4, atol=2e-5)


def greedy_reference(net, params, side, feats, tokens, tree):
    """Tokens of each node of `tree` drafted greedily from the true pairs (feats[i], tokens[i + 1]) of the
    history `tokens` (its last token the root), by full forwards: a node of sibling rank r takes the r-th best
    draft-vocabulary token of its parent's guessed feature."""
    embed = lambda ids: jnp.take(side["embedding"], jnp.asarray(ids), axis=0)[None]
    forward = padded_causal(lambda f, e: net.apply({"params": params}, f, e))
    full = lambda f, ids: forward(f, embed(ids))[0, -1]
    base_f, base_ids = feats[None, :len(tokens) - 1], list(tokens[1:])
    node_feat, node_tok, node_path = [full(base_f, base_ids)], [tokens[-1]], [[]]
    ranks = np.zeros(tree.num_nodes, int)
    for i in range(1, tree.num_nodes):
        p = tree.parents[i]
        ranks[i] = sum(1 for j in range(1, i) if tree.parents[j] == p)
        logits = np.asarray(side["head_t"] @ node_feat[p])
        tok = int(np.asarray(side["vocab_ids"])[np.argsort(-logits, kind="stable")[ranks[i]]])
        path = node_path[p] + [i]
        f = jnp.concatenate([base_f] + [node_feat[tree.parents[n]][None, None] for n in path], 1)
        ids = base_ids + [node_tok[n] if n != i else tok for n in path]
        node_feat.append(full(f, ids))
        node_tok.append(tok)
        node_path.append(path)
    return node_tok


@pytest.mark.parametrize("tree_spec", ["chain:3", "branching:2,2"])
def test_drafter_proposes_its_greedy_tree_over_rounds(target, tree_spec):
    """Two rows of different prompt lengths over three rounds: the drafter's state (its cache plus the lag of
    pairs whose true features arrived last round) must always stand for the whole history."""
    model, tparams = target
    net, params = eagle_net(model)
    vocab_ids = np.arange(0, 64, 2)  # a trimmed draft vocabulary: even ids only
    side = target_side(tparams, model.model_cfg, vocab_ids)
    dparams = {"net": params, **side}
    tree = trees.tree_from_spec(tree_spec)
    drafter = EagleDrafter(net, tree)
    hidden = padded_causal(lambda ids: model.apply({"params": tparams}, ids, return_hidden=True).hidden)
    features_of = lambda ids: hidden(jnp.asarray([ids], jnp.int32))[0]
    prompts, firsts = [[3, 1, 4, 1, 5], [9, 2, 6]], [7, 8]
    histories = [p + [f] for p, f in zip(prompts, firsts, strict=True)]
    padded = np.zeros((2, 5), np.int32)
    feats = np.zeros((2, 5, model.model_cfg.d_model), np.float32)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
        feats[row, :len(p)] = features_of(p)
    init = jax.jit(lambda p, prompts, lens, first, features: drafter.init(p, prompts, lens, 64, first, features))
    propose = jax.jit(lambda p, state, root: drafter.propose(
        p, state, Context(root, None, None, None, jax.random.key(0), 0.0)))
    update = jax.jit(drafter.update)
    dstate = init(dparams, jnp.asarray(padded), jnp.asarray([5, 3]), jnp.asarray(firsts), jnp.asarray(feats))
    rounds = [((1, 0), (11, 12)), ((0, 2), (13, 14)), ((2, 1), (15, 16))]
    for accepted, bonus in rounds:
        prop = propose(dparams, dstate, jnp.asarray([h[-1] for h in histories]))
        tokens = np.asarray(prop.tokens)
        for row, history in enumerate(histories):
            want = greedy_reference(net, params, side, features_of(history), history, tree)
            assert tokens[row].tolist() == want, (row, history)
        k = tree.num_nodes
        emitted, path_feats = np.zeros((2, k), np.int32), np.zeros((2, k, model.model_cfg.d_model), np.float32)
        for row in range(2):
            nodes = [1, 2] if tree_spec.startswith("chain") else [1, 3]  # a root path in both trees
            path = [int(tokens[row, n]) for n in nodes[:accepted[row]]]
            before = len(histories[row]) - 1  # the root's position
            histories[row] += path + [bonus[row]]
            # The verification forward's features at the path's nodes: root, then the accepted drafts.
            path_feats[row, :len(path) + 1] = features_of(histories[row][:before + len(path) + 1])[before:]
            emitted[row, :len(path) + 1] = path + [bonus[row]]
        dstate = update(prop.state, jnp.asarray(emitted), jnp.asarray([a + 1 for a in accepted]),
                        features=jnp.asarray(path_feats))


def test_decoding_with_eagle_equals_autoregressive(target):
    model, tparams = target
    net, params = eagle_net(model)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9], [4, 4, 4, 4, 4, 4]]
    ar = api.generate(model, tparams, prompts, method="ar", max_new_tokens=24)
    for tree in ("chain:4", "branching:3,2"):
        out = api.generate(model, tparams, prompts, method="eagle", tree=tree, net=net, net_params=params,
                           vocab_ids=np.arange(40), max_new_tokens=24)
        assert out.tokens == ar.tokens, tree


def test_bad_requests_are_refused(target):
    model, tparams = target
    net, params = eagle_net(model)
    with pytest.raises(ValueError, match="draft_workdir"):
        api.generate(model, tparams, [[1, 2]], method="eagle")
    with pytest.raises(ValueError, match=r"vocab_ids must be distinct target ids in \[0, 64\)"):
        api.generate(model, tparams, [[1, 2]], method="eagle", net=net, net_params=params, vocab_ids=[3, 64])


def test_dynamic_tree_decoding_equals_autoregressive(target):
    model, tparams = target
    net, params = eagle_net(model)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9]]
    ar = api.generate(model, tparams, prompts, method="ar", max_new_tokens=20)
    out = api.generate(model, tparams, prompts, method="eagle", expand=3, depth=3, nodes=6, net=net,
                       net_params=params, vocab_ids=np.arange(40), max_new_tokens=20)
    assert out.tokens == ar.tokens


def dynamic_reference(net, params, side, feats, history, expand, depth, nodes):
    """EAGLE-2's tree from full forwards: per level the `expand` best expansions of the last level's nodes by
    summed draft log-probability, then the `nodes` best of all. Returns the chosen drafts as token paths."""
    embed = lambda ids: jnp.take(side["embedding"], jnp.asarray(ids), axis=0)[None]
    forward = padded_causal(lambda f, e: net.apply({"params": params}, f, e))
    vocab = np.asarray(side["vocab_ids"])
    base_f, base_ids = feats[None, :len(history) - 1], list(history[1:])
    guess = {}  # token path below the root -> the drafter's guessed feature at that node

    def feature(path):
        if path not in guess:  # node j of the path reads the guessed feature of node j - 1 (the root: ())
            f = jnp.concatenate([base_f] + [feature(path[:j])[None, None] for j in range(len(path))], 1)
            guess[path] = forward(f, embed(base_ids + list(path)))[0, -1]
        return guess[path]

    level, pool = [((), 0.0)], {}
    for _ in range(depth):
        candidates = []
        for path, score in level:
            logp = np.asarray(jax.nn.log_softmax(side["head_t"] @ feature(path)))
            candidates += [(path + (int(vocab[i]),), score + float(logp[i]))
                           for i in np.argsort(-logp, kind="stable")[:expand]]
        level = sorted(candidates, key=lambda c: -c[1])[:expand]
        pool.update(level)
    return {path for path, _ in sorted(pool.items(), key=lambda kv: -kv[1])[:nodes]}


@pytest.mark.parametrize("expand,depth,nodes", [(1, 3, 3), (3, 3, 7)])
def test_dynamic_tree_is_eagle2s_tree(target, tree_paths, expand, depth, nodes):
    model, tparams = target
    net, params = eagle_net(model)
    side = target_side(tparams, model.model_cfg, np.arange(0, 64, 2))
    dparams = {"net": params, **side}
    drafter = EagleDrafter(net, trees.chain(nodes), DynamicTree(expand, depth, nodes))
    hidden = padded_causal(lambda ids: model.apply({"params": tparams}, ids, return_hidden=True).hidden)
    prompt, first = [3, 1, 4, 1, 5, 9], 7
    feats = hidden(jnp.asarray([prompt], jnp.int32))
    dstate = drafter.init(dparams, jnp.asarray([prompt]), jnp.asarray([6]), 32, jnp.asarray([first]), feats)
    prop = jax.jit(lambda p, s: drafter.propose(p, s, Context(jnp.asarray([first]), None, None, None,
                                                               jax.random.key(0), 0.0)))(dparams, dstate)
    tokens, parents = np.asarray(prop.tokens)[0], np.asarray(prop.parents)[0]
    assert parents[0] == -1 and all(0 <= parents[i] < i for i in range(1, nodes + 1))
    paths = tree_paths(tokens, parents)
    history = prompt + [first]
    want = dynamic_reference(net, params, side, hidden(jnp.asarray([history], jnp.int32))[0], history, expand,
                             depth, nodes)
    assert set(paths) == want and len(paths) == len(want)


def test_a_planted_exact_drafter_reaches_tau_depth_plus_one(make_model):
    """A target whose layers add nothing (o_proj and down_proj zero): its feature at t is its final norm of
    embed(x_t), and an EAGLE net planted to output the final norm of its input token's embedding guesses every
    next feature exactly, so every draft is accepted: tau = depth + 1 on a chain and on a dynamic tree."""
    model, params = make_model("A", seed=4, max_len=64)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if any(getattr(k, "key", "") in ("o_proj", "down_proj") for k in path)
        else x, params)
    params["embed"]["embedding"] = params["embed"]["embedding"] * 8.0  # peaked: the greedy path scores best
    net, planted = eagle_net(model)
    d = model.model_cfg.d_model
    planted["fuse"] = {"kernel": jnp.concatenate([jnp.zeros((d, d)), jnp.eye(d)]), "bias": jnp.zeros((d,))}
    planted["layer_0"]["attn"]["o_proj"]["kernel"] = jnp.zeros((d, d))
    planted["layer_0"]["ffn"]["down_proj"] = jnp.zeros_like(planted["layer_0"]["ffn"]["down_proj"])
    planted["norm"]["scale"] = params["final_norm"]["scale"]
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    ar = api.generate(model, params, prompts, max_new_tokens=21)
    for options in (dict(tree="chain:4"), dict(expand=2, depth=4, nodes=6)):
        out = api.generate(model, params, prompts, method="eagle", net=net, net_params=planted, max_new_tokens=21,
                           **options)
        assert out.tokens == ar.tokens
        assert out.target_steps.tolist() == [4, 4] and out.accepted.tolist() == [20, 20], options
