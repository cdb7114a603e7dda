"""Hugging Face import/export against transformers itself: logits, greedy generations, exact round trips.

Every checkpoint is a tiny random transformers model saved locally; nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import traverse_util

from jaxspec import config as config_lib
from jaxspec.interop import hf
from jaxspec.models.lm import build_model
from jaxspec.state import init_decode_state
from jaxspec.training.checkpoint import restore_params

torch.set_num_threads(1)  # tiny matmuls: thread start-up costs more than it saves on a shared CPU

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 100
NEW_TOKENS = 32
# No special ids: transformers' generate then runs the full NEW_TOKENS, as the jaxspec loop does.
NO_SPECIALS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
TRANSFORMER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   initializer_range=0.1, **NO_SPECIALS)

# family -> (transformers config class, model class, config kwargs)
FAMILIES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(TRANSFORMER, num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "llama_untied": ("LlamaConfig", "LlamaForCausalLM",
                     dict(TRANSFORMER, num_attention_heads=4, num_key_value_heads=4, head_dim=24,
                          tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(TRANSFORMER, num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
                     rope_theta=20000.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(TRANSFORMER, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "mamba": ("MambaConfig", "MambaForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4,
                   expand=2, time_step_rank=3, **NO_SPECIALS)),
    # Sliding windows of 4 (shorter than every test sequence) around a global layer, different local and
    # global RoPE bases, a query scale other than 1/sqrt(head_dim).
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(TRANSFORMER, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 5000.0}},
                    query_pre_attn_scalar=20, max_position_embeddings=128)),
}


def build_hf_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    if family == "qwen2":  # q/k/v biases start at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
    if family == "gemma3":  # Gemma norm weights start at zero (a scale of 1 + 0); make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.5)
    return model


@functools.cache
def _saved(family: str, root: str):
    model = build_hf_model(family)
    path = os.path.join(root, family)
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def saved(hf_root):
    """family -> (transformers model, checkpoint directory), built once per session."""
    return lambda family: _saved(family, hf_root)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def hf_greedy(model, prompt: np.ndarray, steps: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             max_new_tokens=steps, do_sample=False)
    return out[:, prompt.shape[1]:].numpy()


@functools.partial(jax.jit, static_argnums=(0, 3))
def jax_greedy(model, params, prompt, steps: int):
    """Extend the prompt into a decode state, then one token at a time; the argmax tokens [B, steps]."""
    state = init_decode_state(model.model_cfg, prompt.shape[0], prompt.shape[1] + steps)
    logits, state = model.apply({"params": params}, prompt, state=state)
    first = jnp.argmax(logits[:, -1], axis=-1)

    def step(carry, _):
        tok, state = carry
        logits, state = model.apply({"params": params}, tok[:, None], state=state)
        return (jnp.argmax(logits[:, -1], axis=-1), state), tok

    (last, _), toks = jax.lax.scan(step, (first, state), None, length=steps - 1)
    return jnp.concatenate([toks.T, last[:, None]], axis=1)


@functools.partial(jax.jit, static_argnums=0, static_argnames="granularity")
def jax_logits(model, params, tokens, granularity=None):
    return model.apply({"params": params}, tokens, granularity=granularity)


def random_tokens(shape, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int32)


def assert_trees_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


# ------------------------------------------------------------------------------------------- import parity


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers_logits_and_greedy(saved, family):
    hf_model, path = saved(family)
    model_cfg, params = hf.load_hf_checkpoint(path)
    model = build_model(model_cfg)
    tokens = random_tokens((2, 16))
    np.testing.assert_allclose(np.asarray(jax_logits(model, params, tokens)), hf_logits(hf_model, tokens),
                               atol=1e-4, rtol=0)
    prompt = random_tokens((2, 6), seed=1)
    expected = hf_greedy(hf_model, prompt, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(jax_greedy(model, params, prompt, NEW_TOKENS)), expected)


def test_import_maps_config_fields(saved):
    cfg, _ = hf.load_hf_checkpoint(saved("llama_untied")[1])
    assert (cfg.layer_pattern, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == ("A", 4, 4, 24, 96)
    assert (cfg.tie_embeddings, cfg.qkv_bias, cfg.max_len) == (False, False, 2048)
    cfg, _ = hf.load_hf_checkpoint(saved("mistral")[1], max_len=64)
    assert (cfg.rope_theta, cfg.n_kv_heads, cfg.max_len) == (20000.0, 1, 64)
    cfg, _ = hf.load_hf_checkpoint(saved("qwen2")[1])
    assert cfg.qkv_bias and cfg.tie_embeddings
    hf_model, path = saved("mamba")
    cfg, params = hf.load_hf_checkpoint(path, dtype="bfloat16")
    assert (cfg.layer_pattern, cfg.mamba.ffn, cfg.mamba.dt_rank, cfg.mamba.d_state, cfg.dtype) == (
        "M", False, 3, 8, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    tokens = random_tokens((1, 8))  # bfloat16 weights and compute: close, not equal
    np.testing.assert_allclose(np.asarray(jax_logits(build_model(cfg), params, tokens)),
                               hf_logits(hf_model, tokens), atol=0.1, rtol=0)


def test_gemma3_config_and_folded_norms(saved):
    hf_model, path = saved("gemma3")
    cfg, params = hf.load_hf_checkpoint(path)
    assert (cfg.layer_windows, cfg.rope_theta, cfg.rope_local_theta) == ((4, 0, 4), 5000.0, 100.0)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.query_scale, cfg.tie_embeddings) == (16, 2, 20**-0.5, True)
    assert (cfg.ffn_activation, cfg.embed_scale, cfg.qk_norm, cfg.sandwich_norms) == ("gelu_tanh", True, True, True)
    # Gemma's (1 + w), folded in float32: the very product transformers computes.
    layer = hf_model.model.layers[1]
    for ours, theirs in ((("layer_1", "post_mixer_norm"), layer.post_attention_layernorm),
                         (("layer_1", "ffn_norm"), layer.pre_feedforward_layernorm),
                         (("layer_1", "attn", "k_norm"), layer.self_attn.k_norm)):
        scale = traverse_util.flatten_dict(params)[(*ours, "scale")]
        np.testing.assert_array_equal(np.asarray(scale), (1.0 + theirs.weight.detach().float()).numpy())


def test_gemma3_legacy_config_keys_map_like_transformers():
    """Older Gemma 3 configs: rope_theta / rope_local_base_freq and sliding_window_pattern, no layer_types;
    model_type alone (no architectures) names the text model."""
    legacy = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                  sliding_window_pattern=2, rope_theta=20000.0, rope_local_base_freq=50.0, query_pre_attn_scalar=16)
    reference = transformers.Gemma3TextConfig(**legacy)
    cfg = hf.model_config_from_hf(legacy)
    assert reference.layer_types == ["sliding_attention", "full_attention"] * 2
    assert cfg.layer_windows == (8, 0, 8, 0)
    assert (cfg.rope_theta, cfg.rope_local_theta) == (reference.rope_parameters["full_attention"]["rope_theta"],
                                                      reference.rope_parameters["sliding_attention"]["rope_theta"])
    assert (cfg.query_scale, cfg.n_kv_heads, cfg.tie_embeddings) == (0.25, 1, True)
    with pytest.raises(ValueError, match="model_type='gemma3'.*not supported"):  # the multimodal config
        hf.model_config_from_hf({**legacy, "model_type": "gemma3"})


def test_sharded_checkpoint_imports_like_single_file(saved, tmp_path):
    hf_model, path = saved("llama_gqa")
    sharded = str(tmp_path / "sharded")
    hf_model.save_pretrained(sharded, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(sharded, hf.INDEX_FILE))
    assert_trees_equal(hf.load_hf_checkpoint(sharded)[1], hf.load_hf_checkpoint(path)[1])
    with open(os.path.join(sharded, hf.INDEX_FILE)) as fh:
        shard = sorted(set(json.load(fh)["weight_map"].values()))[-1]
    os.remove(os.path.join(sharded, shard))
    with pytest.raises(ValueError, match=f"missing.*{shard}"):
        hf.load_hf_checkpoint(sharded)


def test_mamba_without_conv_bias_matches_transformers(tmp_path):
    hf_model = build_hf_model("mamba", seed=1, use_conv_bias=False, tie_word_embeddings=False)
    hf_model.save_pretrained(str(tmp_path))
    cfg, params = hf.load_hf_checkpoint(str(tmp_path))
    assert not cfg.tie_embeddings
    tokens = random_tokens((1, 12))
    np.testing.assert_allclose(np.asarray(jax_logits(build_model(cfg), params, tokens)),
                               hf_logits(hf_model, tokens), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------- export


def native_model(seed=0, **overrides):
    """(config, model, params) of a jaxspec attention model with random values in every parameter (norm
    scales near 1, biases nonzero), drawn in numpy so no initialiser has to compile."""
    cfg = config_lib.model_defaults()
    cfg.update({**dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64,
                       rope_theta=500.0, tie_embeddings=False), **overrides})
    rng = np.random.RandomState(seed)
    flat = {path: (path[-1] == "scale") + 0.2 * rng.standard_normal(shape).astype(np.float32)
            for path, shape in sorted(hf.param_shapes(cfg).items())}
    return cfg, build_model(cfg), jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))


EXPORT_CASES = {
    "llama_untied": (dict(), None, "LlamaForCausalLM"),
    "qwen2_bias_tied": (dict(qkv_bias=True, tie_embeddings=True), None, "Qwen2ForCausalLM"),
    "matformer_half": (dict(matformer_fractions=(0.5, 1.0)), 0, "LlamaForCausalLM"),
    "gemma3_windows": (dict(hf.GEMMA3_FEATURES, layer_windows=(3, 0), rope_local_theta=50.0, query_scale=0.25),
                       None, "Gemma3ForCausalLM"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_transformers_with_same_logits(case, tmp_path):
    overrides, granularity, architecture = EXPORT_CASES[case]
    cfg, model, params = native_model(**overrides)
    hf.export_hf_checkpoint(params, cfg, str(tmp_path), granularity=granularity)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf_model).__name__ == architecture
    tokens = random_tokens((2, 12))
    np.testing.assert_allclose(hf_logits(hf_model, tokens),
                               np.asarray(jax_logits(model, params, tokens, granularity=granularity)),
                               atol=1e-4, rtol=0)
    if granularity is not None:
        assert hf_model.config.intermediate_size == config_lib.ffn_hidden_sizes(cfg)[granularity]


@pytest.mark.parametrize("family", ["llama_untied", "qwen2"])
def test_import_export_import_round_trip_is_exact(saved, family, tmp_path):
    _, path = saved(family)
    cfg, params = hf.load_hf_checkpoint(path)
    hf.export_hf_checkpoint(params, cfg, str(tmp_path))
    original = safetensors.numpy.load_file(os.path.join(path, hf.SINGLE_FILE))
    exported = safetensors.numpy.load_file(os.path.join(tmp_path, hf.SINGLE_FILE))
    assert sorted(exported) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    cfg2, params2 = hf.load_hf_checkpoint(str(tmp_path))
    assert cfg2.to_dict() == cfg.to_dict()
    assert_trees_equal(params2, params)


def test_gemma3_import_export_import_round_trip(saved, tmp_path):
    """Unfolding (scale - 1) and folding again restores every norm scale bit for bit; transformers loads the
    export as the same model."""
    hf_model, path = saved("gemma3")
    cfg, params = hf.load_hf_checkpoint(path)
    hf.export_hf_checkpoint(params, cfg, str(tmp_path))
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(exported).__name__ == "Gemma3ForCausalLM"
    assert exported.config.layer_types == hf_model.config.layer_types
    tokens = random_tokens((2, 12))
    np.testing.assert_allclose(hf_logits(exported, tokens), hf_logits(hf_model, tokens), atol=1e-5, rtol=0)
    cfg2, params2 = hf.load_hf_checkpoint(str(tmp_path))
    assert cfg2.to_dict() == cfg.to_dict()
    assert_trees_equal(params2, params)


NOT_EXPORTABLE = {
    "partial_gemma": (dict(qk_norm=True), "partial Gemma 3"),
    "llama_with_windows": (dict(layer_windows=(4, 0)), "Llama/Qwen2 export has no sliding windows"),
    "llama_query_scale": (dict(query_scale=0.3), "scales scores by 1/sqrt"),
    "gemma_two_window_sizes": (dict(hf.GEMMA3_FEATURES, layer_windows=(4, 8)), "several window sizes"),
    "gemma_query_scale": (dict(hf.GEMMA3_FEATURES, query_scale=0.3), "query_scale=0.3 is not n \\*\\* -0.5"),
    "gemma_qkv_bias": (dict(hf.GEMMA3_FEATURES, qkv_bias=True), "no q/k/v biases"),
}


@pytest.mark.parametrize("case", list(NOT_EXPORTABLE))
def test_export_rejects_feature_mixes_no_family_holds(case, tmp_path):
    overrides, message = NOT_EXPORTABLE[case]
    cfg, _, params = native_model(**overrides)
    with pytest.raises(ValueError, match=message):
        hf.export_hf_checkpoint(params, cfg, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_export_rejects_models_transformers_cannot_hold(tmp_path):
    cfg, _, params = native_model()
    hybrid = ml_collections.ConfigDict(cfg.to_dict())
    hybrid.layer_pattern = "AM"
    with pytest.raises(ValueError, match="layer_pattern='AM'.*mamba"):
        hf.export_hf_checkpoint(params, hybrid, str(tmp_path))
    nested_cfg, _, nested = native_model(matformer_fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="mixes FFN widths"):
        hf.export_hf_checkpoint(nested, nested_cfg, str(tmp_path), granularity=(0, 1))
    with pytest.raises(ValueError, match="granularity 2 is not in the configured set"):
        hf.export_hf_checkpoint(nested, nested_cfg, str(tmp_path), granularity=2)
    wider = ml_collections.ConfigDict(cfg.to_dict())
    wider.d_ff = 96
    with pytest.raises(ValueError, match="layer_0/ffn/down_proj"):
        hf.export_hf_checkpoint(params, wider, str(tmp_path))
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------- bad input


def write_config(directory, config: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, hf.CONFIG_FILE), "w") as fh:
        json.dump(config, fh)
    return str(directory)


def saved_config(path: str) -> dict:
    with open(os.path.join(path, hf.CONFIG_FILE)) as fh:
        return json.load(fh)


UNSUPPORTED = {
    "activation": ("llama_gqa", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    "rope_scaling": ("llama_gqa", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
                     "rope type 'llama3'"),
    "partial_rope": ("llama_gqa", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    "o_proj_bias": ("llama_gqa", {"attention_bias": True}, "attention_bias=true"),
    "mlp_bias": ("llama_gqa", {"mlp_bias": True}, "mlp_bias=true"),
    "mistral_window": ("mistral", {"sliding_window": 16}, r"sliding_window=16 in effect on layers \[0, 1\]"),
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "layer_types": None,
                               "max_window_layers": 1}, r"sliding_window=8 in effect on layers \[1\]"),
    "mamba_bias": ("mamba", {"use_bias": True}, "use_bias=true"),
    "quantized": ("qwen2", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    "gemma3_final_softcap": ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    "gemma3_attn_softcap": ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    "gemma3_global_rope_scaling": ("gemma3", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
                                   "rope type 'linear' on the full_attention layers"),
    "gemma3_local_rope_scaling": ("gemma3", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 5000.0},
        "sliding_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}}},
        "rope type 'dynamic' on the sliding_attention layers"),
    "gemma3_activation": ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    "gemma3_bidirectional": ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    "gemma3_layer_type": ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
                          "layer_types=.*chunked_attention"),
    "gemma3_no_window": ("gemma3", {"sliding_window": None}, "sliding_window=None with sliding_attention"),
    "gemma3_flat_rope": ("gemma3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
                         "only per-layer-type entries"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_features_are_rejected_by_name(saved, case, tmp_path):
    family, edit, message = UNSUPPORTED[case]
    hf_dir = write_config(tmp_path, {**saved_config(saved(family)[1]), **edit})
    with pytest.raises(ValueError, match=message):
        hf.load_hf_checkpoint(hf_dir)


def test_sliding_window_not_in_effect_is_accepted(saved, tmp_path):
    _, path = saved("mistral")
    shutil.copytree(path, tmp_path / "m")
    write_config(tmp_path / "m", {**saved_config(path), "sliding_window": 4096, "max_position_embeddings": 4096})
    assert hf.load_hf_checkpoint(str(tmp_path / "m"))[0].max_len == 4096


def test_unknown_architecture_and_missing_config_name_the_file(saved, tmp_path):
    gpt2 = write_config(tmp_path / "gpt2", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        hf.load_hf_checkpoint(gpt2)
    mamba2 = write_config(tmp_path / "mamba2", {**saved_config(saved("mamba")[1]),
                                                "architectures": ["Mamba2ForCausalLM"]})
    with pytest.raises(ValueError, match="Mamba2ForCausalLM"):
        hf.load_hf_checkpoint(mamba2)
    shutil.copytree(saved("llama_gqa")[1], tmp_path / "noconfig")
    os.remove(tmp_path / "noconfig" / hf.CONFIG_FILE)
    with pytest.raises(ValueError, match=f"{tmp_path / 'noconfig' / hf.CONFIG_FILE}.*does not exist"):
        hf.load_hf_checkpoint(str(tmp_path / "noconfig"))
    with pytest.raises(ValueError, match="does not exist"):
        hf.load_hf_checkpoint(str(tmp_path / "nowhere"))


def test_weights_that_disagree_with_the_config_are_rejected(saved, tmp_path):
    _, path = saved("llama_gqa")
    shutil.copytree(path, tmp_path / "wide")
    write_config(tmp_path / "wide", {**saved_config(path), "intermediate_size": 80})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight.*model.safetensors.*"
                                         r"\(96, 64\).*implies \(80, 64\)"):
        hf.load_hf_checkpoint(str(tmp_path / "wide"))
    # A tensor the config does not declare (an o_proj bias) is never dropped silently.
    shutil.copytree(path, tmp_path / "extra")
    tensors = safetensors.numpy.load_file(os.path.join(path, hf.SINGLE_FILE))
    tensors["model.layers.1.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    safetensors.numpy.save_file(tensors, str(tmp_path / "extra" / hf.SINGLE_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no place for.*o_proj.bias"):
        hf.load_hf_checkpoint(str(tmp_path / "extra"))
    # A tied model whose file holds a different lm_head: which one transformers uses is ambiguous.
    del tensors["model.layers.1.self_attn.o_proj.bias"]
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    safetensors.numpy.save_file(tensors, str(tmp_path / "extra" / hf.SINGLE_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight.*differs from the input embedding"):
        hf.load_hf_checkpoint(str(tmp_path / "extra"))
    del tensors["lm_head.weight"]
    # Fewer layers in the file than in the config.
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:
        del tensors[name]
    shutil.copytree(path, tmp_path / "short")
    safetensors.numpy.save_file(tensors, str(tmp_path / "short" / hf.SINGLE_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 9 tensor"):
        hf.load_hf_checkpoint(str(tmp_path / "short"))
    os.remove(tmp_path / "short" / hf.SINGLE_FILE)
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        hf.load_hf_checkpoint(str(tmp_path / "short"))


def test_module_imports_without_the_hf_extra():
    script = ("import sys; sys.modules['safetensors'] = None\n"
              "from jaxspec.interop import hf\n"
              "try:\n    hf.load_hf_checkpoint('.')\nexcept ImportError as err:\n    print('ERR', err)\n")
    with open(os.devnull, "w") as devnull:
        out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                             check=True, stdin=devnull)
    assert "pip install 'jaxspec[hf]'" in out.stdout


# ------------------------------------------------------------------------------------ tokenizer and CLI


def write_tokenizer(directory) -> str:
    """A word-level tokenizer.json with Llama-style special tokens."""
    import tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4, "jax": 5, "!": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    path = os.path.join(directory, hf.TOKENIZER_FILE)
    tok.save(path)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, fh)
    return path


def test_tokenizer_matches_transformers_and_takes_ids_from_the_checkpoint(saved, tmp_path):
    shutil.copytree(saved("llama_gqa")[1], tmp_path / "ckpt")
    path = write_tokenizer(tmp_path / "ckpt")
    text = "hello jax world !"
    tokenizer = hf.load_hf_tokenizer(str(tmp_path / "ckpt"))
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False) == [3, 5, 4, 6]
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (7, 0, 1)
    assert tokenizer.encode(text, add_bos=True, add_eos=True) == [0, 3, 5, 4, 6, 1]
    assert tokenizer.decode([0, 3, 5, 1]) == reference.decode([0, 3, 5, 1], skip_special_tokens=True)
    with open(tmp_path / "ckpt" / hf.GENERATION_CONFIG_FILE, "w") as fh:
        json.dump({"eos_token_id": [6, 1], "pad_token_id": 2}, fh)
    tokenizer = hf.load_hf_tokenizer(str(tmp_path / "ckpt"))
    assert (tokenizer.eos_ids, tokenizer.eos_id, tokenizer.pad_id) == ((6, 1), 1, 2)  # eos_id: the tokenizer's
    with open(tmp_path / "ckpt" / hf.GENERATION_CONFIG_FILE, "w") as fh:
        json.dump({"eos_token_id": 7}, fh)
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id=7 is outside"):
        hf.load_hf_tokenizer(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        hf.load_hf_tokenizer(saved("qwen2")[1])


def run_convert(*args):
    with open(os.devnull, "w") as devnull:
        out = subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=REPO, capture_output=True,
                             text=True, stdin=devnull)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_convert_cli_imports_to_a_workdir_and_exports_back(saved, tmp_path):
    hf_model, path = saved("llama_untied")
    shutil.copytree(path, tmp_path / "ckpt")
    write_tokenizer(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / hf.GENERATION_CONFIG_FILE, "w") as fh:
        json.dump({"eos_token_id": 6}, fh)  # the checkpoint's own stop id, not the name-guessed </s>
    workdir = str(tmp_path / "work")
    run_convert(f"--hf_dir={tmp_path / 'ckpt'}", f"--workdir={workdir}", "--max_len=128")
    params, config = restore_params(workdir)
    cfg, expected = hf.load_hf_checkpoint(path, max_len=128)
    assert_trees_equal(params, expected)
    assert json.loads(config.model.to_json()) == json.loads(cfg.to_json())
    assert config.data.tokenizer == os.path.join(workdir, "tokenizer")
    tokenizer = hf.load_hf_tokenizer(config.data.tokenizer)
    # eos_id: the tokenizer's own </s>; eos_ids: the checkpoint's stop set, which the export writes back.
    assert (tokenizer.encode("hello"), tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids) == ([3], 0, 1, (6,))

    out_dir = str(tmp_path / "exported")
    run_convert(f"--export_hf_dir={out_dir}", f"--workdir={workdir}")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tokens = random_tokens((1, 10))
    np.testing.assert_allclose(hf_logits(exported, tokens), hf_logits(hf_model, tokens), atol=1e-5, rtol=0)
    assert (exported.config.bos_token_id, exported.config.eos_token_id) == (0, 6)
    assert os.path.isfile(os.path.join(out_dir, hf.TOKENIZER_FILE))
