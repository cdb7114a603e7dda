"""Hydragen in the decode loops: rows whose prompts share a beginning (samples of one prompt, or one system
prompt), prefilled once and attending to one shared prefix (`state.SharedPrefixCache`), decode exactly as the
plain batch does: the same logits for extend and tree forwards, the same commit, the same tokens for
autoregressive and speculative decoding on attention and hybrid targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import api
from jaxspec.errors import InputError
from jaxspec.state import SharedPrefixCache, commit, init_decode_state, share_prefix

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]
ROWS = 3


def plain_and_shared(model, params, max_len: int = 32):
    """The plain state of ROWS copies of PROMPT and the shared one, both after the prefill."""
    apply = jax.jit(lambda p, t, s: model.apply({"params": p}, t, state=s, num_new=jnp.full((t.shape[0],), t.shape[1]),
                                                fresh=True))
    tokens = jnp.asarray([PROMPT] * ROWS, jnp.int32)
    _, plain = apply(params, tokens, init_decode_state(model.model_cfg, ROWS, max_len))
    _, one = apply(params, tokens[:1], init_decode_state(model.model_cfg, 1, len(PROMPT)))
    return plain, share_prefix(one, ROWS, max_len - len(PROMPT))


@pytest.mark.parametrize("pattern", ["A", "ALM"])
def test_extend_tree_and_commit_equal_the_plain_batch(make_model, pattern):
    model, params = make_model(pattern, seed=2, max_len=64)
    plain, shared = plain_and_shared(model, params)
    assert any(isinstance(layer, SharedPrefixCache) for layer in shared.layers)
    step = jax.jit(lambda s, t, n: model.apply({"params": params}, t, state=s, num_new=n))
    tree = jax.jit(lambda s, t, p: model.apply({"params": params}, t, state=s, parents=p))
    # Rows diverge: an extend of different lengths (row 2 adds nothing), then a tree per row, then a commit of
    # different paths, then another extend that reads what the commit wrote.
    new = jnp.asarray([[7, 8, 0], [11, 0, 0], [0, 0, 0]], jnp.int32)
    counts = jnp.asarray([2, 1, 0], jnp.int32)
    (a, plain), (b, shared) = step(plain, new, counts), step(shared, new, counts)
    np.testing.assert_allclose(a[:2], b[:2], rtol=2e-5, atol=2e-5)
    nodes = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 12, 13]], jnp.int32)
    parents = jnp.asarray([[-1, 0, 0, 1], [-1, 0, 1, 2], [-1, -1, 1, 1]][:1] * 3, jnp.int32)
    (a, plain), (b, shared) = tree(plain, nodes, parents), tree(shared, nodes, parents)
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    path, accepted = jnp.asarray([[0, 1, 3], [0, 2, 0], [0, 1, 0]], jnp.int32), jnp.asarray([3, 1, 0], jnp.int32)
    plain, shared = commit(plain, path, accepted), commit(shared, path, accepted)
    assert plain.lengths.tolist() == shared.lengths.tolist() == [14, 11, 9]
    last = jnp.asarray([[20], [21], [22]], jnp.int32)
    (a, _), (b, _) = step(plain, last, jnp.ones(3, jnp.int32)), step(shared, last, jnp.ones(3, jnp.int32))
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


# Rows under one "system prompt": different remainders, one of them empty (the row is the prefix itself).
UNDER_ONE_PREFIX = [PROMPT + [7, 7, 2], PROMPT + [11], PROMPT, PROMPT + [3, 1, 4, 1, 5, 9]]


# Autoregressive decoding, a model-free drafter, a self-draft with its own cache and one over the target's.
@pytest.mark.parametrize("pattern,prompts,methods", [
    ("A", [PROMPT] * 4, (dict(method="lookup", tree="chain:3"), dict(method="del"))),
    ("A", UNDER_ONE_PREFIX, (dict(method="ar"),)),
    ("ALM", UNDER_ONE_PREFIX, (dict(method="layerskip", skip_layers=(1,), tree="branching:2,1"),))],
    ids=["samples", "system_prompt", "system_prompt_hybrid"])
def test_decoding_over_a_shared_prefix_is_unchanged(make_model, pattern, prompts, methods):
    model, params = make_model(pattern, seed=3, max_len=96)
    for method in methods:
        plain = api.generate(model, params, prompts, max_new_tokens=12, **method)
        shared = api.generate(model, params, prompts, max_new_tokens=12, shared_prefix=True, **method)
        assert shared.tokens == plain.tokens, method
        assert shared.target_steps.tolist() == plain.target_steps.tolist(), method


def test_sampled_rows_are_independent(make_model):
    """At temperature 1 the rows of one prompt are separate samples: they differ from each other, and with
    the same seed they are the plain batch's samples."""
    model, params = make_model("A", seed=4, max_len=96)
    prompts = [PROMPT] * 4
    plain = api.generate(model, params, prompts, max_new_tokens=10, temperature=1.0, seed=5)
    shared = api.generate(model, params, prompts, max_new_tokens=10, temperature=1.0, seed=5, shared_prefix=True)
    assert len({tuple(t) for t in shared.tokens}) > 1
    assert shared.tokens == plain.tokens


def test_bad_requests_are_refused(make_model):
    model, params = make_model("A", seed=4, max_len=96)
    with pytest.raises(InputError, match="begin with the same tokens; these share none"):
        api.generate(model, params, [PROMPT, [7] + PROMPT], shared_prefix=True)
    with pytest.raises(InputError, match="prefill_chunk=8 with shared_prefix=True"):
        api.generate(model, params, [PROMPT] * 2, shared_prefix=True, prefill_chunk=8)
    windowed, wparams = make_model("A", seed=4, max_len=96, layer_windows=(4, 0))
    with pytest.raises(InputError, match="sliding window of 4"):
        api.generate(windowed, wparams, [PROMPT] * 2, shared_prefix=True, max_new_tokens=2)
    with pytest.raises(InputError, match="HeavyHitterCache cannot be shared"):
        api.generate(model, params, [PROMPT] * 2, method="h2o", budget=8, recent=4, shared_prefix=True,
                     max_new_tokens=2)
    two_rows = init_decode_state(model.model_cfg, 2, 16)
    with pytest.raises(InputError, match="one row, got 2 rows"):
        share_prefix(two_rows, 4, 8)
