"""Mixer kernels against step-by-step references: chunked vs recurrent linear attention, the associative
Mamba scan vs its sequential recurrence, and the tree forms of both vs a recurrence along each node's path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.models.linear_attention import feature_map, head_log_decays
from jaxspec.models.mamba import selective_scan, selective_scan_sequential, tree_ancestor_table, tree_selective_scan
from jaxspec.ops.linear_attention import chunked_linear_attention, recurrent_linear_attention, tree_linear_attention
from jaxspec.state import tree_ancestor_mask

TOL = dict(atol=1e-5, rtol=1e-5)
FOREST = np.array([-1, 0, 0, -1, 1, 4, 2, 5])  # two roots, branching, depth 4
CHAIN = np.arange(8) - 1


def normal(rng, *shape):
    # numpy in, so the reference loops below index host arrays (no device op per element)
    return rng.standard_normal(shape).astype(np.float32)


def path_to(parents, node) -> list[int]:
    path = []
    while node >= 0:
        path.append(int(node))
        node = parents[node]
    return path[::-1]


def linear_recurrence_numpy(q, k, v, log_decay, s0):
    """S_t = exp(a_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t for one [T, d] sequence of one head."""
    s, out = np.array(s0, np.float64), []
    for t in range(q.shape[0]):
        s = np.exp(log_decay[t]) * s + np.outer(k[t], v[t])
        out.append(q[t] @ s)
    return np.array(out), s


@pytest.mark.parametrize("decay", [False, True], ids=["no_decay", "decay"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_chunked_linear_attention_matches_recurrence(decay, with_state):
    rng = np.random.default_rng(0)
    b, h, t, dk, dv = 2, 3, 11, 4, 5
    q, k, v = normal(rng, b, h, t, dk), normal(rng, b, h, t, dk), normal(rng, b, h, t, dv)
    # Per-step decays (data-dependent, as gated variants use) cover the fixed per-head RetNet decays.
    log_decay = -rng.uniform(0.0, 0.7, (b, h, t)).astype(np.float32) if decay else None
    s0 = normal(rng, b, h, dk, dv) if with_state else None
    ref_out, ref_state = jax.jit(recurrent_linear_attention)(q, k, v, log_decay, s0)
    # The recurrence itself against a float64 loop.
    ref_out, ref_state = np.asarray(ref_out), np.asarray(ref_state)
    a = np.zeros((b, h, t)) if log_decay is None else log_decay
    start = np.zeros((b, h, dk, dv)) if s0 is None else s0
    for i in range(b):
        for j in range(h):
            out, state = linear_recurrence_numpy(q[i, j], k[i, j], v[i, j], a[i, j], start[i, j])
            np.testing.assert_allclose(ref_out[i, j], out, **TOL)
            np.testing.assert_allclose(ref_state[i, j], state, **TOL)
    for chunk_size in (4, 16):  # 11 is no multiple of 4; 16 is longer than the sequence
        chunked = jax.jit(functools.partial(chunked_linear_attention, chunk_size=chunk_size))
        out, state = chunked(q, k, v, log_decay, s0)
        np.testing.assert_allclose(out, ref_out, **TOL, err_msg=f"chunk_size={chunk_size}")
        np.testing.assert_allclose(state, ref_state, **TOL, err_msg=f"chunk_size={chunk_size}")


@pytest.mark.parametrize("decay", ["none", "retnet"])
def test_tree_linear_attention_matches_recurrence_along_each_path(decay, tiny_config):
    rng = np.random.default_rng(1)
    cfg = tiny_config("L", linear_attention=dict(decay=decay))
    b, h, dk, dv = 2, cfg.n_heads, 3, 4
    log_g = np.asarray(head_log_decays(cfg))
    parents = np.stack([FOREST, CHAIN])
    k_nodes = parents.shape[1]
    q, k, v = normal(rng, b, h, k_nodes, dk), normal(rng, b, h, k_nodes, dk), normal(rng, b, h, k_nodes, dv)
    s0 = normal(rng, b, h, dk, dv)
    mask = tree_ancestor_mask(jnp.asarray(parents), b)
    out, states = jax.jit(tree_linear_attention)(q, k, v, log_g, s0, mask)
    out, states = np.asarray(out), np.asarray(states)
    assert out.shape == (b, h, k_nodes, dv) and states.shape == (b, k_nodes, h, dk, dv)
    for i in range(b):
        for node in range(k_nodes):
            path = path_to(parents[i], node)
            for j in range(h):
                ref_out, ref_state = linear_recurrence_numpy(q[i, j, path], k[i, j, path], v[i, j, path],
                                                             np.full(len(path), log_g[j]), s0[i, j])
                np.testing.assert_allclose(out[i, j, node], ref_out[-1], **TOL)
                np.testing.assert_allclose(states[i, node, j], ref_state, **TOL)
    # On the chain row the tree form is the recurrent one.
    chain_decay = np.broadcast_to(log_g[None, :, None], (1, h, k_nodes))
    chain_out, chain_state = jax.jit(recurrent_linear_attention)(q[1:], k[1:], v[1:], chain_decay, s0[1:])
    np.testing.assert_allclose(out[1:], chain_out, **TOL)
    np.testing.assert_allclose(states[1, -1], chain_state[0], **TOL)


def test_head_decays_and_feature_maps(tiny_config):
    gammas = np.exp(np.asarray(head_log_decays(tiny_config("L"))))
    np.testing.assert_allclose(gammas, 1 - 2.0 ** (-5 - np.arange(4)), rtol=1e-6)
    np.testing.assert_array_equal(head_log_decays(tiny_config("L", linear_attention=dict(decay="none"))), 0.0)
    x = jnp.asarray([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(feature_map(x, "elu1"), [np.exp(-2.0), 1.0, 4.0], rtol=1e-6)
    np.testing.assert_array_equal(feature_map(x, "relu"), [0.0, 0.0, 3.0])
    np.testing.assert_array_equal(feature_map(x, "identity"), x)


def scan_inputs(rng, b, t, d=3, n=2):
    decay = rng.uniform(0.5, 1.0, (b, t, d, n)).astype(np.float32)
    return decay, normal(rng, b, t, d, n), normal(rng, b, d, n)


def test_selective_scan_matches_sequential_recurrence():
    rng = np.random.default_rng(2)
    decay, inputs, h0 = scan_inputs(rng, 2, 13)  # 13: not a power of two
    got = jax.jit(selective_scan)(decay, inputs, h0)
    want = jax.jit(selective_scan_sequential)(decay, inputs, h0)
    np.testing.assert_allclose(got, want, **TOL)
    h = h0
    for t in range(13):  # and the recurrence itself, written out
        h = decay[:, t] * h + inputs[:, t]
        np.testing.assert_allclose(want[:, t], h, **TOL)


def test_tree_selective_scan_on_a_chain_and_on_a_forest():
    rng = np.random.default_rng(3)
    decay, inputs, h0 = scan_inputs(rng, 2, len(CHAIN))
    tree_scan = jax.jit(tree_selective_scan)
    chain = tree_scan(decay, inputs, h0, np.stack([CHAIN, CHAIN]))
    np.testing.assert_allclose(chain, jax.jit(selective_scan_sequential)(decay, inputs, h0), **TOL)
    parents = np.stack([FOREST, CHAIN])
    got = np.asarray(tree_scan(decay, inputs, h0, parents))
    for i in range(2):
        for node in range(len(FOREST)):
            h = h0[i]
            for j in path_to(parents[i], node):
                h = decay[i, j] * h + inputs[i, j]
            np.testing.assert_allclose(got[i, node], h, **TOL, err_msg=f"row {i} node {node}")


def test_tree_ancestor_table_lists_ancestors_by_distance():
    parents = np.stack([FOREST, CHAIN])
    table = np.asarray(tree_ancestor_table(jnp.asarray(parents), 4))
    for i in range(2):
        for node in range(len(FOREST)):
            up = path_to(parents[i], node)[::-1][:4]
            np.testing.assert_array_equal(table[i, node], up + [-1] * (4 - len(up)))
