"""Pure rule logic: mesh size resolution, logical axes -> PartitionSpec, parameter name table, HLO parsing."""

import pytest
from jax.sharding import PartitionSpec as P

from jaxspec.parallel.collectives import hlo_collectives
from jaxspec.parallel.mesh import DEFAULT_RULES, default_mesh_config, resolve_axis_sizes
from jaxspec.parallel.sharding import logical_to_spec, param_logical_axes


def test_default_mesh_config_matches_the_contract():
    cfg = default_mesh_config()
    assert (cfg.data, cfg.fsdp, cfg.tensor, cfg.sequence) == (-1, 1, 1, 1)
    assert dict(cfg.rules) == {
        "batch": ("data", "fsdp"), "length": "sequence", "embed": "fsdp", "heads": "tensor",
        "kv_heads": "tensor", "head_dim": None, "mlp": "tensor", "vocab": "tensor", "layers": None,
        "state": None,
    }


@pytest.mark.parametrize(
    "sizes, devices, expected",
    [
        ({"data": -1}, 8, (8, 1, 1, 1)),
        ({"data": 2, "fsdp": 1, "tensor": 1, "sequence": -1}, 8, (2, 1, 1, 4)),
        ({"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2}, 8, (1, 2, 2, 2)),
        ({"data": -1, "tensor": 3}, 12, (4, 1, 3, 1)),
    ],
)
def test_axis_sizes_resolve(sizes, devices, expected):
    assert resolve_axis_sizes(sizes, devices) == expected


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 2, "sequence": 2}, r"multiply to 4, but there are 8 devices"),
        ({"data": -1, "sequence": -1}, r"more than one axis set to -1"),
        ({"data": -1, "tensor": 3}, r"cannot fill 8 devices"),
        ({"data": 0}, r"config.mesh.data=0"),
        ({"data": -1, "fsdp": 2.0}, r"config.mesh.fsdp=2.0"),
    ],
)
def test_bad_axis_sizes_are_rejected(sizes, message):
    with pytest.raises(ValueError, match=message):
        resolve_axis_sizes(sizes, 8)


def test_logical_to_spec_follows_the_default_rules():
    assert logical_to_spec(("batch", "length")) == P(("data", "fsdp"), "sequence")
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("layers", None, "head_dim")) == P(None, None, None)


def test_a_mesh_axis_shards_only_the_first_dimension_that_asks_for_it():
    # batch takes data and fsdp, so embed (-> fsdp) stays replicated in activations.
    assert logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), "sequence", None)
    rules = (("batch", ("data", "fsdp")), ("embed", ("fsdp", "tensor")))
    assert logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), "tensor")


def test_custom_rules_and_bad_rules():
    rules = dict(DEFAULT_RULES) | {"heads": ("tensor", "sequence")}
    assert logical_to_spec(("embed", "heads"), tuple(rules.items())) == P("fsdp", ("tensor", "sequence"))
    with pytest.raises(ValueError, match="logical axis 'experts' has no sharding rule"):
        logical_to_spec(("experts", "embed"))
    with pytest.raises(ValueError, match="sharding rule for 'embed' maps to 3"):
        logical_to_spec(("embed",), (("embed", 3),))
    with pytest.raises(ValueError, match="expected a \\(logical_axis, mesh_axes\\) pair"):
        logical_to_spec(("embed",), (("embed",),))


