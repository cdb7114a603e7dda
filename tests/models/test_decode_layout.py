"""The decode layout: the same logits as the standard layout in every forward mode, an exact round trip, int8
weights (per output row) close to float, the small-row projection equal to the matmul, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.models import layers
from jaxspec.models.decode_layout import for_decoding, to_decode_layout, to_standard_layout
from jaxspec.models.heads import lm_head_kernel
from jaxspec.models.lm import DecoderLM, build_model, init_params
from jaxspec.models.matformer import extract_submodel
from jaxspec.state import init_decode_state

BATCH = 2
TOL = dict(atol=2e-5, rtol=2e-5)
# (pattern, overrides): every mixer, a hybrid with an FFN on Mamba, biases with an untied head, Gemma features,
# and a MatFormer FFN.
CASES = {
    "attention": ("A", {}),
    "hybrid": ("ALM", {"mamba": {"ffn": True}}),
    "bias_untied": ("A", {"qkv_bias": True, "tie_embeddings": False}),
    "gemma": ("A", {"n_layers": 3, "layer_windows": (4, 0, 3), "rope_local_theta": 100.0, "qk_norm": True,
                    "sandwich_norms": True, "embed_scale": True, "ffn_activation": "gelu_tanh", "query_scale": 0.3}),
    "matformer": ("A", {"matformer_fractions": (0.25, 0.5, 1.0)}),
}


def forwards(model, params, tokens, apply, **options):
    """Logits of a full forward, a prefill of 6 then an extend of 2, and a 3-node tree after the prefill."""
    state = init_decode_state(model.model_cfg, BATCH, 32)
    full = apply(model, params, tokens, **options)
    prefill, state = apply(model, params, tokens[:, :6], state=state, **options)
    extend, _ = apply(model, params, tokens[:, 6:8], state=state, **options)
    tree, _ = apply(model, params, tokens[:, 6:9], state=state, parents=jnp.asarray([-1, 0, 0]), **options)
    return [np.asarray(x) for x in (full, prefill, extend, tree)]


@pytest.mark.parametrize("case", list(CASES))
def test_decode_layout_gives_the_standard_logits_in_every_mode(case, make_model, apply):
    model, params = make_model(CASES[case][0], **CASES[case][1])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.model_cfg.vocab_size, (BATCH, 9)))
    decode_model, decode_params = for_decoding(model, params)
    assert decode_model.layout == "decode"
    options = [{}]
    if case == "matformer":
        options.append(dict(granularity=(1, 0)))  # two sub-model widths, layer by layer
    if case in ("hybrid", "gemma"):
        options.append(dict(skip_layers=(1,)))
    for opts in options:
        want = forwards(model, params, tokens, apply, **opts)
        got = forwards(decode_model, decode_params, tokens, apply, **opts)
        for mode, w, g in zip(("full", "prefill", "extend", "tree"), want, got, strict=True):
            np.testing.assert_allclose(g, w, **TOL, err_msg=f"{case} {opts} {mode}")


@pytest.mark.parametrize("case", ["hybrid", "bias_untied", "matformer"])
def test_round_trip_is_exact_and_init_makes_the_converted_structure(case, make_model):
    model, params = make_model(CASES[case][0], **CASES[case][1])
    decode_params = to_decode_layout(params, model.model_cfg)
    back = to_standard_layout(decode_params, model.model_cfg)
    assert jax.tree.structure(back) == jax.tree.structure(dict(params))
    for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(got, want)
    initialised = jax.eval_shape(lambda k: init_params(model.clone(layout="decode"), k), jax.random.key(0))
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(initialised) == shapes(decode_params)


def test_fused_projections_hold_the_standard_weights_in_place(make_model, tiny_config):
    model, params = make_model("A", qkv_bias=True, tie_embeddings=False)
    cfg = model.model_cfg
    dp = to_decode_layout(params, cfg)
    attn, ffn = params["layer_0"]["attn"], params["layer_0"]["ffn"]
    qkv = dp["layer_0"]["attn"]["qkv"]
    n_q, n_kv = attn["q_proj"]["kernel"].shape[1], attn["k_proj"]["kernel"].shape[1]
    # every kernel stored [out, in]: one row per output
    assert qkv["kernel_t"].shape == (n_q + 2 * n_kv, cfg.d_model)
    np.testing.assert_array_equal(qkv["kernel_t"][n_q:n_q + n_kv], attn["k_proj"]["kernel"].T)
    np.testing.assert_array_equal(qkv["bias"][n_q + n_kv:], attn["v_proj"]["bias"])
    np.testing.assert_array_equal(dp["layer_0"]["attn"]["o_proj"]["kernel_t"], attn["o_proj"]["kernel"].T)
    gate_up = dp["layer_0"]["ffn"]["gate_up"]["kernel_t"]
    d_ff = ffn["gate_proj"].shape[1]
    np.testing.assert_array_equal(gate_up[:d_ff], ffn["gate_proj"].T)
    np.testing.assert_array_equal(gate_up[d_ff:], ffn["up_proj"].T)
    np.testing.assert_array_equal(dp["layer_0"]["ffn"]["down_proj"]["kernel_t"], ffn["down_proj"].T)
    np.testing.assert_array_equal(dp["lm_head"]["kernel_t"], params["lm_head"]["kernel"].T)
    # int8: every kernel transposed to [out, in], one scale per output row.
    int8 = to_decode_layout(params, tiny_config("A", qkv_bias=True, tie_embeddings=False, weight_dtype="int8"))
    q = int8["layer_0"]["ffn"]["gate_up"]
    assert q["kernel_t"].dtype == jnp.int8 and q["kernel_t"].shape == gate_up.shape
    np.testing.assert_allclose(q["kernel_t"] * q["scale"][:, None], gate_up, atol=float(q["scale"].max()) / 2)


@pytest.mark.parametrize("rows", [1, 2, 5, layers.SMALL_ROWS, layers.SMALL_ROWS + 1])
def test_matmul_t_equals_the_matmul_for_any_row_count(rows):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 1, 24)), jnp.float32)  # leading dims are kept
    w = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
    got = jax.jit(layers.matmul_t)(x, w)
    assert got.shape == (rows, 1, 40)
    np.testing.assert_allclose(got, np.asarray(x) @ np.asarray(w).T, atol=1e-5, rtol=1e-5)
    q, scale = layers.quantize_int8(w)
    got = jax.jit(layers.matmul_t)(x, q, scale)
    want = np.asarray(x) @ (np.asarray(q, np.float32) * np.asarray(scale)[:, None]).T
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    # bfloat16 weights (a checkpoint kept in its dtype) take XLA's products, not the CPU kernel's
    w16 = w.astype(jnp.bfloat16)
    got = jax.jit(layers.matmul_t)(x, w16)
    np.testing.assert_allclose(got, np.asarray(x) @ np.asarray(w16.astype(jnp.float32)).T, atol=1e-4, rtol=1e-5)


def test_small_rows_stream_only_on_cpu_float32():
    assert not layers.streams_rows(1, jnp.float32)
    assert layers.streams_rows(2, jnp.float32) == (jax.default_backend() == "cpu")
    assert not layers.streams_rows(layers.SMALL_ROWS + 1, jnp.float32)
    assert not layers.streams_rows(4, jnp.bfloat16)


def test_quantize_int8_is_symmetric_per_output_row():
    w = np.random.default_rng(3).standard_normal((6, 10)).astype(np.float32)
    w[2] = 0.0  # a zero row keeps scale 1 (no division by zero)
    w[4] *= 100.0  # rows are scaled independently
    q, scale = (np.asarray(a) for a in layers.quantize_int8(w))
    assert q.dtype == np.int8 and scale.shape == (6,)
    np.testing.assert_allclose(scale, np.where(np.abs(w).max(1) > 0, np.abs(w).max(1) / 127, 1.0), rtol=1e-6)
    assert np.abs(q).max(axis=1)[[0, 1, 3, 4, 5]].tolist() == [127] * 5
    assert (q[2] == 0).all()
    assert np.all(np.abs(q * scale[:, None] - w) <= scale[:, None] / 2 + 1e-6)
    with pytest.raises(ValueError, match="2-D"):
        layers.quantize_int8(w[0])


@pytest.mark.parametrize("case", ["attention", "bias_untied"])
def test_int8_is_close_to_float_and_consistent_across_modes(case, make_model, apply, tiny_config):
    pattern, overrides = CASES[case]
    model, params = make_model(pattern, **overrides)
    cfg = tiny_config(pattern, weight_dtype="int8", **overrides)
    int8_model, int8_params = for_decoding(build_model(cfg), params)
    kernels = [x for x in jax.tree.leaves(int8_params) if x.dtype == jnp.int8]
    assert len(kernels) == 4 * cfg.n_layers + 1  # qkv, o_proj, gate_up, down_proj per layer; the LM head
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (BATCH, 9)))
    full, prefill, extend, tree = forwards(int8_model, int8_params, tokens, apply)
    # The int8 model agrees with itself in every mode (what speculative exactness needs) ...
    np.testing.assert_allclose(prefill, full[:, :6], **TOL)
    np.testing.assert_allclose(extend, full[:, 6:8], **TOL)
    np.testing.assert_allclose(tree[:, :2], full[:, 6:8], **TOL)
    # ... and stays near the float model: weight errors of at most half a step per row.
    want = np.asarray(apply(model, params, tokens))
    assert np.abs(full - want).max() < 0.05 * np.abs(want).max()


def test_lm_head_kernel_reads_every_layout(make_model, tiny_config):
    for overrides in ({}, {"tie_embeddings": False}):
        model, params = make_model("A", **overrides)
        want = np.asarray(lm_head_kernel(params, model.model_cfg))
        _, decode_params = for_decoding(model, params)
        np.testing.assert_array_equal(lm_head_kernel(decode_params, model.model_cfg), want)
        int8_cfg = tiny_config("A", weight_dtype="int8", **overrides)
        _, int8_params = for_decoding(build_model(int8_cfg), params)
        got = np.asarray(lm_head_kernel(int8_params, int8_cfg))
        assert got.shape == want.shape and np.abs(got - want).max() <= np.abs(want).max() / 127


def test_bad_layouts_raise_clear_errors(make_model, tiny_config):
    model, params = make_model("A")
    decode_params = to_decode_layout(params, model.model_cfg)
    with pytest.raises(ValueError, match="already in the decode layout"):
        to_decode_layout(decode_params, model.model_cfg)
    with pytest.raises(ValueError, match="no fused 'qkv'"):
        to_standard_layout(params, model.model_cfg)
    with pytest.raises(ValueError, match="has no 'layer_1'"):
        to_decode_layout({"layer_0": params["layer_0"]}, model.model_cfg)
    int8_cfg = tiny_config("A", weight_dtype="int8")
    int8_params = to_decode_layout(params, int8_cfg)
    with pytest.raises(ValueError, match="int8 weights cannot be turned back"):
        to_standard_layout(int8_params, int8_cfg)
    with pytest.raises(ValueError, match="standard-layout params"):
        extract_submodel(decode_params, model.model_cfg, 0)
    with pytest.raises(ValueError, match="layout='sideways'"):
        DecoderLM(model.model_cfg, layout="sideways").init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="input has 3 features"):
        layers.matmul_t(jnp.ones((2, 3)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="weight_dtype"):
        build_model(tiny_config("A", weight_dtype="int4"))
    decode_model, converted = for_decoding(model, params)
    again = for_decoding(decode_model, converted)
    assert again[0] is decode_model and again[1] is converted  # already converted: passed through
