"""FlexPrefill block selection: hand-built heads whose pattern and tiles are known, the line shares against a
loop, the selection's guarantees (forced tiles, gamma = 1 is dense, right-padded rows select as unpadded ones),
config validation, and the model wiring."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import config as config_lib
from jaxspec.config import ConfigError
from jaxspec.decoding import api
from jaxspec.errors import InputError
from pallas_kernels import flexprefill
from pallas_kernels.block_sparse_attention import block_sparse_attention, three_state_block_mask
from pallas_kernels.flexprefill import flexprefill_block_mask, flexprefill_selection

select = jax.jit(flexprefill_selection, static_argnames=("block_size",))
T, BLOCK = 64, 8  # 8 x 8 tiles


def normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@functools.cache
def inputs(b=2, h=4, hkv=2, t=70, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return normal(rng, b, h, t, d), normal(rng, b, hkv, t, d)


@functools.partial(jax.jit, static_argnames="block")
def attend_kept(q, k, v, keep, block):
    """Causal block-sparse attention over the tiles `keep` holds."""
    t = q.shape[2]
    mask = three_state_block_mask(keep, causal=True, block_q=block, block_k=block, q_len=t, k_len=t)
    return block_sparse_attention(q, k, v, mask, causal=True, block_q=block, block_k=block, implementation="xla")


def dense_attention(q, k, v):
    """Causal softmax attention in float64 NumPy (GQA: kv heads repeated)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


def one_hot_head(links):
    """q, k [1, 1, T, T] with one-hot keys (k_j = e_j) and scale 1: query i scores `logit` on key i - offset
    for each (offset, logit) in `links` (when that key exists) and 0 on every other key."""
    q = np.zeros((1, 1, T, T), np.float32)
    for i in range(T):
        for offset, logit in links:
            if i - offset >= 0:
                q[0, 0, i, i - offset] += logit
    return jnp.asarray(q), jnp.asarray(np.eye(T, dtype=np.float32)[None, None])


def tiles(rows_cols=(), columns=(), offsets=()):
    """Expected causal keep mask [T/BLOCK]^2: the sink column, the diagonal, the listed tiles, whole columns
    (from the diagonal down) and block diagonals at the listed offsets."""
    n = T // BLOCK
    r, c = np.arange(n)[:, None], np.arange(n)[None, :]
    keep = (c == 0) | (c == r) | np.isin(c, columns) | np.isin(r - c, offsets)
    for row, col in rows_cols:
        keep[row, col] = True
    return keep & (c <= r)


def test_vertical_line_and_diagonal_take_vertical_slash_and_keep_that_column():
    # The last block's queries put 0.3 of their attention on key 20 (block 2) and 0.7 on themselves.
    # Pooled vectors spread key 20 over its block: the estimate is far off, so the head is vertical-slash.
    # gamma 0.6: the slash at distance 0 alone holds 0.7; the vertical line at key 20 (0.3) plus four
    # diagonal keys of the last block (0.0875 each) hold 0.65. So: column 2, plus the forced tiles.
    p, a = 20, 12.0
    q, k = one_hot_head([(0, a + np.log(7 / 3))])
    q = q.at[0, 0, p + 1:, p].add(a)
    sel = select(q, k, block_size=BLOCK, gamma=0.6, tau=0.1, scale=1.0)
    assert not bool(sel.query_aware[0, 0])
    np.testing.assert_array_equal(sel.keep[0, 0], tiles(columns=[2]))


def test_slash_line_keeps_the_block_diagonals_it_crosses():
    # Every query puts 0.7 on the key 12 before it and 0.3 on itself. Distance 12 lies in tiles whose block
    # offset is 1 or 2; gamma 0.6 takes that slash alone. As vertical lines the last queries see keys 44..51
    # (0.0875 each; 7 of them reach 0.6), in blocks 5 and 6.
    q, k = one_hot_head([(12, 12.0 + np.log(7 / 3)), (0, 12.0)])
    sel = select(q, k, block_size=BLOCK, gamma=0.6, tau=0.1, scale=1.0)
    assert not bool(sel.query_aware[0, 0])
    np.testing.assert_array_equal(sel.keep[0, 0], tiles(columns=[5, 6], offsets=[1, 2]))


