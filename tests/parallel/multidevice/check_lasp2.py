"""LASP-2 / LASP-2H on 8 simulated devices equal single-device attention, in values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxspec.ops.linear_attention import chunked_linear_attention
from jaxspec.parallel.collectives import hlo_collectives
from jaxspec.parallel.lasp2 import lasp2_linear_attention, lasp2h_attention
from jaxspec.parallel.mesh import make_mesh

CHUNK = 4  # intra-chunk block of chunked_linear_attention; each device holds T / 4 = 8 tokens

# Run through tests/parallel/test_parallel_multidevice.py, which starts a fresh interpreter with
# XLA_FLAGS=--xla_force_host_platform_device_count=8 (a conftest here would change the device count of a
# whole-suite run).
if jax.device_count() != 8:
    raise RuntimeError(f"{__name__} needs 8 devices, jax has {jax.device_count()}: see the comment above.")


def _mesh(**sizes):
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **sizes})


def _inputs(batch=2, heads=2, kv_heads=None, seq=32, dim=4, seed=0):
    """q, k, v and a log-decay in [-0.3, 0] (numpy random: no eager jax compiles)."""
    rng = np.random.default_rng(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = normal(batch, heads, seq, dim), normal(batch, kv_heads, seq, dim), normal(batch, kv_heads, seq, dim)
    log_decay = jnp.asarray(-0.3 * rng.uniform(size=(batch, heads, seq)), jnp.float32)
    return q, k, v, log_decay


def _single_device_linear(q, k, v, log_decay, causal):
    out, final_state = chunked_linear_attention(q, k, v, log_decay, chunk_size=CHUNK)
    return out if causal else jnp.einsum("bhtk,bhkv->bhtv", q, final_state)


def _value_and_grads(attention, args):
    """Output and its vector-Jacobian product with a fixed random cotangent for every argument, in one jit."""

    def loss(*a):
        out = attention(*a)
        cotangent = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)  # fixed, varied
        return jnp.sum(out * cotangent), out

    grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, grads


def _assert_close(actual, expected):
    """Equal up to float32 reassociation: error small relative to the array's largest entry."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(e).max())))


# Each case also splits batch over "data" or heads over "tensor", and the output keeps that layout.
LASP2_CASES = [
    # causal, with_decay, mesh sizes, output spec
    (True, True, {"data": 2, "sequence": 4}, PartitionSpec("data", None, "sequence")),
    (True, False, {"tensor": 2, "sequence": 4}, PartitionSpec(None, "tensor", "sequence")),
    (False, True, {"tensor": 2, "sequence": 4}, PartitionSpec(None, "tensor", "sequence")),
    (False, False, {"data": 2, "sequence": 4}, PartitionSpec("data", None, "sequence")),
]


@pytest.mark.parametrize("causal, with_decay, mesh_sizes, out_spec", LASP2_CASES,
                         ids=["causal-decay-dp", "causal-tp", "bidirectional-decay-tp", "bidirectional-dp"])
def test_lasp2_matches_single_device_values_and_grads(causal, with_decay, mesh_sizes, out_spec):
    mesh = _mesh(**mesh_sizes)
    q, k, v, log_decay = _inputs()
    args = (q, k, v, log_decay) if with_decay else (q, k, v)
    pad = lambda a: (*a, None) if len(a) == 3 else a
    sharded = lambda *a: lasp2_linear_attention(*pad(a), mesh=mesh, causal=causal, chunk_size=CHUNK)
    reference = lambda *a: _single_device_linear(*pad(a), causal)
    out, grads = _value_and_grads(sharded, args)
    ref_out, ref_grads = _value_and_grads(reference, args)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, out_spec), 4)
    _assert_close(out, ref_out)
    _assert_close(grads, ref_grads)


@pytest.mark.parametrize("causal", [True, False])
def test_lasp2h_matches_single_device_attention(causal):
    mesh = _mesh(tensor=2, sequence=4)
    q, k, v, _ = _inputs(heads=4, kv_heads=2, seed=2)
    sharded = lambda q, k, v: lasp2h_attention(q, k, v, mesh=mesh, causal=causal)
    reference = lambda q, k, v: jax.nn.dot_product_attention(
        q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), is_causal=causal).swapaxes(1, 2)
    out, grads = _value_and_grads(sharded, (q, k, v))
    ref_out, ref_grads = _value_and_grads(reference, (q, k, v))
    _assert_close(out, ref_out)
    _assert_close(grads, ref_grads)


def _forward_collectives(seq):
    mesh = _mesh(data=2, sequence=4)
    act = lambda *shape, spec: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))
    qkv = act(2, 2, seq, 4, spec=PartitionSpec("data", None, "sequence", None))
    decay = act(2, 2, seq, spec=PartitionSpec("data", None, "sequence"))
    layer = jax.jit(functools.partial(lasp2_linear_attention, mesh=mesh, chunk_size=CHUNK))
    return hlo_collectives(layer.lower(qkv, qkv, qkv, decay).compile().as_text())


def test_lasp2_forward_is_one_all_gather_independent_of_length():
    short, long = _forward_collectives(32), _forward_collectives(64)
    assert [c.op for c in short] == ["all-gather"]
    assert short == long  # same op, same shape, same group: the message does not grow with T
    # 4 chunks x local batch 1 x 2 heads x (4 x 4 state + 1 packed chunk log-decay), float32.
    assert short[0].result_bytes == 4 * 1 * 2 * (4 * 4 + 1) * 4
    assert short[0].group_size == 4


def test_sequence_not_divisible_by_axis_is_rejected():
    mesh = _mesh(sequence=8)
    q, k, v, _ = _inputs(seq=20)
    with pytest.raises(ValueError, match="sequence length 20 is not divisible by the size 8"):
        lasp2_linear_attention(q, k, v, mesh=mesh)
    with pytest.raises(ValueError, match="sequence length 20 is not divisible by the size 8"):
        lasp2h_attention(q, k, v, mesh=mesh)


def test_unknown_axis_and_bad_shapes_are_rejected():
    mesh = _mesh(sequence=8)
    q, k, v, log_decay = _inputs()
    with pytest.raises(ValueError, match="'context' is not in the mesh"):
        lasp2_linear_attention(q, k, v, mesh=mesh, axis="context")
    with pytest.raises(ValueError, match="log_decay has shape"):
        lasp2_linear_attention(q, k, v, log_decay[:, :1], mesh=mesh)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        lasp2h_attention(q, k[:, :, :16], v[:, :, :16], mesh=mesh)
