"""Token recycling: the adjacency matrix of the target's top-k successors is written from known logits and drives
the next proposal; the engine seeds it from the prefill and refreshes it from every verification; greedy output
equals autoregressive decoding, and a repetitive text is drafted well."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.config import ConfigError
from jaxspec.decoding import engine, methods
from jaxspec.decoding.drafters import Context
from jaxspec.decoding.method import Target
from jaxspec.decoding.methods.recycling import UNSET, RecyclingDrafter
from jaxspec.decoding.trees import tree_from_spec

V = 16


def context(root):
    root = jnp.asarray(root, jnp.int32)
    b = root.shape[0]
    return Context(root, jnp.zeros((b, 8), jnp.int32), jnp.ones((b,), jnp.int32), jnp.zeros((b, 4)),
                   jax.random.key(0), 0.0)


def logits_ranking(*rankings):
    """Logits [1, N, V] whose top tokens, best first, are each given ranking."""
    logits = np.zeros((1, len(rankings), V), np.float32)
    for i, ranking in enumerate(rankings):
        logits[0, i, list(ranking)] = np.arange(len(ranking), 0, -1)
    return jnp.asarray(logits)


def test_a_fresh_matrix_drafts_nothing():
    drafter = RecyclingDrafter(tree_from_spec("branching:2,1"), V)
    assert drafter.feedback_top_k == 2
    matrix = drafter.init((), jnp.zeros((2, 5), jnp.int32), jnp.asarray([5, 3]), 32, jnp.asarray([1, 2]))
    assert matrix.shape == (2, V, 2) and np.all(np.asarray(matrix) == UNSET)
    prop = drafter.propose((), matrix, context([3, 4]))
    assert np.asarray(prop.node_valid).tolist() == [[True, False, False, False, False]] * 2
    assert np.asarray(prop.tokens)[:, 0].tolist() == [3, 4]


def test_rows_written_from_known_logits_drive_the_next_proposal():
    # branching:2,1 -> nodes: root, its top-1 and top-2 successors, then the top-1 successor of each.
    drafter = RecyclingDrafter(tree_from_spec("branching:2,1"), V)
    matrix = drafter.init((), jnp.zeros((1, 1), jnp.int32), jnp.ones((1,)), 8, jnp.zeros((1,)))
    logits = logits_ranking((5, 7, 1), (9, 1), (2, 4))
    top = jax.lax.top_k(logits, drafter.feedback_top_k)[1]
    matrix = drafter.observe(matrix, jnp.asarray([[3, 5, 7]]), top, jnp.ones((1, 3), bool))
    assert np.asarray(matrix[0, 3]).tolist() == [5, 7] and np.asarray(matrix[0, 7]).tolist() == [2, 4]
    prop = drafter.propose((), matrix, context([3]))
    assert np.asarray(prop.tokens).tolist() == [[3, 5, 7, 9, 2]]
    assert np.all(np.asarray(prop.node_valid))
    assert prop.draft_probs is None and prop.state is matrix
    # A root whose row is unset drafts nothing below it; a row that is set but whose children's rows are not
    # drafts only the first level.
    prop = drafter.propose((), jnp.concatenate([matrix, matrix]), context([5, 9]))
    assert np.asarray(prop.node_valid).tolist() == [[True, True, True, False, False], [True] + [False] * 4]
    assert np.asarray(prop.tokens)[0, 1:3].tolist() == [9, 1]
    assert np.asarray(drafter.update(matrix, jnp.zeros((1, 5), jnp.int32), jnp.ones((1,)))).tolist() == \
        np.asarray(matrix).tolist()


def test_observe_keeps_the_last_valid_occurrence_per_row():
    drafter = RecyclingDrafter(tree_from_spec("chain:2"), V)
    matrix = drafter.init((), jnp.zeros((2, 1), jnp.int32), jnp.ones((2,)), 8, jnp.zeros((2,)))
    tokens = jnp.asarray([[4, 6, 4, 4], [4, 6, 4, 4]])
    successors = jnp.asarray([[[1], [2], [3], [8]], [[1], [2], [3], [8]]])
    valid = jnp.asarray([[True, True, True, False], [True, False, False, False]])
    matrix = drafter.observe(matrix, tokens, successors, valid)
    # Row 0: token 4 last valid at position 2 (position 3 is invalid); row 1: only position 0 counts.
    assert np.asarray(matrix[:, 4, 0]).tolist() == [3, 1]
    assert np.asarray(matrix[:, 6, 0]).tolist() == [2, UNSET]
    assert np.sum(np.asarray(matrix) != UNSET) == 3
    # Later rounds overwrite a row; other rows keep theirs.
    matrix = drafter.observe(matrix, jnp.asarray([[6], [0]]), jnp.asarray([[[9]], [[5]]]), jnp.ones((2, 1), bool))
    assert np.asarray(matrix[:, 6, 0]).tolist() == [9, UNSET] and np.asarray(matrix[:, 0, 0]).tolist() == [UNSET, 5]
    with pytest.raises(ValueError, match="keeps 1 successors per token"):
        drafter.observe(matrix, tokens, jnp.zeros((2, 4, 3), jnp.int32), valid)


@dataclasses.dataclass(frozen=True)
class RecordingRecycler(RecyclingDrafter):
    """Token recycling that hands every `observe` and `propose` of the decode loop to the host."""

    def observe(self, matrix, tokens, successors, valid):
        jax.debug.callback(lambda *a: CALLS.append(("observe",) + tuple(map(np.asarray, a))), tokens, successors,
                           valid, ordered=True)
        return super().observe(matrix, tokens, successors, valid)

    def propose(self, params, matrix, ctx):
        prop = super().propose(params, matrix, ctx)
        jax.debug.callback(lambda *a: CALLS.append(("propose",) + tuple(map(np.asarray, a))), prop.tokens,
                           prop.node_valid, ordered=True)
        return prop


CALLS: list = []


def test_the_engine_seeds_from_the_prefill_and_feeds_back_every_verification(make_model, full_logits):
    model, params = make_model("A", seed=3, max_len=64)
    prompts = [[5, 9, 2, 5, 9, 2, 5], [7, 1]]
    drafter = RecordingRecycler(tree_from_spec("branching:2,1"), 64)
    CALLS.clear()
    tokens, lens = engine.pad_prompts(prompts)
    out = engine.speculative_loop(model, params, drafter, (), tokens, lens, jax.random.key(0), max_new=6,
                                  max_len=32, sampling=engine.Sampling())
    jax.block_until_ready(out)
    kinds = [c[0] for c in CALLS]
    assert kinds[0] == "observe" and kinds[1:] == ["propose", "observe"] * int(np.max(out.target_steps))
    _, seen, successors, valid = CALLS[0]
    assert seen.tolist() == tokens.tolist()
    assert valid.tolist() == [[True] * 7, [True, True] + [False] * 5]
    reference = [jax.lax.top_k(x, 2)[1] for x in full_logits(model, params, prompts)]
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(successors[row, :len(prompt)], reference[row])
    # The first proposal reads the seeded rows: below the root, the successors of its last prompt occurrence.
    _, proposed, node_valid = CALLS[1]
    for row, prompt in enumerate(prompts):
        root = proposed[row, 0]
        if root in prompt:
            last = len(prompt) - 1 - prompt[::-1].index(root)
            assert proposed[row, 1:3].tolist() == reference[row][last].tolist()
            assert node_valid[row, 1:3].all()
        else:
            assert not node_valid[row, 1:].any()
    # Each round scores the proposed tree: the drafted nodes of running rows.
    _, scored, _, scored_valid = CALLS[2]
    np.testing.assert_array_equal(scored, proposed)
    assert (scored_valid <= node_valid).all()


@pytest.mark.parametrize("pattern", ["A", "ALM"])
def test_greedy_recycling_equals_autoregressive(make_model, ar_and_method, pattern):
    model, params = make_model(pattern, seed=5, max_len=64)
    prompts = [[4, 4, 4, 4, 4, 4], [5, 6, 7], [1, 2, 3, 1, 2, 3, 1, 2], [9, 8, 7, 6, 5, 4, 3]]
    ar, out = ar_and_method(model, params, prompts, 16, "recycling")
    assert out.tokens == ar.tokens
    assert np.all(out.accepted >= out.target_steps) and np.all(out.target_steps <= ar.target_steps)
    if pattern == "A":
        # This model loops on rows 0 and 2: the recycled successors draft those loops.
        assert np.all(out.accepted[[0, 2]] > 2 * out.target_steps[[0, 2]])
        for row in ([prompts[1]], [prompts[3]]):  # a batch of one, with a chain
            ar, out = ar_and_method(model, params, row, 16, "recycling", tree="chain:3")
            assert out.tokens == ar.tokens


def test_spec_fields_and_build(make_model):
    spec = methods.make("recycling")
    assert spec.tree_spec == "branching:2,1,1" and spec.lossless and spec.needs == "nothing"
    model, params = make_model("A", seed=5, max_len=64)
    drafter, draft_params = methods.make("recycling", tree="chain:3").build(Target(model, params))
    assert drafter.vocab_size == 64 and drafter.feedback_top_k == 1 and draft_params == ()
    with pytest.raises(ConfigError, match="method 'recycling': tree='chain:0' is not allowed: a tree with at least"):
        methods.make("recycling", tree="chain:0")
    with pytest.raises(ConfigError, match="method 'recycling' takes no argument 'slots'"):
        methods.make("recycling", slots=4)
    with pytest.raises(ValueError, match="vocab_size >= 1"):
        RecyclingDrafter(tree_from_spec("chain:2"), 0)
