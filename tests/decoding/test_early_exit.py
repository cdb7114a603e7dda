"""Early exit and layer skipping: the FFN-skip apply option and self-draft (lossless: greedy output equals
autoregressive decoding), its calibration, and the SkipDecode exit schedule (lossy: equal to a reference decoded
from full forwards, refused when lossless decoding is required)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.config import ConfigError
from jaxspec.decoding import api, methods
from jaxspec.decoding.method import Target
from jaxspec.decoding.methods import ffnskip
from jaxspec.decoding.methods.skipdecode import ExitSchedule
from jaxspec.errors import InputError
from jaxspec.models.lm import WithOptions
from jaxspec.state import init_decode_state

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [5, 5, 6, 5, 5, 6]]
MAX_NEW = 10


def zero_ffns(params, layers):
    """The params with every FFN weight of `layers` zeroed: those FFNs add nothing to the residual stream."""
    zeroed = lambda block: {name: jax.tree.map(jnp.zeros_like, v) if name == "ffn" else v for name, v in block.items()}
    return {key: zeroed(block) if key.startswith("layer_") and int(key.split("_")[1]) in layers else block
            for key, block in params.items()}


def test_skipping_an_ffn_equals_zeroing_its_weights(make_model, apply):
    model, params = make_model("A", seed=2, n_layers=3, sandwich_norms=True)  # the FFN's own norm after it too
    tokens = jnp.asarray([PROMPTS[0], PROMPTS[0][::-1]])
    skipping, zeroed = WithOptions.of(model, skip_ffn=(1,)), zero_ffns(params, {1})
    reference = apply(model, zeroed, tokens)
    np.testing.assert_allclose(apply(skipping, params, tokens), reference, atol=1e-5)
    assert not np.allclose(apply(model, params, tokens), reference, atol=1e-3)
    # With a decode state: a prefill, then a one-token extend that reads the skipped FFN's layer's cache.
    state = init_decode_state(model.model_cfg, 2, 16)
    _, state = apply(skipping, params, tokens[:, :-1], state=state)
    last, _ = apply(skipping, params, tokens[:, -1:], state=state)
    np.testing.assert_allclose(last[:, 0], reference[:, -1], atol=1e-5)


def test_bad_skip_ffn_names_the_entry(make_model):
    model, params = make_model("ALM")  # the Mamba layer (2) has no FFN
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ConfigError, match="skip_ffn entry 2: layer 2 is a Mamba block without an FFN"):
        model.apply({"params": params}, tokens, skip_ffn=(2,))
    with pytest.raises(ConfigError, match=r"skip_ffn entry 5 is not a layer index in 0\.\.2"):
        model.apply({"params": params}, tokens, skip_ffn=(5,))
    with pytest.raises(ConfigError, match="num_skip_ffn=-1 is not allowed"):
        methods.make("ffnskip", num_skip_ffn=-1)


def test_ffn_similarity_of_a_hand_built_case():
    x = np.asarray([[[1.0, 0.0], [0.0, 2.0]]])  # [N=1, T=2, d=2]
    y = np.asarray([[[1.0, 1.0], [0.0, 3.0]]])  # cosines 1/sqrt(2) and 1
    similarity = ffnskip.ffn_similarity([x, None, x], [y, None, x])
    np.testing.assert_allclose(similarity[[0, 2]], [(2 ** -0.5 + 1) / 2, 1.0])
    assert np.isnan(similarity[1])
    masked = ffnskip.ffn_similarity([x], [y], mask=np.asarray([[True, False]]))
    np.testing.assert_allclose(masked, [2 ** -0.5])
    assert ffnskip.most_similar_ffns(similarity, 1) == (2,)
    assert ffnskip.most_similar_ffns(similarity, 2) == (0, 2)
    with pytest.raises(InputError, match=r"num_skip_ffn=3 must lie in \[0, 2\]"):
        ffnskip.most_similar_ffns(similarity, 3)


def test_calibration_reads_the_ffns_input_and_output_streams(make_model, apply):
    model, params = make_model("A", seed=4)
    tokens = ffnskip.calibration_tokens(model.model_cfg)  # what build calibrates on
    inputs, outputs = ffnskip.ffn_residual_streams(model, params, tokens)
    full = apply(model, params, tokens, return_hidden=True)
    for i in range(2):
        # Layer i's FFN input is layer i's output with that FFN left out; its output is layer i's output.
        without = apply(WithOptions.of(model, skip_ffn=(i,)), params, tokens, return_hidden=True)
        np.testing.assert_allclose(inputs[i], without.layer_hidden[i], atol=1e-5)
        np.testing.assert_allclose(outputs[i], full.layer_hidden[i], atol=1e-5)
    expected = ffnskip.most_similar_ffns(ffnskip.ffn_similarity(inputs, outputs), 1)
    drafter, _ = methods.make("ffnskip", num_skip_ffn=1).build(Target(model, params))
    assert drafter.model.options == (("skip_ffn", expected),)


def model_with_two_mixers(make_model):
    """An attention layer, then a linear-attention one; one model for every decode below, so that the
    autoregressive loop compiles once."""
    return make_model("AL", seed=3, max_len=64)


def test_ffnskip_greedy_output_is_autoregressive(make_model, ar_and_method):
    model, params = model_with_two_mixers(make_model)
    for tree in ("chain:3", "branching:2,1"):
        ar, out = ar_and_method(model, params, PROMPTS, MAX_NEW, "ffnskip", skip_ffn=(1,), tree=tree)
        assert out.tokens == ar.tokens, tree
    # Zero FFN weights at the skipped layers make the draft the target itself: every draft is accepted (the
    # same compiled loop, other params).
    zeroed = zero_ffns(params, {1})
    ar, out = ar_and_method(model, zeroed, PROMPTS, MAX_NEW, "ffnskip", skip_ffn=(1,), tree="chain:3")
    assert out.tokens == ar.tokens
    assert np.all(out.accepted == 4 * out.target_steps) and np.all(out.target_steps == 3)  # the whole chain, each round


# ---------------------------------------------------------------------------------------------------- SkipDecode


@functools.cache
def _exit_readout(model):
    """Jitted: the full forward's logits read at each position's exit layer (final norm + LM head)."""

    def readout(params, tokens, exits):
        out = model.apply({"params": params}, tokens, return_hidden=True)
        hidden = jnp.stack(out.layer_hidden)  # [n_layers, B, T, d]
        at_exit = jnp.take_along_axis(hidden, (exits - 1)[None, :, :, None], axis=0)[0]
        return model.apply({"params": params}, at_exit, method="exit_logits")

    return jax.jit(readout)


def skipdecode_reference(model, params, prompt, max_new, schedule: ExitSchedule):
    """Greedy decoding by full forwards of the unmodified target: the token after position p is the argmax of
    the target's residual stream after layer exit(p), through the final norm and LM head."""
    seq, width = list(prompt), len(prompt) + max_new
    readout = _exit_readout(model)
    for _ in range(max_new):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(seq)] = seq
        exits = np.asarray(schedule.exits(jnp.arange(width)))[None]
        seq.append(int(np.argmax(readout(params, jnp.asarray(tokens), jnp.asarray(exits))[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_skipdecode_is_the_targets_exit_readout_at_the_scheduled_layers(make_model):
    model, params = model_with_two_mixers(make_model)
    fields = dict(max_exit=2, min_exit=1, decay_start=5, decay_end=11)
    schedule = methods.make("skipdecode", **fields).schedule(model.model_cfg)
    exits = np.asarray(schedule.exits(jnp.arange(16))).tolist()
    assert exits == [2] * 9 + [1] * 7  # 2 - (p - 5) / 6 rounds to 1 from p = 9 (at p = 8, 1.5 rounds to even)
    out = api.generate(model, params, PROMPTS, method="skipdecode", max_new_tokens=MAX_NEW, **fields)
    for prompt, got in zip(PROMPTS, out.tokens, strict=True):  # rows of different lengths in one batch
        assert got == skipdecode_reference(model, params, prompt, MAX_NEW, schedule)
    ar = api.generate(model, params, PROMPTS, max_new_tokens=MAX_NEW)
    assert out.tokens != ar.tokens  # the negative control: exits this low change this model's output


def test_skipdecode_is_lossy_and_refused_when_lossless_is_required(make_model):
    model, params = make_model("A", seed=3, max_len=64, n_layers=4)
    assert methods.make("skipdecode").lossless is False and methods.make("ffnskip").lossless is True
    with pytest.raises(InputError, match="method 'skipdecode' is lossy"):
        api.generate(model, params, [[1, 2]], method="skipdecode", require_lossless=True)
    with pytest.raises(ConfigError, match="min_exit=5 is not allowed: at most max_exit=4"):
        methods.make("skipdecode", min_exit=5).schedule(model.model_cfg)
    with pytest.raises(ConfigError, match="max_exit=9 is not allowed: at most n_layers=4"):
        methods.make("skipdecode", max_exit=9).schedule(model.model_cfg)