@pytest.mark.parametrize(
    "path, ndim, expected",
    [
        ("embed/embedding", 2, ("vocab", "embed")),
        ("layer_0/attn/q_proj/kernel", 2, ("embed", "heads")),
        ("layer_0/attn/v_proj/bias", 1, ("kv_heads",)),
        ("layer_1/ffn/gate_proj", 2, ("embed", "mlp")),
        ("layer_1/mlp/down/kernel", 2, ("mlp", "embed")),
        ("lm_head/kernel", 2, ("embed", "vocab")),
        ("medusa/head_2_out/kernel", 2, ("embed", "vocab")),
        ("scan/o_proj/kernel", 3, ("layers", "heads", "embed")),
        ("layer_0/mixer_norm/scale", 1, (None,)),
        ("layer_0/attn/unknown_proj/kernel", 2, (None, None)),
        ("layer_0/attn/my_q_proj/kernel", 2, (None, None)),  # names match whole path components only
        # The decode layout (models/decode_layout.py): fused kernels stored [out, in] (kernel_t, float32 or int8).
        ("layer_0/attn/qkv/kernel_t", 2, ("heads", "embed")),
        ("layer_0/attn/qkv/scale", 1, ("heads",)),
        ("layer_0/attn/o_proj/kernel_t", 2, ("embed", "heads")),
        ("layer_0/ffn/gate_up/kernel_t", 2, ("mlp", "embed")),
        ("layer_0/ffn/down_proj/kernel", 2, ("mlp", "embed")),
        ("layer_0/ffn/down_proj/kernel_t", 2, ("embed", "mlp")),
        ("layer_0/ffn/down_proj/scale", 1, ("embed",)),
        ("lm_head/kernel_t", 2, ("vocab", "embed")),
        ("embed/scale", 1, ("vocab",)),
    ],
)
def test_param_logical_axes_table(path, ndim, expected):
    assert param_logical_axes(path, ndim) == expected


@pytest.mark.parametrize("weight_dtype", ["float32", "int8"])
def test_every_decode_layout_matrix_has_sharding_axes(weight_dtype):
    """No projection of the decode layout falls through to replication: each matrix gets a logical axis per
    dimension, and its dimension sizes agree with the axes' meaning (embed = d_model)."""
    import jax

    from jaxspec.config import model_defaults
    from jaxspec.models.decode_layout import for_decoding
    from jaxspec.models.lm import build_model, init_params
    from jaxspec.parallel.sharding import path_to_name

    cfg = model_defaults()
    cfg.update(dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, qkv_bias=True,
                    tie_embeddings=False, weight_dtype=weight_dtype))
    model = build_model(cfg)
    shapes = jax.eval_shape(lambda k: for_decoding(model, init_params(model, k))[1], jax.random.key(0))
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        name = path_to_name(path)
        axes = param_logical_axes(name, leaf.ndim)
        if leaf.ndim == 2:
            assert None not in axes, name
            assert leaf.shape[axes.index("embed")] == cfg.d_model, (name, axes, leaf.shape)


HLO = """
ENTRY %main {
  %p = f32[1,2,8,4]{3,2,1,0} parameter(0)
  %ag = f32[4,1,2,17]{3,2,1,0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ar = (f32[16]{0}, bf16[8,2]{1,0}) all-reduce(%a, %b), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add
  %rs = f32[2,3]{1,0} reduce-scatter(%c), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %cp = (f32[4,4]{1,0}, f32[4,4]{1,0}, u32[], u32[]) collective-permute-start(%d), source_target_pairs={{0,1},{1,2}}
  %cpd = f32[4,4]{1,0} collective-permute-done(%cp)
}
"""


def test_hlo_collectives_reads_ops_sizes_and_groups():
    found = hlo_collectives(HLO)
    assert [(c.op, c.result_bytes, c.group_size) for c in found] == [
        ("all-gather", 4 * 2 * 17 * 4, 4),
        ("all-reduce", 16 * 4 + 16 * 2, 8),
        ("reduce-scatter", 6 * 4, 4),
        ("collective-permute", 16 * 4, 2),
    ]
    assert found[0].bytes_per_device == pytest.approx(3 / 4 * 544)
    assert found[1].bytes_per_device == pytest.approx(2 * 7 / 8 * 96)
    assert found[2].bytes_per_device == pytest.approx(3 * 24)
    assert found[3].bytes_per_device == 64