def test_diffuse_head_is_query_aware_and_keeps_the_top_share_of_pooled_tiles():
    # q = 0: every query attends uniformly, and pooled vectors predict that (divergence ~0.06 < tau). The pooled
    # estimate gives row r's r + 1 causal tiles 1/(r + 1) each; over the head's total of 8, gamma 0.45 needs
    # 3.6: rows 0-2 whole (3.0), then row 3's tiles 0, 1, 2 (3.75 once the third is in). Row 3's diagonal is
    # forced, so rows 0-3 are whole and rows 4-7 keep only their forced tiles.
    q = jnp.zeros((1, 1, T, 16))
    k = normal(np.random.default_rng(0), 1, 1, T, 16)
    sel = select(q, k, block_size=BLOCK, gamma=0.45, tau=0.1)
    assert bool(sel.query_aware[0, 0])
    np.testing.assert_array_equal(sel.keep[0, 0], tiles(rows_cols=[(r, c) for r in range(4) for c in range(r)]))
    # The same head with tau = 0 may not be query-aware.
    assert not bool(select(q, k, block_size=BLOCK, gamma=0.45, tau=0.0).query_aware[0, 0])


def test_line_shares_and_divergence_against_loops():
    rng = np.random.default_rng(1)
    t, rows = 11, 4
    probs = rng.random((1, 1, rows, t))
    positions = np.arange(t - rows, t)
    probs[0, 0][np.arange(t)[None, :] > positions[:, None]] = 0.0
    last = flexprefill._LastQueries(jnp.asarray(probs, jnp.float32), None, jnp.asarray(positions)[None],
                                    jnp.ones((1, rows), bool))
    vertical, slash = jax.jit(flexprefill._line_shares)(last)
    expected_slash = np.zeros(t)
    for i, pos in enumerate(positions):
        for key in range(pos + 1):
            expected_slash[pos - key] += probs[0, 0, i, key] / rows
    np.testing.assert_allclose(vertical[0, 0], probs[0, 0].mean(0), rtol=1e-6)
    np.testing.assert_allclose(slash[0, 0], expected_slash, rtol=1e-6)
    # Equal distributions are 0 apart; disjoint ones sqrt(ln 2).
    js = flexprefill._sqrt_js_divergence(jnp.asarray([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]),
                                         jnp.asarray([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]))
    np.testing.assert_allclose(js, [0.0, np.sqrt(np.log(2))], atol=1e-6)


@pytest.mark.parametrize("tau", [0.0, 1.0])  # every head vertical-slash, every head query-aware
def test_gamma_one_keeps_every_causal_tile_and_equals_dense_attention(tau):
    q, k = inputs()
    v = normal(np.random.default_rng(2), *k.shape)
    sel = select(q, k, block_size=16, gamma=1.0, tau=tau)
    assert bool(sel.query_aware.all()) == (tau == 1.0) and bool(sel.query_aware.any()) == (tau == 1.0)
    np.testing.assert_array_equal(sel.keep, np.broadcast_to(np.tril(np.ones((5, 5), bool)), sel.keep.shape))
    np.testing.assert_allclose(attend_kept(q, k, v, sel.keep, block=16), dense_attention(q, k, v), atol=1e-6)


def test_forced_tiles_kept_nothing_above_the_diagonal_and_higher_gamma_keeps_a_superset():
    q, k = inputs()  # t = 70: a ragged last block
    previous = None
    for gamma in (0.05, 0.3, 0.6, 0.9, 1.0):
        keep = np.asarray(select(q, k, block_size=16, gamma=gamma, tau=0.2).keep)
        assert keep.shape == (2, 4, 5, 5)
        assert keep[..., 0].all() and keep[..., np.arange(5), np.arange(5)].all()
        assert not keep[..., np.triu(np.ones((5, 5), bool), 1)].any()
        if previous is not None:
            assert (keep >= previous).all(), gamma
        previous = keep


@pytest.mark.parametrize("tau", [0.0, 1.0])  # every head vertical-slash, every head query-aware
def test_right_padded_rows_select_as_their_unpadded_sequences(tau):
    q, k = inputs()  # t = 70; row 0 holds 50 real positions, then padding
    padded = select(q, k, block_size=16, gamma=0.8, tau=tau, lengths=jnp.asarray([50, 70]))
    alone = select(q[:1, :, :50], k[:1, :, :50], block_size=16, gamma=0.8, tau=tau)
    np.testing.assert_array_equal(padded.keep[0, :, :4, :4], alone.keep[0])
    np.testing.assert_array_equal(padded.query_aware[0], alone.query_aware[0])
    full = select(q, k, block_size=16, gamma=0.8, tau=tau)
    np.testing.assert_array_equal(padded.keep[1], full.keep[1])
    np.testing.assert_array_equal(padded.query_aware[1], full.query_aware[1])


