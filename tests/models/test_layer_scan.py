"""Scanned layers (`model.scan_layers`): the plan finds the repeating period, the program really holds one scan
over the groups, and scanned and unrolled stacks give the same logits in every forward mode (every mixer,
hybrids, Gemma's window pattern with a remainder, both layouts, int8 weights, MatFormer granularities, the
apply-time options) and decode the same tokens; in the decode layout the CPU kernel reads every projection's
weights from the layer stack in place, and a decode step writes and reads each layer's cache in the decode state's
cache stack without copying it out."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.config import ConfigError
from jaxspec.decoding import api
from jaxspec.errors import InputError
from jaxspec.models import layer_scan
from jaxspec.models.decode_layout import for_decoding, to_standard_layout
from jaxspec.models.layer_scan import scan_plan, smallest_period
from jaxspec.models.lm import WithOptions, reconfigured
from jaxspec.ops import cached_attention, small_rows_matmul
from jaxspec.state import init_decode_state

BATCH = 2
TOL = dict(atol=2e-5, rtol=2e-5)
# (pattern, overrides, (period, groups) of the plan without options)
CASES = {
    "attention": ("A", {"n_layers": 4}, (1, 4)),
    "hybrid": ("AL", {"n_layers": 4}, (2, 2)),
    "hybrid_mamba": ("ALM", {"n_layers": 6, "mamba": {"ffn": True}}, (3, 2)),
    # Gemma 3's pattern (windowed, windowed, global), two periods and a remainder of one layer.
    "gemma": ("A", {"n_layers": 7, "layer_windows": (4, 4, 0, 4, 4, 0, 4), "rope_local_theta": 100.0,
                    "qk_norm": True, "sandwich_norms": True, "embed_scale": True, "ffn_activation": "gelu_tanh"},
              (3, 2)),
}


def test_plan_finds_the_smallest_period_and_needs_two_repeats():
    assert smallest_period("aaaa") == 1
    assert smallest_period("abab") == 2
    assert smallest_period("ababa") == 2  # a partial period at the end
    assert smallest_period("abcab") == 3
    assert smallest_period("abca") == 3
    assert scan_plan("aaaa") == (1, 4)
    assert scan_plan("ababa") == (2, 2)
    assert scan_plan("abcab") == (3, 0)  # one period only: nothing to share, all unrolled
    assert scan_plan("abc") == (3, 0)


def scanned(model):
    """The same model (and layout) with `scan_layers` on."""
    return reconfigured(model, scan_layers=True)


def forwards(model, params, tokens, apply, **options):
    """Logits (and hidden states) of a full forward, a prefill of 6, an extend of 2 and a 3-node tree."""
    state = init_decode_state(model.model_cfg, BATCH, 32)
    full = apply(model, params, tokens, return_hidden=True, **options)
    prefill, state = apply(model, params, tokens[:, :6], state=state, **options)
    extend, _ = apply(model, params, tokens[:, 6:8], state=state, **options)
    tree, _ = apply(model, params, tokens[:, 6:9], state=state, parents=jnp.asarray([-1, 0, 0]), **options)
    return {"full": full.logits, "full layer_hidden": jnp.stack(full.layer_hidden), "prefill": prefill,
            "extend": extend, "tree": tree}


def assert_same(want, got, what):
    for mode in want:
        np.testing.assert_allclose(np.asarray(got[mode]), np.asarray(want[mode]), **TOL, err_msg=f"{what} {mode}")


# "hybrid" (AL) is left out here: "hybrid_mamba" (ALM) scans attention and linear attention in one period the same
# way, and adds Mamba (its plan and program are still checked below, and it decodes in the last test).
@pytest.mark.parametrize("case", ["attention", "hybrid_mamba", "gemma"])
def test_scanned_stack_gives_the_unrolled_logits_in_every_mode(case, make_model, apply):
    pattern, overrides, _ = CASES[case]
    model, params = make_model(pattern, **overrides)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.model_cfg.vocab_size, (BATCH, 9)))
    n = model.model_cfg.n_layers
    options = [{}, {"layer_gate": jnp.asarray([[True] * n, [True] * (n - 2) + [False] * 2])}]
    if case == "attention":  # a periodic skip set keeps a scan; a skipped FFN breaks the period
        options += [{"skip_layers": (1, 3)}, {"skip_ffn": (2,)}]
    for opts in options:
        assert_same(forwards(model, params, tokens, apply, **opts),
                    forwards(scanned(model), params, tokens, apply, **opts), f"{case} {opts}")
    decode_model, decode_params = for_decoding(model, params)
    assert_same(forwards(decode_model, decode_params, tokens, apply),
                forwards(scanned(decode_model), decode_params, tokens, apply), f"{case} decode layout")


@pytest.mark.parametrize("weight_dtype", ["float32", "int8"])
def test_scanned_decode_layout_gives_the_unrolled_logits_with_int8_and_granularities(weight_dtype, make_model,
                                                                                   apply):
    # A kernel read in place (the whole width) and one sliced first (a smaller MatFormer granularity) alike.
    model, params = make_model("A", n_layers=4, matformer_fractions=(0.5, 1.0))
    decode_model, decode_params = for_decoding(reconfigured(model, weight_dtype=weight_dtype), params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, model.model_cfg.vocab_size, (BATCH, 9)))
    for granularity in (None, 0):
        assert_same(forwards(decode_model, decode_params, tokens, apply, granularity=granularity),
                    forwards(scanned(decode_model), decode_params, tokens, apply, granularity=granularity),
                    f"{weight_dtype} granularity {granularity}")


@pytest.mark.skipif(not small_rows_matmul.available(), reason="the CPU kernel needs x86-64 with AVX2/FMA")
def test_a_scanned_decode_step_reads_each_projection_from_its_layer_stack(make_model):
    # No weight slice is copied before its product: each of a layer's four projections (qkv, o, gate_up, down) is
    # one call of the CPU kernel on the [groups, out, in] stack.
    model, params = make_model("A", n_layers=4)
    decode_model, decode_params = for_decoding(scanned(model), params)
    state = init_decode_state(model.model_cfg, 1, 32)
    step = jax.jit(lambda p, t, s: decode_model.apply({"params": p}, t, state=s))
    hlo = step.lower(decode_params, jnp.zeros((1, 1), jnp.int32), state).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="jaxspec_small_rows_matmul"' in line]
    stack_operand = re.compile(r"operand_layout_constraints=\{f32\[1,\d+\]\{1,0\}, f32\[4,\d+,\d+\]")
    stacks = [line for line in calls if stack_operand.search(line)]
    assert len(calls) == 4 and len(stacks) == 4, calls


@pytest.mark.skipif(not small_rows_matmul.available(), reason="the CPU kernel needs x86-64 with AVX2/FMA")
def test_a_forward_of_another_plan_reads_each_layer_from_its_stack(make_model):
    # The decode params hold the layers only stacked (period 1, 4 groups). Skipping layer 1 breaks the period, so
    # the other three layers run unrolled, and each projection is still one kernel call on its [4, out, in] stack:
    # no layer's weights are copied out of it.
    model, params = make_model("A", n_layers=4)
    decode_model, decode_params = for_decoding(scanned(model), params)
    state = init_decode_state(model.model_cfg, 1, 32)
    step = jax.jit(lambda p, t, s: decode_model.apply({"params": p}, t, state=s, skip_layers=(1,)))
    hlo = step.lower(decode_params, jnp.zeros((1, 1), jnp.int32), state).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="jaxspec_small_rows_matmul"' in line]
    stack_operand = re.compile(r"operand_layout_constraints=\{f32\[1,\d+\]\{1,0\}, f32\[4,\d+,\d+\]")
    assert len(calls) == 3 * 4 and all(stack_operand.search(line) for line in calls), calls


def test_sown_intermediates_need_per_layer_params(make_model):
    model, params = make_model("A", n_layers=4)
    decode_model, decode_params = for_decoding(scanned(model), params)
    with pytest.raises(InputError, match="layer_0 is held only in the params' layer stacks.*before for_decoding"):
        decode_model.apply({"params": decode_params}, jnp.zeros((1, 4), jnp.int32), mutable=["intermediates"])


@pytest.mark.skipif(not cached_attention.available(), reason="the CPU kernel needs x86-64 with AVX2/FMA")
def test_a_scanned_decode_step_writes_and_reads_each_layers_cache_in_its_stack(make_model):
    # The state holds the 4 layers' caches as one [4, B, Hkv, L, D] stack per k and v; the step writes the new row
    # into it in place and the attention kernel reads the layer from it: no value of one layer's cache shape, and
    # no copy of a stack, is made.
    model, params = make_model("A", n_layers=4)
    decode_model, decode_params = for_decoding(scanned(model), params)
    state = init_decode_state(decode_model.model_cfg, 1, 32)
    assert state.stack_plan == (1, 4) and state.layers == (None,) * 4
    step = jax.jit(lambda p, t, s: decode_model.apply({"params": p}, t, state=s), donate_argnums=2)
    hlo = step.lower(decode_params, jnp.zeros((1, 1), jnp.int32), state).compile().as_text()
    layer_cache, cache_stack = "f32[1,2,32,8]", "f32[4,1,2,32,8]"
    assert not re.search(rf"= {re.escape(layer_cache)}", hlo)
    assert not re.search(rf"= {re.escape(cache_stack)}\{{[^}}]*\}} copy\(", hlo)
    attention = [line for line in hlo.splitlines() if 'custom_call_target="jaxspec_cached_attention"' in line]
    assert len(attention) == 1 and cache_stack in attention[0]


def stacked_leaves(model, params, tokens, groups) -> int:
    """How many arrays the forward stacks over the groups (stacks or concatenates outside the scan with `groups`
    rows)."""
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params)
    return sum(eqn.primitive.name in ("stack", "concatenate") and eqn.outvars[0].aval.shape[0] == groups
               for eqn in jaxpr.jaxpr.eqns)


def test_for_decoding_stacks_the_layers_once_and_forwards_read_the_stacks(make_model, apply):
    model, params = make_model("A", n_layers=4)
    decode_model, decode_params = for_decoding(scanned(model), params)
    assert layer_scan.STACKS in decode_params
    assert not [key for key in decode_params if re.fullmatch(r"layer_\d+", key)]  # the weights: once, stacked
    assert for_decoding(decode_model, decode_params)[1] is decode_params  # stacked once
    bare = layer_scan.without_stacks(decode_params)
    assert sorted(bare) == sorted(for_decoding(model, params)[1])  # every layer in its own entry again
    assert sum(x.size for x in jax.tree.leaves(bare)) == sum(x.size for x in jax.tree.leaves(decode_params))
    assert stacked_leaves(decode_model, bare, jnp.zeros((1, 4), jnp.int32), 4) > 0
    assert stacked_leaves(decode_model, decode_params, jnp.zeros((1, 4), jnp.int32), 4) == 0
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, model.model_cfg.vocab_size, (BATCH, 9)))
    unrolled = forwards(reconfigured(decode_model, scan_layers=False), bare, tokens, apply)
    assert_same(unrolled, forwards(decode_model, decode_params, tokens, apply), "stored stacks")
    # Stacks stored for the plan without options (period 1) are not scanned by a forward of another plan: its
    # layers run unrolled, each read from its stack.
    skip = dict(skip_layers=(1, 3))  # period 2, two groups
    assert_same(forwards(reconfigured(decode_model, scan_layers=False), bare, tokens, apply, **skip),
                forwards(decode_model, decode_params, tokens, apply, **skip), "stacks of another plan")
    back = to_standard_layout(decode_params, decode_model.model_cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)


def test_for_decoding_takes_a_model_with_fixed_options_over_a_scanned_stack(make_model):
    # A lossy mode's stand-in (skip_layers fixed: period 2) gets the stacks of the plan without options; its
    # forwards read each layer from them, unrolled, and give the unrolled stack's logits.
    model, params = make_model("A", n_layers=4)
    changed, decode_params = for_decoding(WithOptions.of(scanned(model), skip_layers=(1, 3)), params)
    assert layer_scan.STACKS in decode_params
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, model.model_cfg.vocab_size, (BATCH, 9)))
    unrolled, bare = for_decoding(model, params)
    np.testing.assert_allclose(changed.apply({"params": decode_params}, tokens),
                               unrolled.apply({"params": bare}, tokens, skip_layers=(1, 3)), **TOL)


def scan_lengths(model, params, tokens, **options) -> list[int]:
    """Lengths of the `scan`s at the top of the forward's program (not inside mixers)."""
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens, **options))(params)
    return [eqn.params["length"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]


@pytest.mark.parametrize("case", list(CASES))
def test_the_program_holds_one_scan_over_the_groups(case, make_model):
    pattern, overrides, (_, groups) = CASES[case]
    model, params = make_model(pattern, **overrides)
    tokens = jnp.zeros((1, 4), jnp.int32)
    assert groups not in scan_lengths(model, params, tokens)  # (linear attention scans over its chunks)
    assert scan_lengths(scanned(model), params, tokens) == [groups]  # the mixers' own scans are inside it


def test_options_that_break_the_period_unroll(make_model):
    model, params = make_model("A", n_layers=4)
    tokens = jnp.zeros((1, 4), jnp.int32)
    model = scanned(model)
    assert scan_lengths(model, params, tokens, skip_layers=(1, 3)) == [2]  # period 2, second position skipped
    assert scan_lengths(model, params, tokens, skip_layers=(1,)) == []
    assert scan_lengths(model, params, tokens, granularity=(0, 0, 0, 0)) == [4]


def test_calibration_reads_every_ffn_input_from_a_scanned_model(make_model):
    model, params = make_model("A", n_layers=4)
    tokens = jnp.zeros((1, 4), jnp.int32)
    _, sown = scanned(model).apply({"params": params}, tokens, mutable=["intermediates"])
    assert sorted(sown["intermediates"]) == [f"layer_{i}" for i in range(4)]


def test_init_of_a_scanned_model_makes_the_per_layer_parameters(make_model):
    model, params = make_model("AL", n_layers=4)
    shapes = jax.eval_shape(lambda key: scanned(model).init(key, jnp.zeros((1, 4), jnp.int32))["params"],
                            jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)


@pytest.mark.parametrize("case", ["attention", "hybrid"])
def test_scanned_target_decodes_the_unrolled_tokens(case, make_model):
    pattern, overrides, _ = CASES[case]
    model, params = make_model(pattern, **overrides)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3, 4], [7, 8, 9]]
    for kwargs in (dict(method="ar"), dict(method="lookup", tree="chain:3"),
                   dict(method="layerskip", skip_layers=(1,), tree="branching:2,2")):
        want = api.generate(model, params, prompts, max_new_tokens=8, **kwargs)
        got = api.generate(scanned(model), params, prompts, max_new_tokens=8, **kwargs)
        assert got.tokens == want.tokens, kwargs


def test_reconfigured_refuses_unknown_keys_and_bad_values(make_model):
    model, _ = make_model("A")
    with pytest.raises(InputError, match="scan_layer.*did you mean scan_layers"):
        reconfigured(model, scan_layer=True)
    with pytest.raises(ConfigError, match="model.scan_layers"):
        reconfigured(model, scan_layers="yes")
