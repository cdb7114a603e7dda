"""Prefill at the narrowest width that holds the batch: prompts padded to one fixed width (one compiled loop for
many lengths) are prefilled at the narrowest of the narrower buckets, with the one-shot prefill's logits and
state, for every mixer (sliding windows included), and decoding after it gives the same tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import api, engine
from jaxspec.state import init_decode_state

PROMPTS = [[5, 9, 3, 7, 1, 2, 8, 4, 6, 3, 9, 5, 2, 7], [4, 4, 8], [6, 1, 6, 1, 6, 1, 6, 1, 6]]


def test_narrower_buckets_are_the_largest_buckets_below_the_width():
    assert engine.narrower_buckets(256) == (128,)
    assert engine.narrower_buckets(200) == (128,)
    assert engine.narrower_buckets(256, count=3) == (64, 128)  # none under the minimum
    assert engine.narrower_buckets(64) == ()
    assert engine.narrower_buckets(32, count=2, minimum=8) == (8, 16)


def prefill(model, params, prompts, width, widths):
    tokens, lens = engine.pad_prompts(prompts, width=width)
    state = init_decode_state(model.model_cfg, len(prompts), 64)
    fn = jax.jit(lambda params, tokens, lens: engine.narrowest_prefill(model, params, tokens, lens, state, widths))
    return fn(params, jnp.asarray(tokens), jnp.asarray(lens))


# Widths 8, 16 and the padded 32: the batch's longest prompt (14, or 3 alone) picks the branch of 16 or 8.
@pytest.mark.parametrize("prompts", [PROMPTS, [[4, 4, 8]]], ids=["longest 14", "longest 3"])
def test_the_narrowest_prefill_equals_one_at_the_padded_width(mixer_model, prompts):
    model, params = mixer_model
    whole, whole_state = prefill(model, params, prompts, 32, ())
    narrow, narrow_state = prefill(model, params, prompts, 32, (8, 16))
    assert narrow.logits.shape == whole.logits.shape
    for row, prompt in enumerate(prompts):  # positions past a row's prompt hold padding, compared nowhere
        n = len(prompt)
        np.testing.assert_allclose(narrow.logits[row, :n], whole.logits[row, :n], rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(narrow.hidden[row, :n], whole.hidden[row, :n], rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(narrow_state.lengths, whole_state.lengths)


@pytest.mark.parametrize("pattern, overrides", [("A", {}), ("ALM", {"mamba": {"ffn": True}}),
                                                ("A", {"n_layers": 2, "layer_windows": (3, 0)})])
def test_a_fixed_prompt_width_decodes_the_bucketed_tokens(make_model, pattern, overrides):
    # At prompt_width=128 the loop also compiles the prefill at width 64, which holds these prompts.
    model, params = make_model(pattern, seed=4, max_len=160, **overrides)
    for method, args in (("ar", {}), ("lookup", dict(tree="chain:3"))):
        bucketed = api.generate(model, params, PROMPTS, method=method, max_new_tokens=10, **args)
        fixed = api.generate(model, params, PROMPTS, method=method, max_new_tokens=10, prompt_width=128, **args)
        assert fixed.prompt_width == 128 and fixed.tokens == bucketed.tokens, method
