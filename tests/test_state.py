"""Decode state: tree verify gives every node its own full-forward logits and `commit` of any accepted path
makes decoding continue exactly as if that path had been the context, per row, for every mixer; a scanned model's
state holds its scanned layers stacked, and commits them as one stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.state import (
    KVCache,
    LinearState,
    MambaState,
    commit,
    init_decode_state,
    node_depths,
    per_layer,
    stacked_state,
    tree_ancestor_mask,
    validate_parents,
    write_kv,
)

BATCH = 4
NODES = 7
MAX_LEN = 32
TOL = dict(atol=1e-5, rtol=1e-5)
jit_commit = jax.jit(commit)


def root_path(parents, node) -> list[int]:
    """Node indices from the root down to `node`."""
    path = []
    while node >= 0:
        path.append(int(node))
        node = parents[node]
    return path[::-1]


def random_tree(rng, k: int, min_depth: int = 3) -> np.ndarray:
    """Random valid parents (parent of i uniform in [-1, i): several roots may follow the context), redrawn
    until some root-to-leaf path has `min_depth` nodes, so a partial acceptance exists."""
    while True:
        parents = np.array([-1] + [rng.integers(-1, i) for i in range(1, k)])
        if max(len(root_path(parents, i)) for i in range(k)) >= min_depth:
            return parents


def test_tree_verify_and_commit_match_full_forward(mixer_model, apply, final_logits):
    """Two rounds of: tree forward over a random tree per row (every node checked against a full forward of
    context + its root path), commit of a different path and count per row, one more token (checked)."""
    model, params = mixer_model
    vocab = model.model_cfg.vocab_size
    rng = np.random.default_rng(0)
    context_lengths = [5, 1, 8, 3]
    context = rng.integers(0, vocab, (BATCH, 8))
    state = init_decode_state(model.model_cfg, BATCH, MAX_LEN)
    _, state = apply(model, params, jnp.asarray(context), state=state, num_new=jnp.asarray(context_lengths))
    committed = [list(context[b, :n]) for b, n in enumerate(context_lengths)]
    # Acceptance kinds, rotated over the rows each round: a whole root-to-leaf path, the root only, part of
    # a path, nothing.
    kinds = ["leaf", "root", "partial", "none"]
    for round_ in range(2):
        parents = np.stack([random_tree(rng, NODES) for _ in range(BATCH)])
        tree_tokens = rng.integers(0, vocab, (BATCH, NODES))
        logits, state = apply(model, params, jnp.asarray(tree_tokens), state=state, parents=jnp.asarray(parents))
        paths = [[root_path(parents[b], i) for i in range(NODES)] for b in range(BATCH)]
        want = final_logits(model, params, [committed[b] + list(tree_tokens[b, path])
                                            for b in range(BATCH) for path in paths[b]])
        np.testing.assert_allclose(np.asarray(logits).reshape(BATCH * NODES, -1), want, **TOL,
                                   err_msg=f"tree nodes, round {round_}")
        assert state.pending is not None and state.lengths.tolist() == [len(c) for c in committed]

        # Each row takes its deepest path; entries past the accepted count are arbitrary node indices.
        chosen = [max(paths[b], key=len) for b in range(BATCH)]
        row_kinds = kinds[round_:] + kinds[:round_]
        counts = {"leaf": lambda p: len(p), "root": lambda p: 1, "partial": lambda p: len(p) - 1,
                  "none": lambda p: 0}
        accepted = [counts[kind](path) for kind, path in zip(row_kinds, chosen)]
        path_array = rng.integers(0, NODES, (BATCH, NODES))
        for b in range(BATCH):
            path_array[b, :len(chosen[b])] = chosen[b]
            committed[b] += list(tree_tokens[b, chosen[b][:accepted[b]]])
        state = jit_commit(state, jnp.asarray(path_array), jnp.asarray(accepted))
        assert state.pending is None
        np.testing.assert_array_equal(state.lengths, [len(c) for c in committed])

        next_tokens = rng.integers(0, vocab, (BATCH, 1))
        logits, state = apply(model, params, jnp.asarray(next_tokens), state=state)
        for b in range(BATCH):
            committed[b].append(next_tokens[b, 0])
        np.testing.assert_allclose(logits[:, 0], final_logits(model, params, committed), **TOL,
                                   err_msg=f"after commit, round {round_}")


def test_pending_tree_must_be_committed_first(make_model, apply):
    model, params = make_model("A")
    state = init_decode_state(model.model_cfg, BATCH, MAX_LEN)
    with pytest.raises(ValueError, match="holds no pending tree"):
        commit(state, jnp.zeros((BATCH, 1), jnp.int32), jnp.ones(BATCH, jnp.int32))
    tokens = jnp.zeros((BATCH, NODES), jnp.int32)
    _, state = apply(model, params, tokens, state=state, parents=jnp.asarray([-1, 0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="uncommitted tree"):
        model.apply({"params": params}, tokens[:, :1], state=state)


def brute_force_ancestors(parents) -> np.ndarray:
    k = len(parents)
    mask = np.zeros((k, k), bool)
    for i in range(k):
        mask[i, root_path(parents, i)] = True
    return mask


def test_tree_ancestor_mask_and_depths():
    rng = np.random.default_rng(1)
    ancestor_mask = jax.jit(tree_ancestor_mask, static_argnums=1)
    for k in (1, 5, 9):  # 9 nodes take four pointer-doubling rounds
        parents = np.stack([random_tree(rng, k, min_depth=1) for _ in range(3)])
        parents[1] = np.arange(k) - 1  # a chain: the mask is lower-triangular
        mask = np.asarray(ancestor_mask(jnp.asarray(parents), 3))
        for b in range(3):
            np.testing.assert_array_equal(mask[b], brute_force_ancestors(parents[b]))
        np.testing.assert_array_equal(mask[1], np.tril(np.ones((k, k), bool)))
        depths = np.asarray(node_depths(jnp.asarray(mask)))
        np.testing.assert_array_equal(depths, [[len(root_path(p, i)) - 1 for i in range(k)] for p in parents])
        # One [K] parents array serves every row.
        shared = np.asarray(ancestor_mask(jnp.asarray(parents[0]), 2))
        np.testing.assert_array_equal(shared, np.stack([mask[0], mask[0]]))


@pytest.mark.parametrize("parents, match", [
    ([-1, 2, 0], r"parents\[1\]=2"),
    ([-1, 0, 3, 1], r"parents\[2\]=3"),
    ([0, 0], r"parents\[0\]=0"),
    ([-3], r"parents\[0\]=-3"),
    ([[-1, 0], [-1, -2]], r"parents\[1, 1\]=-2"),
    (np.zeros((1, 1, 1), int), "shape"),
    (np.zeros((0,), int), "shape"),
])
def test_validate_parents_names_the_bad_entry(parents, match):
    with pytest.raises(ValueError, match=match):
        validate_parents(parents)


def test_validate_parents_accepts_forests():
    np.testing.assert_array_equal(validate_parents([-1, -1, 0, 1, -1]), [-1, -1, 0, 1, -1])


def test_init_decode_state_shapes(tiny_config):
    cfg = tiny_config("ALM")
    state = init_decode_state(cfg, 3, 20)
    kv, linear, mamba = state.layers
    assert isinstance(kv, KVCache) and kv.k.shape == kv.v.shape == (3, 2, 20, 8)
    assert isinstance(linear, LinearState) and linear.s.shape == (3, 4, 8, 8)
    assert isinstance(mamba, MambaState) and mamba.conv.shape == (3, 3, 64) and mamba.ssm.shape == (3, 64, 4)
    assert state.lengths.tolist() == [0, 0, 0] and state.pending is None and state.max_len == 20
    assert init_decode_state(cfg, 1).max_len == cfg.max_len
    # Recurrent-only models have no cache, so no length limit.
    assert init_decode_state(tiny_config("LM"), 1, 20).max_len == np.iinfo(np.int32).max


@pytest.mark.parametrize("batch, max_len", [(0, 8), (2, -1)])
def test_init_decode_state_rejects_empty_sizes(tiny_config, batch, max_len):
    with pytest.raises(ValueError, match=f"batch={batch} and max_len={max_len}"):
        init_decode_state(tiny_config("A"), batch, max_len)


def test_write_kv_writes_per_row_offsets_and_drops_past_the_end():
    cache = jnp.zeros((2, 1, 5, 1))
    new = jnp.arange(1, 4, dtype=jnp.float32).reshape(1, 1, 3, 1) * jnp.array([1.0, 10.0]).reshape(2, 1, 1, 1)
    out = np.asarray(write_kv(cache, new, jnp.asarray([3, 0])))[:, 0, :, 0]
    np.testing.assert_array_equal(out, [[0, 0, 0, 1, 2], [10, 20, 30, 0, 0]])


def test_write_kv_into_a_layer_of_a_stack_equals_writing_that_layer():
    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.normal(size=(3, 2, 2, 6, 4)), jnp.float32)
    new = jnp.asarray(rng.normal(size=(2, 2, 3, 4)), jnp.float32)
    start = jnp.asarray([4, 1])  # row 0 runs past the end: those columns are dropped
    got = jax.jit(lambda s, i: write_kv(s, new, start, i))(stack, jnp.int32(1))
    np.testing.assert_array_equal(got[1], write_kv(stack[1], new, start))
    np.testing.assert_array_equal(got[::2], stack[::2])


def test_a_scanned_models_state_holds_its_scanned_layers_stacked(tiny_config):
    # Two periods of (attention, linear attention, Mamba) scan; the seventh layer runs unrolled.
    cfg = tiny_config("ALM", n_layers=7, scan_layers=True)
    state = init_decode_state(cfg, 3, 20)
    assert state.stack_plan == (3, 2) and state.max_len == 20
    assert state.layers[:6] == (None,) * 6 and isinstance(state.layers[6], KVCache)
    kv, linear, mamba = state.stacked
    assert kv.k.shape == (2, 3, 2, 20, 8) and linear.s.shape == (2, 3, 4, 8, 8) and mamba.ssm.shape == (2, 3, 64, 4)
    flat = per_layer(state)
    want = init_decode_state(tiny_config("ALM", n_layers=7), 3, 20)
    assert flat.stack_plan is None and jax.tree.structure(flat) == jax.tree.structure(want)
    back = stacked_state(flat, (3, 2))
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert stacked_state(state, None).stack_plan is None


def random_pending(entry, nodes: int, rng):
    """Random pending entries of `nodes` tree nodes for one layer's entry: a KV cache's node axis replaces its
    length axis; a recurrent state gets one state per node after the batch axis."""
    if isinstance(entry, KVCache):
        shape = lambda x: x.shape[:2] + (nodes,) + x.shape[3:]
    else:
        shape = lambda x: x.shape[:1] + (nodes,) + x.shape[1:]
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=shape(x)), x.dtype), entry)


def test_commit_of_a_stacked_state_equals_commit_per_layer(tiny_config):
    # The stacks commit as one vmapped stack per position; per layer, the same entries come out (a skipped
    # position, the linear-attention layers here, keeps its entries).
    cfg = tiny_config("ALM", n_layers=6, scan_layers=True)
    rng = np.random.default_rng(1)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), init_decode_state(cfg, 2, 12))
    flat = per_layer(state.replace(lengths=jnp.asarray([3, 5], jnp.int32)))
    pending = [None if i % 3 == 1 else random_pending(layer, 4, rng) for i, layer in enumerate(flat.layers)]
    stacked_pending = tuple(None if p is None else jax.tree.map(lambda *xs: jnp.stack(xs), p, pending[j + 3])
                            for j, p in enumerate(pending[:3]))
    stacked = stacked_state(flat, (3, 2)).replace(pending=(None,) * 6, pending_stacked=stacked_pending)
    path, accepted = jnp.asarray([[0, 2, 3], [1, 3, 0]]), jnp.asarray([2, 0])
    want = commit(flat.replace(pending=tuple(pending)), path, accepted)
    got = per_layer(jit_commit(stacked, path, accepted))
    assert got.stacked is None and got.lengths.tolist() == [5, 5]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
