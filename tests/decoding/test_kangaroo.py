"""Kangaroo self-drafting: the draft model (the target's first k layers, an adapter, the target's LM head) against
the target with its upper layers skipped, greedy output equal to autoregressive decoding, and the method's
refusals."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import api, methods
from jaxspec.decoding.method import Target
from jaxspec.errors import InputError
from jaxspec.models import kangaroo


def trained_looking_adapter(params, model_cfg, exit_layer: int, seed: int = 3) -> dict:
    """An adapter as after training: its output projection no longer zero (so the draft is not the plain exit)."""
    adapter = kangaroo.init_adapter(params, model_cfg, exit_layer, seed)
    layer = adapter[kangaroo.adapter_layer(exit_layer)]
    kernel = layer["attn"]["o_proj"]["kernel"]
    layer["attn"]["o_proj"]["kernel"] = jnp.asarray(
        np.random.default_rng(seed).standard_normal(kernel.shape) / np.sqrt(kernel.shape[0]), kernel.dtype)
    return adapter


def test_a_zero_output_adapter_is_the_target_with_its_upper_layers_skipped(make_model, apply):
    """With the adapter's output projection zero (its initial state) the draft's logits are those of the target
    with layers k..n-1 skipped; a trained adapter changes them. The draft keeps the windows and FFN widths of the
    layers it shares."""
    model, params = make_model("A", seed=2, n_layers=3, layer_windows=(3, 0, 0), d_ff_per_layer=(64, 32, 48))
    cfg, exit_layer = model.model_cfg, 2
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 11)), jnp.int32)
    want = np.asarray(apply(model, params, tokens, skip_layers=(2,)))
    draft = kangaroo.draft_model(cfg, exit_layer)
    fresh = kangaroo.init_adapter(params, cfg, exit_layer, seed=0)
    np.testing.assert_array_equal(np.asarray(apply(draft, kangaroo.draft_params(params, fresh), tokens)), want)
    changed = kangaroo.draft_params(params, trained_looking_adapter(params, cfg, exit_layer))
    assert not np.allclose(np.asarray(apply(draft, changed, tokens)), want, atol=1e-3)


def test_the_draft_shares_the_targets_parameters_and_has_its_own_decode_state(make_model, tiny_config):
    model, params = make_model("A", seed=2, n_layers=4)
    adapter = kangaroo.init_adapter(params, model.model_cfg, 2, seed=0)
    joined = kangaroo.draft_params(params, adapter)
    assert joined["layer_1"] is params["layer_1"] and joined["embed"] is params["embed"]
    assert sorted(adapter) == ["final_norm", "layer_2"] and "ffn" not in adapter["layer_2"]
    draft = kangaroo.draft_model(model.model_cfg, 2)
    assert draft.model_cfg.n_layers == 3 and draft.model_cfg.layer_pattern == "AAA"
    # A hybrid target: the draft keeps the mixers of the layers it shares; the adapter is attention.
    hybrid = kangaroo.draft_config(tiny_config("ALM", n_layers=6, layer_windows=(2, 0, 0, 4, 0, 0)), 4)
    assert hybrid.layer_pattern == "ALMAA" and tuple(hybrid.layer_windows) == (2, 0, 0, 4, 0)


def greedy_reference(final_logits, model, params, prompts, max_new: int) -> list[list[int]]:
    """Autoregressive greedy output, one full forward per token (the loops' reference, without compiling one)."""
    out = [list(p) for p in prompts]
    for _ in range(max_new):
        for seq, token in zip(out, np.argmax(final_logits(model, params, out), axis=-1), strict=True):
            seq.append(int(token))
    return [seq[len(p):] for seq, p in zip(out, prompts, strict=True)]


@pytest.mark.parametrize("batch, tree, threshold", [(1, "chain:3", 0.0), (4, "branching:2,1", 0.05)])
def test_greedy_output_is_the_autoregressive_output(make_model, final_logits, batch, tree, threshold):
    """Batch 1 with a chain, and batch 4 with a small tree and the confidence stop cutting some branches."""
    model, params = make_model("A", seed=4, n_layers=2, max_len=64)
    adapter = trained_looking_adapter(params, model.model_cfg, 1)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [2, 7]][:batch]
    out = api.generate(model, params, prompts, method="kangaroo", tree=tree, confidence_threshold=threshold,
                       adapter_params=adapter, max_new_tokens=12)
    assert out.tokens == greedy_reference(final_logits, model, params, prompts, 12)


def test_the_spec_defaults_and_refusals(make_model):
    spec = methods.make("kangaroo")
    assert spec.lossless and spec.needs == "a trained Kangaroo adapter"
    assert spec.tree_spec == "chain:6" and spec.confidence_threshold == 0.6
    model, params = make_model("A", seed=2, n_layers=4)
    with pytest.raises(InputError, match="needs a trained Kangaroo adapter: draft_workdir"):
        spec.build(Target(model, params))
    wide = kangaroo.init_adapter(params, model.model_cfg, 2, seed=0)
    wide["layer_2"]["attn"]["q_proj"]["kernel"] = jnp.zeros((48, 32))  # a 48-wide model's
    with pytest.raises(InputError, match=r"\['layer_2'\]\['attn'\]\['q_proj'\]\['kernel'\] has shape \(48, 32\); "
                       r"this target's adapter at exit layer 2 has \(32, 32\): an adapter made for another model"):
        spec.build(Target(model, params), adapter_params=wide)
    with pytest.raises(InputError, match=r"exit_layer=4 must lie in \[1, 3\]"):
        kangaroo.draft_config(model.model_cfg, 4)
