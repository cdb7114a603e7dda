"""Gemma 3 features of the model: sliding-window attention (full forward, and decoding through the Pallas
tree-attention kernel), per-layer RoPE bases, the GeGLU FFN, and validation of every new config value.

Agreement with transformers' Gemma3ForCausalLM itself is tested in tests/interop/test_hf.py; the decode
modes of the Gemma-style model through the reference attention run as the "gemma" case of the shared
`mixer_model` fixture (tests/models/test_lm.py, tests/test_state.py).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from jaxspec import config as config_lib
from jaxspec.config import ConfigError
from jaxspec.models.attention import causal_attention
from jaxspec.models.layers import MatFormerFFN
from jaxspec.state import commit, init_decode_state

TOL = dict(atol=1e-5, rtol=1e-5)
BATCH = 3
MAX_LEN = 32
NODES = 6
# Windows of 4 and 3 around a global layer: the test sequences are longer than both.
GEMMA = dict(n_layers=3, layer_windows=(4, 0, 3), rope_local_theta=100.0, qk_norm=True, sandwich_norms=True,
             embed_scale=True, ffn_activation="gelu_tanh", query_scale=0.3)


def windowed_attention_numpy(q, k, v, window, scale):
    """Causal attention with key j visible to query i iff i - window < j <= i (window 0: every j <= i)."""
    _, h, t, d = q.shape
    group = h // k.shape[1]
    out = np.zeros(q.shape)
    for i in range(t):
        keys = [j for j in range(i + 1) if not window or j > i - window]
        for head in range(h):
            scores = np.einsum("bd,bjd->bj", q[:, head, i], k[:, head // group, keys]) * scale
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head, i] = np.einsum("bj,bjd->bd", p / p.sum(-1, keepdims=True), v[:, head // group, keys])
    return out


@pytest.mark.parametrize("window", [0, 1, 3, 20])
def test_full_forward_window_is_transformers_window(window, tiny_config):
    """jax's local_window_size counts (left, right) inclusively; the model's window is transformers'."""
    rng = np.random.default_rng(window)
    q = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 2, 9, 8)).astype(np.float32)
    cfg = ml_collections.FrozenConfigDict(tiny_config("A", query_scale=0.3))
    attend = jax.jit(causal_attention, static_argnames=("model_cfg", "window"))
    got = attend(q, k, v, model_cfg=cfg, window=window)
    np.testing.assert_allclose(got, windowed_attention_numpy(q, k, v, window, 0.3), **TOL)


def test_sliding_window_is_refused_under_sequence_parallelism(tiny_config):
    q = jnp.zeros((1, 4, 8, 8))
    k = jnp.zeros((1, 2, 8, 8))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sequence",))
    with pytest.raises(ValueError, match="sliding window.*mesh.sequence"):
        causal_attention(q, k, k, model_cfg=tiny_config("A"), mesh=mesh, window=4)


def random_tree(rng, k: int) -> np.ndarray:
    return np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, k)])


def root_path(parents, node) -> list[int]:
    path = []
    while node >= 0:
        path.append(int(node))
        node = parents[node]
    return path[::-1]


def test_pallas_tree_verify_with_windows_matches_full_forward(make_model, apply, full_logits, final_logits):
    """Fresh ragged prefill, two rounds of per-row random trees (every node checked) and commits of part of
    each row's deepest path, then one more token: through the Pallas kernel, against the full forward."""
    model, params = make_model("A", attention={"implementation": "pallas"}, **GEMMA)
    vocab = model.model_cfg.vocab_size
    rng = np.random.default_rng(0)
    prompt_lengths = [7, 2, 5]
    prompt = rng.integers(0, vocab, (BATCH, 8))
    state = init_decode_state(model.model_cfg, BATCH, MAX_LEN)
    prefill = jax.jit(lambda p, x, s, n: model.apply({"params": p}, x, state=s, num_new=n, fresh=True))
    logits, state = prefill(params, jnp.asarray(prompt), state, jnp.asarray(prompt_lengths))
    committed = [list(prompt[b, :n]) for b, n in enumerate(prompt_lengths)]
    for b, want in enumerate(full_logits(model, params, committed)):
        np.testing.assert_allclose(np.asarray(logits[b, :prompt_lengths[b]]), want, **TOL, err_msg=f"row {b}")
    for round_ in range(2):
        parents = np.stack([random_tree(rng, NODES) for _ in range(BATCH)])
        tokens = rng.integers(0, vocab, (BATCH, NODES))
        logits, state = apply(model, params, jnp.asarray(tokens), state=state, parents=jnp.asarray(parents))
        paths = [[root_path(parents[b], i) for i in range(NODES)] for b in range(BATCH)]
        want = final_logits(model, params, [committed[b] + list(tokens[b, p]) for b in range(BATCH) for p in paths[b]])
        np.testing.assert_allclose(np.asarray(logits).reshape(BATCH * NODES, -1), want, **TOL,
                                   err_msg=f"tree nodes, round {round_}")
        # Row 0 takes its whole deepest path, row 1 its first node, row 2 all but the last.
        chosen = [max(paths[b], key=len) for b in range(BATCH)]
        accepted = [len(chosen[0]), 1, len(chosen[2]) - 1]
        path_array = np.zeros((BATCH, NODES), np.int32)
        for b in range(BATCH):
            path_array[b, :len(chosen[b])] = chosen[b]
            committed[b] += list(tokens[b, chosen[b][:accepted[b]]])
        state = jax.jit(commit)(state, jnp.asarray(path_array), jnp.asarray(accepted))
    next_tokens = rng.integers(0, vocab, (BATCH, 1))
    logits, state = apply(model, params, jnp.asarray(next_tokens), state=state)
    for b in range(BATCH):
        committed[b].append(next_tokens[b, 0])
    assert min(len(c) for c in committed) > max(GEMMA["layer_windows"])  # the windows did cut the context
    np.testing.assert_allclose(np.asarray(logits[:, 0]), final_logits(model, params, committed), **TOL)
    np.testing.assert_array_equal(state.lengths, [len(c) for c in committed])


