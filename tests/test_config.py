"""Config validation: every bad value fails at build time with the key, the value and what is allowed."""

import pytest

from jaxspec import config as config_lib
from jaxspec.config import ConfigError, MixerKind
from jaxspec.models.lm import build_model


def test_tiny_config_is_valid_and_validation_leaves_it_unchanged(tiny_config):
    cfg = tiny_config("ALM")
    before = cfg.to_dict()
    build_model(cfg)
    assert cfg.to_dict() == before


@pytest.mark.parametrize("overrides, match", [
    (dict(n_kv_heads=3), r"model\.n_kv_heads=3 is not allowed: a divisor of n_heads=4"),
    (dict(n_heads=5, n_kv_heads=1), r"model\.n_heads=5 is not allowed: a divisor of d_model=32"),
    (dict(head_dim=6, n_heads=5, n_kv_heads=1), None),  # an explicit head_dim lifts the divisor rule
    (dict(head_dim=7), r"model\.head_dim=7 .*even"),
    (dict(head_dim=-1), r"model\.head_dim=-1"),
    (dict(layer_pattern="AXM"), r"model\.layer_pattern='AXM' is not allowed: letters from \['A', 'L', 'M'\]"),
    (dict(layer_pattern=""), r"model\.layer_pattern=''"),
    (dict(d_model=0), r"model\.d_model=0 is not allowed: a positive integer"),
    (dict(vocab_size=-4), r"model\.vocab_size=-4"),
    (dict(n_layers=0), r"model\.n_layers=0"),
    (dict(d_ff=0), r"model\.d_ff=0"),
    (dict(max_len=0), r"model\.max_len=0"),
    (dict(rope_theta=0.0), r"model\.rope_theta=0\.0"),
    (dict(rms_eps=0.0), r"model\.rms_eps=0\.0"),
    (dict(dtype="float16"), r"model\.dtype='float16' is not allowed: one of \('float32', 'bfloat16'\)"),
    (dict(linear_attention=dict(feature_map="softmax")), r"model\.linear_attention\.feature_map='softmax'"),
    (dict(linear_attention=dict(decay="gated")), r"model\.linear_attention\.decay='gated' .*'retnet'"),
    (dict(linear_attention=dict(chunk_size=0)), r"model\.linear_attention\.chunk_size=0"),
    (dict(mamba=dict(d_state=0)), r"model\.mamba\.d_state=0"),
    (dict(mamba=dict(d_conv=1)), r"model\.mamba\.d_conv=1 is not allowed: at least 2"),
    (dict(mamba=dict(dt_rank=-1)), r"model\.mamba\.dt_rank=-1"),
    (dict(attention=dict(implementation="cuda")), r"model\.attention\.implementation='cuda'"),
    (dict(attention=dict(prefill="sparse")), r"model\.attention\.prefill='sparse'"),
    (dict(attention=dict(block_size=0)), r"model\.attention\.block_size=0"),
    (dict(attention=dict(xattention_threshold=0.0)), r"model\.attention\.xattention_threshold=0\.0"),
    (dict(matformer_fractions=(0.5, 0.25, 1.0)), r"model\.matformer_fractions=.*strictly increasing"),
    (dict(matformer_fractions=(0.25, 0.5)), r"model\.matformer_fractions=.*ending with 1\.0"),
    (dict(matformer_fractions=(0.0, 1.0)), r"model\.matformer_fractions=.*fractions in \(0, 1\]"),
    (dict(matformer_fractions=(0.3, 1.0)), r"model\.matformer_fractions=0\.3 .*d_ff=64 is a whole number"),
    (dict(d_ff_per_layer=(32,)), r"model\.d_ff_per_layer=\(32,\) .*n_layers=2 positive integers"),
    (dict(d_ff_per_layer=(32, 0)), r"model\.d_ff_per_layer=\(32, 0\)"),
    (dict(d_ff_per_layer=(32, 30), matformer_fractions=(0.25, 1.0)),
     r"model\.matformer_fractions=0\.25 .*d_ff=30 is a whole number"),
])
def test_bad_values_name_key_value_and_what_is_allowed(tiny_config, overrides, match):
    cfg = tiny_config("AL", **overrides)
    if match is None:
        build_model(cfg)
        return
    with pytest.raises(ConfigError, match=match):
        build_model(cfg)


