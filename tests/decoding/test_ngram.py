"""Adaptive n-gram drafting: hashed tri-gram / bi-gram successor counts of the context and the output, the draft
tree filled from the most frequent continuations, state bookkeeping over rounds, greedy output equal to
autoregressive decoding, and repetitive text drafted well."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.config import ConfigError
from jaxspec.decoding import methods
from jaxspec.decoding.drafters import Context
from jaxspec.decoding.method import Target
from jaxspec.decoding.methods.ngram import (
    EMPTY,
    NgramDrafter,
    bucket_of,
    count_successor,
    empty_counts,
    ranked_successors,
)
from jaxspec.decoding.trees import tree_from_spec

a, b, c, d, w, x, y, z = range(3, 11)  # token ids of the example texts


@functools.cache
def compiled(drafter):
    """(init, propose, update) of `drafter`, jitted once per drafter."""

    def propose(state, roots):
        rows = roots.shape[0]
        ctx = Context(roots, jnp.zeros((rows, 8), jnp.int32), jnp.ones((rows,), jnp.int32), jnp.zeros((rows, 4)),
                      jax.random.key(0), 0.0)
        prop = drafter.propose((), state, ctx)
        return prop.tokens, prop.node_valid

    return (jax.jit(lambda prompts, lens, first: drafter.init((), prompts, lens, 64, first)), jax.jit(propose),
            jax.jit(drafter.update))


def start(drafter, texts, width=16):
    """The drafter state after committing each text (its last token plays the first emitted token)."""
    prompts = np.zeros((len(texts), width), np.int32)
    for i, t in enumerate(texts):
        prompts[i, :len(t) - 1] = t[:-1]
    lens = jnp.asarray([len(t) - 1 for t in texts])
    return compiled(drafter)[0](jnp.asarray(prompts), lens, jnp.asarray([t[-1] for t in texts]))


def propose(drafter, state, roots):
    tokens, valid = compiled(drafter)[1](state, jnp.asarray(roots, jnp.int32))
    return np.asarray(tokens), np.asarray(valid)


def test_a_repeated_bigram_proposes_what_followed_it():
    drafter = NgramDrafter(tree_from_spec("chain:3"), buckets=256, slots=2)
    state = start(drafter, [[a, b, c, a, b]])
    tokens, valid = propose(drafter, state, [b])
    # After "a b": c (tri-gram a b -> c), then b c -> a, then c a -> b.
    assert tokens.tolist() == [[b, c, a, b]] and valid.all()


def test_an_unseen_trigram_falls_back_to_the_bigram():
    drafter = NgramDrafter(tree_from_spec("chain:2"), buckets=256, slots=2)
    state = start(drafter, [[x, y, z, w, y]])
    tokens, valid = propose(drafter, state, [y])
    # "w y" never occurred before: y -> z from the bi-gram; then "y z" -> w from the tri-gram.
    assert tokens.tolist() == [[y, z, w]] and valid.all()
    # A token never seen before drafts nothing.
    state = start(drafter, [[x, y, z, w, d]])
    tokens, valid = propose(drafter, state, [d])
    assert valid.tolist() == [[True, False, False]]


def test_children_are_ranked_by_count_then_recency_trigram_first():
    drafter = NgramDrafter(tree_from_spec("branching:3"), buckets=256, slots=3)
    # "a b" -> c twice and -> d once (the latest); "b" -> x once (after "w b", not after "a b").
    state = start(drafter, [[a, b, c, a, b, c, w, b, x, a, b, d, a, b]])
    tokens, valid = propose(drafter, state, [b])
    assert tokens.tolist() == [[b, c, d, x]] and valid.all()
    # Equal counts: the most recent first.
    state = start(drafter, [[a, b, c, a, b, d, a, b]])
    tokens, valid = propose(drafter, state, [b])
    assert tokens[0, 1:3].tolist() == [d, c] and valid.tolist() == [[True, True, True, False]]


def reference_counts(text):
    trigrams, bigrams = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for i, t in enumerate(text):
        if i >= 1:
            bigrams[(text[i - 1],)][t] += 1
        if i >= 2:
            trigrams[(text[i - 2], text[i - 1])][t] += 1
    return trigrams, bigrams


def assert_counts_match(state, row, text, buckets):
    for table, reference in zip((state.trigrams, state.bigrams), reference_counts(text), strict=True):
        contexts = list(reference)
        h = np.asarray(bucket_of(jnp.asarray(contexts, jnp.int32), buckets))
        assert len(set(h.tolist())) == len(contexts), "the test texts must not collide in the table"
        succ = np.asarray(ranked_successors(jax.tree.map(lambda x: x[row:row + 1], table),
                                            jnp.asarray([contexts], jnp.int32)))[0]
        for context, ranked in zip(contexts, succ, strict=True):
            counted = reference[context]
            assert sorted(t for t in ranked.tolist() if t != EMPTY) == sorted(counted), context
            assert [counted[t] for t in ranked if t != EMPTY] == sorted(counted.values(), reverse=True), context


def test_counts_follow_every_committed_token_over_rounds():
    drafter = NgramDrafter(tree_from_spec("chain:4"), buckets=1 << 12, slots=6)
    rng = np.random.default_rng(0)
    texts = [rng.integers(0, 5, 9).tolist(), rng.integers(0, 5, 4).tolist()]
    state = start(drafter, texts)
    assert np.asarray(state.length).tolist() == [9, 4]
    for _ in range(3):  # rounds emitting 3 and 1 tokens (of a [B, 5] emitted block)
        emitted = rng.integers(0, 5, (2, 5))
        counts = [3, 1]
        state = compiled(drafter)[2](state, jnp.asarray(emitted, jnp.int32), jnp.asarray(counts))
        for row in range(2):
            texts[row] += emitted[row, :counts[row]].tolist()
    assert np.asarray(state.length).tolist() == [len(t) for t in texts]
    assert np.asarray(state.tail).tolist() == [t[-2:] for t in texts]
    for row, text in enumerate(texts):
        assert_counts_match(state, row, text, drafter.buckets)


def test_padding_is_not_counted_and_rows_are_independent():
    drafter = NgramDrafter(tree_from_spec("chain:1"), buckets=256, slots=2)
    # Row 1's prompt [c] is padded with zeros: were they counted, c would be followed by 0, never by d.
    state = start(drafter, [[a, b, a, b, c, a], [c, d]])
    tokens, valid = propose(drafter, state, [a, c])
    assert tokens.tolist() == [[a, b], [c, d]] and valid.all()
    assert np.asarray(state.length).tolist() == [6, 2]
    tokens, valid = propose(drafter, state, [d, d])
    assert valid.tolist() == [[True, False], [True, False]]


def test_a_context_that_hashes_alike_evicts_the_older_one():
    buckets = 2
    contexts = jnp.arange(16, dtype=jnp.int32)[:, None]
    h = np.asarray(bucket_of(contexts, buckets))
    older, newer = np.flatnonzero(h == h[0])[:2].tolist()
    table = empty_counts(1, buckets, 2, 1)
    one, live = jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool)
    table = count_successor(table, jnp.asarray([[older]]), jnp.asarray([x]), one, live)
    table = count_successor(table, jnp.asarray([[older]]), jnp.asarray([x]), one + 1, live)
    query = jnp.asarray([[[older], [newer]]], jnp.int32)
    assert np.asarray(ranked_successors(table, query)).tolist() == [[[x, EMPTY], [EMPTY, EMPTY]]]
    assert np.asarray(table.count)[0, h[0]].tolist() == [2, 0]
    table = count_successor(table, jnp.asarray([[newer]]), jnp.asarray([y]), one + 2, live)
    assert np.asarray(ranked_successors(table, query)).tolist() == [[[EMPTY, EMPTY], [y, EMPTY]]]
    assert np.asarray(table.count)[0, h[0]].tolist() == [1, 0]
    # A row that is not live writes nothing.
    same = count_successor(table, jnp.asarray([[older]]), jnp.asarray([x]), one, ~live)
    assert all(np.array_equal(new, old) for new, old in zip(same, table, strict=True))


@pytest.mark.parametrize("pattern", ["A", "ALM"])
def test_greedy_ngram_equals_autoregressive(make_model, ar_and_method, pattern):
    model, params = make_model(pattern, seed=5, max_len=64)
    prompts = [[4, 4, 4, 4, 4, 4], [5, 6, 7], [1, 2, 3, 1, 2, 3, 1, 2], [9, 8, 7, 6, 5, 4, 3]]
    ar, out = ar_and_method(model, params, prompts, 16, "ngram", tree="branching:3,2")
    assert out.tokens == ar.tokens
    assert np.all(out.accepted >= out.target_steps) and np.all(out.target_steps <= ar.target_steps)
    if pattern == "A":
        # This model loops on rows 0 and 2: the counted n-grams draft those loops.
        assert np.all(out.accepted[[0, 2]] > 2 * out.target_steps[[0, 2]])
        for row in ([prompts[1]], [prompts[3]]):  # a batch of one, with a chain and a small table
            ar, out = ar_and_method(model, params, row, 16, "ngram", tree="chain:3", table_size=64, slots=1)
            assert out.tokens == ar.tokens


def test_spec_fields_and_build(make_model):
    spec = methods.make("ngram")
    assert spec.tree_spec == "chain:4" and spec.lossless and spec.needs == "nothing"
    model, params = make_model("A", seed=5, max_len=64)
    drafter, draft_params = methods.make("ngram", tree="chain:3", table_size=512, slots=2).build(
        Target(model, params))
    assert (drafter.buckets, drafter.slots, draft_params) == (512, 2, ())
    for fields, message in [
        (dict(table_size=1000), "method 'ngram': table_size=1000 is not allowed: a power of two"),
        (dict(table_size=True), "table_size=True is not allowed"),
        (dict(tree="branching:4,2", slots=3),
         "slots=3 is not allowed: an integer >= 4, the widest branching of tree='branching:4,2'"),
        (dict(tree="chain:0"), "tree='chain:0' is not allowed: a tree with at least one draft node"),
        (dict(max_ngram=3), "method 'ngram' takes no argument 'max_ngram'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            methods.make("ngram", **fields)
    with pytest.raises(ValueError, match="power-of-two number of buckets"):
        NgramDrafter(tree_from_spec("chain:2"), buckets=12)
    with pytest.raises(ValueError, match="slots=1 successors per context"):
        NgramDrafter(tree_from_spec("branching:2"), slots=1)
