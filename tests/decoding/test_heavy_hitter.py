"""Heavy-hitter KV (H2O): the budgeted cache against full attention and against an independent reference, the lossy
mode "h2o" (refused when lossless decoding is required) and the lossless self-draft "h2o_draft"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.config import ConfigError
from jaxspec.decoding import api, methods
from jaxspec.decoding.method import Target
from jaxspec.errors import InputError
from jaxspec.state import commit, init_decode_state

BUDGET, RECENT = 12, 3


@pytest.fixture(scope="module")
def model_and_params(make_model):
    return make_model("A", seed=3, max_len=64)


# ------------------------------------------------------------------ an independent reference: full forwards
# The tiny attention model written out in numpy (float64), every layer's attention under an explicit visibility
# mask [layers, Hkv, T, T]: the lossy decode replayed as full forwards, the kept sets tracked by position.

def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):  # x [H, T, D], half-split as Llama
    half = x.shape[-1] // 2
    angles = positions[:, None] / theta ** (np.arange(0, x.shape[-1], 2) / x.shape[-1])
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def reference_forward(params, cfg, tokens, visible):
    """(logits [T, V], attention probabilities [layers, H, T, T]) of `tokens` under `visible`."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    t, hd, group = len(tokens), cfg.d_model // cfg.n_heads, cfg.n_heads // cfg.n_kv_heads
    heads = lambda y, n: y.reshape(t, n, hd).transpose(1, 0, 2)
    x = p["embed"]["embedding"][np.asarray(tokens)]
    probs = []
    for i in range(cfg.n_layers):
        layer = p[f"layer_{i}"]
        h = _rms(x, layer["mixer_norm"]["scale"], cfg.rms_eps)
        q, k, v = (heads(h @ layer["attn"][f"{n}_proj"]["kernel"], m)
                   for n, m in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)))
        q, k = _rope(q, np.arange(t), cfg.rope_theta), _rope(k, np.arange(t), cfg.rope_theta)
        k, v, seen = np.repeat(k, group, 0), np.repeat(v, group, 0), np.repeat(visible[i], group, 0)
        scores = np.where(seen, q @ k.transpose(0, 2, 1) / np.sqrt(hd), -np.inf)
        prob = np.exp(scores - scores.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        probs.append(prob)
        x = x + (prob @ v).transpose(1, 0, 2).reshape(t, -1) @ layer["attn"]["o_proj"]["kernel"]
        h = _rms(x, layer["ffn_norm"]["scale"], cfg.rms_eps)
        gate = h @ layer["ffn"]["gate_proj"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ layer["ffn"]["up_proj"])) @ layer["ffn"]["down_proj"]
    logits = _rms(x, p["final_norm"]["scale"], cfg.rms_eps) @ p["embed"]["embedding"].T
    return logits, np.stack(probs)


def reference_h2o(params, cfg, prompt, max_new, budget, recent):
    """Greedy H2O decoding as full forwards: the prompt's queries see the whole prompt; then every new query
    sees the kept keys of its layer and KV head plus itself. Returns (tokens, the kept sets after the last
    forward). A budget holding the whole sequence makes it greedy decoding with full attention."""
    n = len(prompt) + max_new
    visible = np.zeros((cfg.n_layers, cfg.n_kv_heads, n, n), bool)
    visible[..., :len(prompt), :len(prompt)] = np.tril(np.ones((len(prompt),) * 2, bool))
    score = np.zeros((cfg.n_layers, cfg.n_kv_heads, n))
    kept = [[set() for _ in range(cfg.n_kv_heads)] for _ in range(cfg.n_layers)]
    seq, queries = list(prompt), list(range(len(prompt)))
    while True:
        t = len(seq)
        logits, probs = reference_forward(params, cfg, seq, visible[..., :t, :t])
        score[..., :t] += probs[:, :, queries].sum(2).reshape(cfg.n_layers, cfg.n_kv_heads, -1, t).sum(2)
        for layer, head in np.ndindex(cfg.n_layers, cfg.n_kv_heads):
            candidates = kept[layer][head] | set(queries)
            window = {j for j in candidates if j >= t - recent}
            rest = sorted(candidates - window, key=lambda j: (-score[layer, head, j], -j))
            kept[layer][head] = window | set(rest[:budget - len(window)])
        seq.append(int(np.argmax(logits[-1])))
        if len(seq) == n:
            return seq[len(prompt):], kept
        for layer, head in np.ndindex(cfg.n_layers, cfg.n_kv_heads):
            visible[layer, head, t, sorted(kept[layer][head] | {t})] = True
        queries = [t]


@functools.partial(jax.jit, static_argnames=("model",))
def _prefill(model, params, tokens, num_new):
    state = init_decode_state(model.model_cfg, tokens.shape[0], tokens.shape[1])
    return model.apply({"params": params}, tokens, state=state, num_new=num_new, fresh=True)


@functools.partial(jax.jit, static_argnames=("model",))
def _step(model, params, token, state):
    return model.apply({"params": params}, token, state=state)


def replay(model, params, seq, prefill: int, width: int = 24):
    """(logits [len(seq), V], state): a prefill of seq[:prefill] (right-padded to `width`, so every call compiles
    the same two programs), then one-token steps through the rest."""
    padded = jnp.asarray([seq[:prefill] + [0] * (width - prefill)], jnp.int32)
    logits, state = _prefill(model, params, padded, jnp.asarray([prefill]))
    rows = [np.asarray(logits)[0, :prefill]]
    for token in seq[prefill:]:
        logits, state = _step(model, params, jnp.asarray([[token]], jnp.int32), state)
        rows.append(np.asarray(logits)[0])
    return np.concatenate(rows), state