@pytest.mark.parametrize("section, match", [
    (None, r"unknown config key model\.foo; allowed: \[.*'d_model'"),
    ("mamba", r"unknown config key model\.mamba\.foo; allowed: \['d_conv'"),
])
def test_unknown_keys_are_rejected(tiny_config, section, match):
    cfg = tiny_config("A")
    target = cfg if section is None else cfg[section]
    with target.unlocked():
        target.foo = 1
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_parse_arg():
    args = config_lib.parse_arg("small,steps=3,lr=0.5,ema=true", size="tiny", steps=1, lr=1.0, ema=False)
    assert args.to_dict() == dict(size="small", steps=3, lr=0.5, ema=True)
    assert config_lib.parse_arg(None, size="tiny").size == "tiny"
    with pytest.raises(ConfigError, match=r"config arg key 'stpes' is unknown; allowed: \['size', 'steps'\]"):
        config_lib.parse_arg("stpes=3", size="tiny", steps=1)
    with pytest.raises(ConfigError, match="expected a bool, got 'maybe'"):
        config_lib.parse_arg("ema=maybe", ema=False)
    with pytest.raises(ConfigError, match="needs key=value"):
        config_lib.parse_arg("tiny")


def test_derived_sizes(tiny_config):
    cfg = tiny_config("AL", n_layers=5, matformer_fractions=(0.25, 0.5, 1.0))
    attn, linear = MixerKind.ATTENTION, MixerKind.LINEAR_ATTENTION
    assert config_lib.layer_kinds(cfg) == (attn, linear, attn, linear, attn)
    assert all(type(kind) is MixerKind for kind in config_lib.layer_kinds(cfg))
    # Members stand for their pattern letters: equal, hashed alike (static jit arguments), printed alike.
    assert MixerKind("M") is MixerKind.MAMBA and hash(MixerKind.MAMBA) == hash("M") and f"{MixerKind.MAMBA}" == "M"
    assert config_lib.head_dim(cfg) == 8
    assert config_lib.ffn_hidden_sizes(cfg) == (16, 32, 64)
    assert config_lib.mamba_dims(cfg) == (64, 2)  # expand * d_model, ceil(d_model / 16)
    cfg.d_ff_per_layer = (64, 32, 64, 32, 64)
    assert config_lib.ffn_hidden_sizes(cfg, 1) == (8, 16, 32)
    with pytest.raises(ValueError, match="pass the layer index"):
        config_lib.ffn_hidden_sizes(cfg)


def test_granularity_and_skip_layers_normalise(tiny_config):
    cfg = tiny_config("AL", matformer_fractions=(0.5, 1.0))
    assert config_lib.validate_granularity(cfg, None) is None
    assert config_lib.validate_granularity(cfg, 0) == (0, 0)
    assert config_lib.validate_granularity(cfg, [1, 0]) == (1, 0)
    with pytest.raises(ConfigError, match="granularity 2 is not in the configured set"):
        config_lib.validate_granularity(cfg, (0, 2))
    assert config_lib.validate_skip_layers(cfg, [1, 1]) == (1,)
    assert config_lib.validate_skip_layers(cfg, None) == ()
    with pytest.raises(ConfigError, match=r"skip_layers entry -1 is not a layer index in 0\.\.1"):
        config_lib.validate_skip_layers(cfg, (-1,))


def test_a_script_config_needs_exactly_its_keys():
    template = {"target": "", "steps": 1, "train": {"lr": 0.1}}
    config_lib.check_same_keys({"target": "x", "steps": 2, "train": {"lr": 1.0}}, template)
    with pytest.raises(ConfigError, match=r"config lacks the keys \['steps'\]"):
        config_lib.check_same_keys({"target": "x", "train": {}}, template)
    with pytest.raises(ConfigError, match=r"unknown config key config\.train\.lrr"):
        config_lib.check_same_keys({"target": "x", "steps": 2, "train": {"lrr": 1.0}}, template)