def test_gqa_matches_repeated_kv_heads():
    q, k = inputs()
    grouped = select(q, k, block_size=16, gamma=0.7, tau=0.2)
    repeated = select(q, jnp.repeat(k, 2, axis=1), block_size=16, gamma=0.7, tau=0.2)
    np.testing.assert_array_equal(grouped.keep, repeated.keep)
    np.testing.assert_array_equal(grouped.query_aware, repeated.query_aware)


def test_bad_arguments_raise_input_errors():
    q, k = inputs()
    for kwargs, match in ((dict(gamma=0.0), "gamma=0.0"), (dict(gamma=1.5), "gamma=1.5"), (dict(tau=-0.1), "tau"),
                          (dict(block_size=0), "block_size=0")):
        args = dict(block_size=16, gamma=0.9, tau=0.1) | kwargs
        with pytest.raises(InputError, match=match):
            flexprefill_block_mask(q, k, **args)
    with pytest.raises(InputError, match="not a multiple of kv heads"):
        flexprefill_block_mask(q[:, :3], k, block_size=16, gamma=0.9, tau=0.1)
    with pytest.raises(InputError, match="as many queries as keys"):
        flexprefill_block_mask(q[:, :, :40], k, block_size=16, gamma=0.9, tau=0.1)


@pytest.mark.parametrize("attention, match", [
    (dict(prefill="flexprefill", flexprefill_gamma=0.0), r"model.attention.flexprefill_gamma=0.0 .*\(0, 1\]"),
    (dict(prefill="flexprefill", flexprefill_gamma=1.2), r"model.attention.flexprefill_gamma=1.2"),
    (dict(flexprefill_tau=-0.5), r"model.attention.flexprefill_tau=-0.5 .*\[0, 1\]"),
    (dict(prefill="flex"), r"model.attention.prefill='flex'.*one of"),
    (dict(flexprefill_gama=0.9), r"unknown config key model.attention.flexprefill_gama"),
])
def test_config_validation_names_the_key(tiny_config, attention, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.validate_model_config(tiny_config(attention=attention))


def test_flexprefill_with_sliding_windows_is_refused(tiny_config):
    cfg = tiny_config(layer_windows=(4, 0), attention=dict(prefill="flexprefill"))
    with pytest.raises(ConfigError, match=r"prefill='flexprefill'.*'dense' when layer_windows"):
        config_lib.validate_model_config(cfg)


def test_a_run_saved_before_the_keys_existed_loads_with_their_defaults(tiny_config, tmp_path):
    import ml_collections

    from jaxspec.training import checkpoint

    cfg = tiny_config()
    old = cfg.to_dict()
    del old["attention"]["flexprefill_gamma"], old["attention"]["flexprefill_tau"]
    with checkpoint.CheckpointManager(str(tmp_path)) as manager:
        manager.save(1, {"params": {"w": jnp.ones(2)}}, {}, ml_collections.ConfigDict({"model": old}), force=True)
    _, loaded = checkpoint.restore_params(str(tmp_path))
    assert loaded.model.attention.flexprefill_tau == 0.1 and loaded.model.attention.flexprefill_gamma == 0.9
    assert loaded.model.d_model == cfg.d_model
    config_lib.validate_model_config(loaded.model)


def test_model_prefill_with_gamma_one_equals_dense_and_decodes(make_model, apply):
    options = dict(prefill="flexprefill", block_size=8, flexprefill_tau=0.1)
    small = dict(seed=1, max_len=64, n_layers=1)
    dense, params = make_model("A", **small)
    exact, _ = make_model("A", **small, attention=dict(options, flexprefill_gamma=1.0))
    sparse, _ = make_model("A", **small, attention=dict(options, flexprefill_gamma=0.3))
    tokens = jax.random.randint(jax.random.key(2), (2, 29), 0, 64)  # 29: not a multiple of the block
    np.testing.assert_allclose(apply(exact, params, tokens), apply(dense, params, tokens), atol=1e-5)
    # Decoding prefills through the selection, then steps over the cache.
    prompts = [tokens[0].tolist(), tokens[1, :17].tolist()]
    out = api.generate(sparse, params, prompts, max_new_tokens=4)
    assert [len(row) for row in out.tokens] == [4, 4]
    # The prefill selects from each row's own last queries, not the padding: a padded row's logits are its own.
    from jaxspec.state import init_decode_state

    @jax.jit
    def prefill(batch, lens):
        state = init_decode_state(sparse.model_cfg, batch.shape[0], 64)
        return sparse.apply({"params": params}, batch, state=state, num_new=lens, fresh=True)[0]

    padded = prefill(tokens.at[1, 17:].set(0), jnp.asarray([29, 17]))[1, :17]
    np.testing.assert_allclose(padded, prefill(tokens[1:, :17], jnp.asarray([17]))[0], atol=1e-5)