def test_layer_windows_and_rope_bases(tiny_config):
    cfg = tiny_config("A", **GEMMA)
    assert [config_lib.layer_window(cfg, i) for i in range(3)] == [4, 0, 3]
    assert [config_lib.layer_rope_theta(cfg, i) for i in range(3)] == [100.0, cfg.rope_theta, 100.0]
    plain = tiny_config("A", rope_local_theta=100.0)  # no windows: every layer is global, with rope_theta
    assert [config_lib.layer_rope_theta(plain, i) for i in range(2)] == [plain.rope_theta] * 2


def test_defaults_add_nothing_and_explicit_defaults_change_nothing(make_model, apply):
    model, params = make_model("A")
    names = {"/".join(path) for path in traverse_util.flatten_dict(params)}
    assert not any(word in name for name in names for word in ("q_norm", "k_norm", "post_"))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))
    cfg = model.model_cfg
    hd = config_lib.head_dim(cfg)
    explicit, _ = make_model("A", query_scale=hd**-0.5, layer_windows=(0, 0), rope_local_theta=5.0)
    np.testing.assert_allclose(apply(explicit, params, tokens), apply(model, params, tokens), atol=1e-6, rtol=0)


def test_gelu_tanh_ffn_matches_geglu_formula():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32) * 2
    weights = dict(gate_proj=rng.standard_normal((8, 16)), up_proj=rng.standard_normal((8, 16)),
                   down_proj=rng.standard_normal((16, 8)))
    weights = {name: w.astype(np.float32) for name, w in weights.items()}
    got = MatFormerFFN(d_model=8, hidden_sizes=(16,), activation="gelu_tanh").apply({"params": weights}, x)
    g = x @ weights["gate_proj"]
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    np.testing.assert_allclose(got, (gelu * (x @ weights["up_proj"])) @ weights["down_proj"], atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="'relu' is not known"):
        MatFormerFFN(d_model=8, hidden_sizes=(16,), activation="relu").apply({"params": weights}, x)


BAD_VALUES = {
    "activation_name": (dict(ffn_activation="relu"), r"model.ffn_activation='relu'.*one of \('silu', 'gelu_tanh'\)"),
    "embed_scale_not_bool": (dict(embed_scale=1), r"model.embed_scale=1.*True or False"),
    "qk_norm_not_bool": (dict(qk_norm="yes"), r"model.qk_norm='yes'.*True or False"),
    "sandwich_norms_not_bool": (dict(sandwich_norms=None), r"model.sandwich_norms=None.*True or False"),
    "negative_query_scale": (dict(query_scale=-0.5), r"model.query_scale=-0.5.*positive number"),
    "negative_local_theta": (dict(rope_local_theta=-1.0), r"model.rope_local_theta=-1.0.*positive number"),
    "negative_window": (dict(layer_windows=(4, -1)), r"model.layer_windows=\(4, -1\).*non-negative integers"),
    "fractional_window": (dict(layer_windows=(4, 2.5)), r"model.layer_windows=\(4, 2.5\).*non-negative integers"),
    "windows_wrong_length": (dict(layer_windows=(4,)), r"model.layer_windows=\(4,\).*n_layers=2"),
    "window_on_linear_attention": (dict(layer_pattern="AL", layer_windows=(4, 4)),
                                   r"model.layer_windows=\(4, 4\).*not attention \(layers \[1\]"),
    "block_sparse_prefill_with_windows": (dict(layer_windows=(4, 0), attention={"prefill": "block_sparse"}),
                                          r"model.attention.prefill='block_sparse'.*'dense' when layer_windows"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_gemma_config_values_name_key_value_and_allowed(tiny_config, case):
    overrides, match = BAD_VALUES[case]
    cfg = tiny_config("A")
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            with cfg.ignore_type():
                cfg[key] = value
    with pytest.raises(ConfigError, match=match):
        config_lib.validate_model_config(cfg)