# ------------------------------------------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def decoder(model_and_params):
    model, params = model_and_params
    return methods.make("h2o", budget=BUDGET, recent=RECENT).decoder(Target(model, params))[0]


def test_budget_holding_the_context_is_full_attention(model_and_params, decoder):
    """Logits of the budgeted cache (prefill, then steps) equal full attention's while the budget holds the
    sequence; the numpy reference gives them too (which checks the reference)."""
    model, params = model_and_params
    seq = [5, 9, 2, 33, 7, 1, 60, 14, 22, 3, 41, 8]
    logits, state = replay(decoder, params, seq, prefill=6)
    cfg = model.model_cfg
    visible = np.broadcast_to(np.tril(np.ones((len(seq),) * 2, bool)), (cfg.n_layers, cfg.n_kv_heads) + (len(seq),) * 2)
    reference, _ = reference_forward(params, cfg, seq, visible)
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)
    assert sorted(np.asarray(state.layers[0].position)[0, 0].tolist()) == list(range(BUDGET))


def test_lossy_mode_equals_the_full_forward_reference(model_and_params, decoder):
    """One batch: row 0 fits the budget (its output is full attention's), row 1 evicts from its prefill on (its
    output, and the kept sets of a replay of it, are the reference's, and differ from full attention's)."""
    model, params = model_and_params
    cfg, max_new = model.model_cfg, 8
    prompts = [[7, 3, 9, 1], [int(x) for x in np.random.default_rng(0).integers(1, 64, 21)]]
    out = api.generate(model, params, prompts, method="h2o", budget=BUDGET, recent=RECENT, max_new_tokens=max_new)
    everything = len(prompts[1]) + max_new
    assert out.tokens[0] == reference_h2o(params, cfg, prompts[0], max_new, everything, 0)[0]
    ref_tokens, ref_kept = reference_h2o(params, cfg, prompts[1], max_new, BUDGET, RECENT)
    assert out.tokens[1] == ref_tokens
    assert ref_tokens != reference_h2o(params, cfg, prompts[1], max_new, everything, 0)[0]  # lossy

    # The loop caches every token but the last one it emits.
    _, state = replay(decoder, params, prompts[1] + ref_tokens[:-1], prefill=len(prompts[1]))
    for layer, head in np.ndindex(cfg.n_layers, cfg.n_kv_heads):
        assert set(np.asarray(state.layers[layer].position)[0, head].tolist()) == ref_kept[layer][head]


def test_self_draft_greedy_equals_autoregressive(model_and_params):
    """Greedy output of the self-draft (a budget far below the context, a branching tree, rows of different
    lengths) is the autoregressive one: the reference with a budget holding everything is greedy decoding by full
    forwards."""
    model, params = model_and_params
    prompts, max_new = [[int(x) for x in np.random.default_rng(1).integers(1, 64, 19)], [4, 8, 15, 16, 23]], 12
    out = api.generate(model, params, prompts, method="h2o_draft", budget=6, recent=2, tree="branching:2,1",
                       max_new_tokens=max_new, require_lossless=True)
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == reference_h2o(params, model.model_cfg, prompt, max_new, len(prompt) + max_new, 0)[0]
    assert int(out.accepted.sum()) > int(out.target_steps.sum())  # it drafts: some drafts are accepted


def test_lossy_mode_is_marked_and_refused_when_lossless_is_required(model_and_params):
    model, params = model_and_params
    assert methods.get("h2o").lossless is False and methods.get("h2o_draft").lossless is True
    with pytest.raises(InputError, match="method 'h2o' is lossy"):
        api.generate(model, params, [[1, 2, 3]], method="h2o", require_lossless=True)


@pytest.mark.parametrize("name, fields, message", [
    ("h2o", dict(budget=0), "budget=0 is not allowed"),
    ("h2o", dict(budget=8, recent=9), "recent=9 is not allowed: an integer in \\[0, budget=8\\]"),
    ("h2o_draft", dict(budget=2.5), "budget=2.5 is not allowed"),
    ("h2o_draft", dict(recent=-1), "recent=-1 is not allowed"),
])
def test_bad_fields_name_the_field(name, fields, message):
    with pytest.raises(ConfigError, match=message):
        methods.make(name, **fields)


def test_misuse_of_a_budgeted_cache_is_refused(model_and_params, decoder, make_model):
    model, params = model_and_params
    tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
    with pytest.raises(InputError, match="needs a decode state"):
        model.apply({"params": params}, tokens, kv_budget=(4, 1))
    with pytest.raises(InputError, match="starts at a fresh prefill"):
        model.apply({"params": params}, tokens, state=init_decode_state(model.model_cfg, 1, 8), kv_budget=(4, 1))
    _, state = replay(decoder, params, [1, 2, 3], prefill=3)
    with pytest.raises(InputError, match="differs from the budget"):
        model.apply({"params": params}, tokens, state=state, kv_budget=(8, 1))
    with pytest.raises(InputError, match="commit: a budgeted"):
        commit(state.replace(pending=state.layers), jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    windowed, windowed_params = make_model("A", n_layers=3, layer_windows=(4, 0, 3))
    with pytest.raises(InputError, match="sliding window"):
        methods.make("h2o").decoder(Target(windowed, windowed_params))
