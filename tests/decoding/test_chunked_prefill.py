"""Chunked prefill (Sarathi-style, exact): the prompt forward in chunks gives the one-shot prefill's logits and
state, and decoding after it the same tokens, for every mixer (sliding windows included) and per-row lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import api, engine
from jaxspec.state import init_decode_state

PROMPTS = [[5, 9, 3, 7, 1, 2, 8, 4, 6, 3, 9, 5, 2, 7], [4, 4, 8], [6, 1, 6, 1, 6, 1, 6, 1, 6]]


def prefill(model, params, chunk, width=16):
    tokens, lens = engine.pad_prompts(PROMPTS, width=width)
    state = init_decode_state(model.model_cfg, len(PROMPTS), 64)
    fn = jax.jit(lambda params, tokens, lens: engine.chunked_prefill(model, params, tokens, lens, state, chunk))
    return fn(params, jnp.asarray(tokens), jnp.asarray(lens))


@pytest.mark.parametrize("width", [16, 32])  # at 32, chunks 4-7 are padding in every row and are skipped
def test_chunked_prefill_equals_one_shot(mixer_model, width):
    model, params = mixer_model
    whole, whole_state = prefill(model, params, 0, width)
    chunked, chunked_state = prefill(model, params, 4, width)
    for row, prompt in enumerate(PROMPTS):  # positions past a row's prompt hold padding, compared nowhere
        n = len(prompt)
        np.testing.assert_allclose(chunked.logits[row, :n], whole.logits[row, :n], rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(chunked_state.lengths, whole_state.lengths)


@pytest.mark.parametrize("pattern, overrides", [("A", {}), ("ALM", {"mamba": {"ffn": True}}),
                                                ("A", {"n_layers": 2, "layer_windows": (3, 0)})])
def test_decoding_after_a_chunked_prefill_gives_the_same_tokens(make_model, pattern, overrides):
    model, params = make_model(pattern, seed=4, max_len=64, **overrides)
    for method, args in (("ar", {}), ("lookup", dict(tree="chain:3"))):
        whole = api.generate(model, params, PROMPTS, method=method, max_new_tokens=10, **args)
        # Chunks of 4 over rows of 14, 3 and 9 tokens: rows end inside a later chunk and within the first. At a
        # prompt width of 32 the last four chunks are padding in every row, and are skipped.
        for width in (None, 32):
            chunked = api.generate(model, params, PROMPTS, method=method, max_new_tokens=10, prefill_chunk=4,
                                   prompt_width=width, **args)
            assert chunked.tokens == whole.tokens, (method, width)


def test_bad_chunk_sizes_are_named(make_model):
    model, params = make_model("A", seed=4, max_len=64)
    with pytest.raises(ValueError, match="prefill_chunk=3 must be 0 .off. or a power of two"):
        api.generate(model, params, PROMPTS, max_new_tokens=4, prefill_chunk=3)
