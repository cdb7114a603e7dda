"""Self-drafting over the target's own cache (jaxspec/decoding/gated_draft.py; methods del and swift): the layer
gate in tree forwards equals static skipping, greedy output is the autoregressive output, drafting leaves the
target's state as it was and with every layer on drafts the target's own continuation, and the gate policies'
statistics follow a plain Python reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.config import ConfigError
from jaxspec.decoding import api, gated_draft, methods
from jaxspec.decoding.drafters import Context
from jaxspec.decoding.method import Target
from jaxspec.decoding.methods import swift
from jaxspec.decoding.trees import tree_from_spec
from jaxspec.errors import InputError
from jaxspec.models.decode_layout import for_decoding
from jaxspec.state import init_decode_state

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [5, 5, 6, 5, 5, 6], [3, 1]]
MAX_NEW = 12
HYBRID = ("ALM", {"mamba": {"ffn": True}})  # tests/conftest.py's hybrid case: attention, linear, Mamba


def greedy_reference(final_logits, model, params, prompts, max_new):
    """Each prompt's greedy continuation from full forwards (one compiled shape for every call; the all-on layer
    gate, traced, makes it the program the gated references below compile too)."""
    seqs = [list(p) for p in prompts]
    every_layer = jnp.ones(model.model_cfg.n_layers, bool)
    for _ in range(max_new):
        for seq, token in zip(seqs, final_logits(model, params, seqs, layer_gate=every_layer).argmax(-1)):
            seq.append(int(token))
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


def test_tree_forward_layer_gate_equals_full_forwards(make_model, final_logits):
    """Each node of a gated tree forward over a decode state filled with the same gate has the logits of a gated
    full forward of its path (the skip-search tests check gated full forwards against static skipping)."""
    model, params = make_model(HYBRID[0], **HYBRID[1])
    prompt, tokens, parents = PROMPTS[0], [4, 9, 2, 7], [-1, 0, 0, 1]
    paths = [[4], [4, 9], [4, 2], [4, 9, 7]]  # each node's tokens from the root

    @jax.jit
    def tree_logits(gate):
        state = init_decode_state(model.model_cfg, 1, 32)
        _, state = model.apply({"params": params}, jnp.asarray([prompt]), state=state, fresh=True, layer_gate=gate)
        logits, pending = model.apply({"params": params}, jnp.asarray([tokens]), state=state, parents=parents,
                                      layer_gate=gate)
        return logits[0], pending.lengths

    for skip in [(1,), (0, 2)]:
        gate = np.ones(3, bool)
        gate[list(skip)] = False
        logits, lengths = tree_logits(jnp.asarray(gate))
        reference = final_logits(model, params, [prompt + p for p in paths], layer_gate=jnp.asarray(gate))
        np.testing.assert_allclose(logits, reference, atol=1e-5)
        assert int(lengths[0]) == len(prompt)  # a tree forward commits nothing


# Each method over 1 and 4 rows, on an attention and on the hybrid target (rows choose their own exits and draft
# lengths, or search their own skip sets), a chain and a branching tree: four compiled decode loops.
@pytest.mark.parametrize("pattern, method, batch, fields", [
    ("attention", "del", 4, dict(tree="chain:2", exit_layers=(1, 2))),
    ("hybrid", "del", 1, dict(tree="branching:2,1", exit_layers=(1, 2))),
    ("hybrid", "swift", 1, dict(tree="branching:2,1", skip_ratio=0.34, search_rounds=6, trial_rounds=1)),
    ("attention", "swift", 4, dict(tree="chain:2", skip_ratio=0.5, search_rounds=4, trial_rounds=1)),
    ("attention", "swift", 4, dict(tree="branching:2,1", skip_ratio=0.5, search_rounds=6, context_window=5)),
])
def test_greedy_output_is_the_autoregressive_output(make_model, final_logits, pattern, method, batch, fields):
    # Four attention layers: SWIFT may skip only inner layers (the first and the last always run).
    model, params = make_model(*HYBRID[:1], **HYBRID[1]) if pattern == "hybrid" else make_model("AAAA")
    prompts = PROMPTS[:batch]
    out = api.generate(model, params, prompts, method=method, max_new_tokens=MAX_NEW, **fields)
    assert out.tokens == greedy_reference(final_logits, model, params, prompts, MAX_NEW)


def test_context_match_is_the_gated_targets_greedy_hit_rate_on_the_last_tokens(make_model):
    """SWIFT's context score from the rewound cache equals a chain forward from a state that only ever held the
    tokens before the window; a row shorter than the window scores the tokens it has."""
    model, params = make_model("AAAA")
    dmodel, dparams = for_decoding(model, params)
    # The target's own greedy replies (the root last), so that predictions hit: a 9-token and a 5-token context.
    prompts = [[5, 9, 2], [7, 1]]
    replies = api.generate(model, params, prompts, max_new_tokens=7).tokens
    rows = [prompts[0] + replies[0], prompts[1] + replies[1][:4]]
    window, gate = 6, jnp.asarray([True, False, True, True])

    def reference(row, gate):
        committed = len(row) - 1
        start = max(committed - window, 0)
        state = init_decode_state(dmodel.model_cfg, 1, 32)
        if start:
            _, state = dmodel.apply({"params": dparams}, jnp.asarray([row[:start]]), state=state, fresh=True)
        chain = row[start:committed]
        logits, _ = dmodel.apply({"params": dparams}, jnp.asarray([chain]), state=state,
                                 parents=np.arange(len(chain)) - 1, layer_gate=gate)
        return np.mean(np.argmax(logits[0], -1) == np.asarray(row[start + 1:]))

    committed = np.asarray([len(r) - 1 for r in rows], np.int32)
    seq = np.zeros((2, 16), np.int32)
    for i, row in enumerate(rows):
        seq[i, :len(row)] = row
    state = init_decode_state(dmodel.model_cfg, 2, 32)
    _, state = dmodel.apply({"params": dparams}, jnp.asarray(seq[:, :9]), state=state, num_new=committed,
                            fresh=True)
    for g in (gate, jnp.ones(4, bool)):
        match = gated_draft.context_match(dmodel, dparams, state, jnp.asarray(seq), jnp.asarray(committed + 1),
                                          jnp.broadcast_to(g, (2, 4)), window)
        np.testing.assert_allclose(match, [reference(r, g) for r in rows], atol=1e-6)
    # Every layer on, the replies are the target's own greedy tokens: the 9-token row's window holds reply tokens
    # only, the 5-token row's also the prompt's second token, which the model did not choose.
    assert float(match[0]) == 1.0 and float(match[1]) >= 0.8
    gated = gated_draft.context_match(dmodel, dparams, state, jnp.asarray(seq), jnp.asarray(committed + 1),
                                      jnp.broadcast_to(gate, (2, 4)), window)
    assert float(gated[0]) < 1.0  # the skipped layer changes some predictions: the score tells sets apart


def test_context_scoring_is_refused_where_the_cache_cannot_be_rewound(make_model):
    model, params = make_model(HYBRID[0], **HYBRID[1])
    with pytest.raises(ConfigError, match=r"context_window=4 .* recurrent layers \['L', 'M'\]"):
        api.generate(model, params, PROMPTS[:1], method="swift", max_new_tokens=2, skip_ratio=0.34,
                     context_window=4)
    model, params = make_model("AAAA")
    with pytest.raises(InputError, match="plain KV caches in every layer; this decode state has"):
        api.generate(model, params, [[1, 2, 3, 4], [1, 2, 3, 5]], method="swift", max_new_tokens=2,
                     skip_ratio=0.5, context_window=4, shared_prefix=True)


def test_a_searched_skip_set_carries_over_to_the_next_request(make_model):
    model, params = make_model("AAAAA")
    first = api.generate(model, params, PROMPTS[:2], method="swift", max_new_tokens=MAX_NEW, tree="chain:2",
                         skip_ratio=0.4, search_rounds=4, trial_rounds=1)
    sets = swift.searched_skip_layers(first)
    assert first.drafter_report["skip_layers"].shape == (2, 5)
    assert all(len(s) == 2 and set(s) <= {1, 2, 3} for s in sets)  # the ratio's 2 layers, never the first or last
    # The next request starts from row 0's set; without a search it keeps it, and decodes the same tokens as AR.
    then = api.generate(model, params, PROMPTS[2:], method="swift", max_new_tokens=MAX_NEW, tree="chain:2",
                        skip_layers=sets[0], search_rounds=0)
    assert swift.searched_skip_layers(then) == [sets[0]] * 2
    assert then.tokens == api.generate(model, params, PROMPTS[2:], max_new_tokens=MAX_NEW).tokens
    with pytest.raises(InputError, match="method 'lookup' reports no searched skip sets"):
        swift.searched_skip_layers(api.generate(model, params, PROMPTS[:1], method="lookup", max_new_tokens=2))


def test_propose_leaves_the_target_state_and_the_full_gate_drafts_the_target_continuation(make_model, final_logits):
    model, params = make_model("AA")
    dmodel, dparams = for_decoding(model, params)
    tree = tree_from_spec("branching:2,2")
    drafter = gated_draft.GatedSelfDrafter(dmodel, tree, gated_draft.FixedGate((True,) * 2, tree.max_depth))
    prompts = [PROMPTS[0], PROMPTS[2] + [0]]
    lens = jnp.asarray([7, 6])
    root = greedy_reference(final_logits, model, params, [PROMPTS[0], PROMPTS[2]], 1)
    root = np.asarray(root)[:, 0]
    ctx = Context(jnp.asarray(root, jnp.int32), None, None, None, jax.random.key(0), 0.0)
    dstate = drafter.init((), jnp.asarray(prompts), lens, 32, ctx.root)

    @jax.jit
    def prefill():
        state = init_decode_state(model.model_cfg, 2, 32)
        return dmodel.apply({"params": dparams}, jnp.asarray(prompts), state=state, num_new=lens, fresh=True)[1]

    state = prefill()
    before = [np.asarray(x).copy() for x in jax.tree.leaves(state)]
    prop = jax.jit(lambda s: drafter.propose((), dstate, ctx, target_state=s, target_params=dparams))(state)
    for leaf, old in zip(jax.tree.leaves(state), before, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), old)
    # Node 1 is the top child of the root and node 3 the top child of node 1: the greedy continuation, so every
    # draft of that path is accepted (tau = depth + 1).
    greedy = greedy_reference(final_logits, model, params, [PROMPTS[0] + [int(root[0])],
                                                            PROMPTS[2] + [int(root[1])]], 2)
    np.testing.assert_array_equal(np.asarray(prop.tokens)[:, [1, 3]], greedy)
    assert np.asarray(prop.node_valid).all()


def _exit_reference(exits, n_layers, node_counts, costs, decay, rounds):
    """ExitPolicy in plain Python for one row: the (exit, draft length) chosen each round and the final counts."""
    depth = len(node_counts) - 1
    hits = [[0.0] * depth for _ in exits]
    tries = [[0.0] * depth for _ in exits]
    chosen = []
    for accepted, live in rounds:
        best = None
        for e, exit_layer in enumerate(exits):
            survive, tokens = 1.0, 1.0
            for g in range(1, depth + 1):
                survive *= (hits[e][g - 1] + 1) / (tries[e][g - 1] + 1)
                tokens += survive
                value = tokens / (g * exit_layer / n_layers + gated_draft.verify_cost(node_counts[g], costs))
                if best is None or value > best[0]:
                    best = (value, e, g)
        _, e, g = best
        chosen.append((exits[e], g))
        if not live:
            continue
        for i in range(len(exits)):
            for d in range(1, depth + 1):
                tried = i == e and d <= g and d <= accepted + 1
                hits[i][d - 1] = decay * hits[i][d - 1] + (tried and d <= accepted)
                tries[i][d - 1] = decay * tries[i][d - 1] + tried
    return chosen, hits, tries


def test_exit_policy_statistics_follow_a_python_reference():
    tree = tree_from_spec("chain:3")
    policy = gated_draft.ExitPolicy(8, (3, 5, 8), tuple(gated_draft.nodes_within(tree)), (1.0, 1.3, 1.9), 0.7)
    rows = [[(0, True), (3, True), (1, True), (0, False), (2, True), (0, True), (1, True), (3, True)],
            [(2, True), (2, True), (0, True), (0, True), (1, True), (3, True), (0, True), (2, True)]]
    stats = policy.init(2, jax.random.key(0))
    chosen = []
    for r in range(len(rows[0])):
        gate, draft_len = policy.choose(stats)
        exit_layers = np.asarray(gate).sum(-1)
        chosen.append(list(zip(exit_layers.tolist(), np.asarray(draft_len).tolist())))
        accepted = jnp.asarray([row[r][0] for row in rows])
        stats = policy.observe(stats, accepted, jnp.asarray([row[r][1] for row in rows]))
    for i, row in enumerate(rows):
        want, hits, tries = _exit_reference((3, 5, 8), 8, (1, 2, 3, 4), (1.0, 1.3, 1.9), 0.7, row)
        assert [c[i] for c in chosen] == want
        np.testing.assert_allclose(stats["hits"][i], hits, rtol=1e-5)
        np.testing.assert_allclose(stats["tries"][i], tries, rtol=1e-5)
    assert len({c for row in zip(*chosen) for c in row}) > 1  # the choice moves with the measurements


def test_verify_cost_interpolates_the_measured_table():
    costs = (1.0, 1.5, 2.0, 4.0)  # K = 1, 2, 4, 8
    assert [gated_draft.verify_cost(k, costs) for k in (1, 2, 3, 6, 8, 10)] == [1.0, 1.5, 1.75, 3.0, 4.0, 5.0]


def test_skip_search_policy_follows_a_python_reference():
    pool = (False, True, True, True, True, False)
    policy = gated_draft.SkipSearchPolicy(pool, 2, 3, (False, True, True, False, False, False), search_rounds=7,
                                          trial_rounds=2)
    accepted = [1, 3, 2, 0, 3, 3, 0, 1, 1, 2]
    live = [True, True, True, False, True, True, True, True, True, True]
    stats = policy.init(1, jax.random.key(3))
    best, best_score, candidate, trial, rounds = {1, 2}, -np.inf, {1, 2}, [], 0
    for a, alive in zip(accepted, live):
        gate, _ = policy.choose(stats)
        in_search = rounds < 7
        assert set(np.flatnonzero(~np.asarray(gate)[0])) == (candidate if in_search else best)
        stats = policy.observe(stats, jnp.asarray([a]), jnp.asarray([alive]))
        if not alive:
            continue
        if in_search:
            trial.append(a)
            if len(trial) == 2:
                if np.mean(trial) > best_score:
                    best, best_score = candidate, np.mean(trial)
                trial = []
                new = set(np.flatnonzero(np.asarray(stats["candidate"])[0]).tolist())
                # a mutation: one layer of the pool swapped for another, the size kept
                assert len(new) == 2 and len(new - best) == 1 and new <= set(np.flatnonzero(pool))
                candidate = new
        rounds += 1
        assert set(np.flatnonzero(np.asarray(stats["best"])[0])) == best
        assert float(stats["best_score"][0]) == best_score
        assert int(stats["round"][0]) == rounds


def test_bad_fields_are_refused_by_name(make_model):
    model, params = make_model("AA")
    target = Target(model, params)
    with pytest.raises(ConfigError, match=r"exit_layers=\(5,\) is not allowed: exits in \[1, 2\]"):
        methods.make("del", exit_layers=(5,)).build(target)
    with pytest.raises(ConfigError, match="exit_layers"):
        methods.make("del", exit_layers=(0, 2))
    with pytest.raises(ConfigError, match="decay=1.0"):
        methods.make("del", decay=1.0)
    with pytest.raises(ConfigError, match="verify_costs"):
        methods.make("del", verify_costs=(1.0, -2.0))
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match=f"skip_ratio={ratio}"):
            methods.make("swift", skip_ratio=ratio)
    with pytest.raises(ConfigError, match="skip_ratio=0.1 .* it skips 0"):
        methods.make("swift", skip_ratio=0.1).build(target)
    with pytest.raises(ConfigError, match="search_rounds"):
        methods.make("swift", search_rounds=-1)
    # command-line lists arrive as strings
    assert methods.make("del", exit_layers=["2", "1"], verify_costs=["1", "1.5"]).exit_layers == (1, 2)
