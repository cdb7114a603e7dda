"""benchmarks/sparse_prefill.py on a tiny random model: a row per (prompt, method) plus the means, selections that
keep every tile reproduce dense exactly, and the recall of a hand-built mask. Speed is not asserted."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("sparse_prefill")


def options(**overrides):
    base = dict(block_size=8, xattention_stride=4, xattention_threshold=1.0, flexprefill_gamma=1.0,
                flexprefill_tau=0.1, last_n=4, rounds=1)
    return types.SimpleNamespace(**(base | overrides))


def test_keeping_every_tile_reproduces_dense(script, make_model, capsys):
    model, params = make_model("A", seed=2, max_len=64, n_layers=1)
    lm = types.SimpleNamespace(model=model, params=params)
    prompts = script.synthetic_prompts(2, 30, model.model_cfg.vocab_size)
    assert prompts[0] != prompts[1] and all(len(p) == 30 for p in prompts)
    rows = script.run(lm, prompts[:1], options())
    assert [(r["prompt"], r["method"]) for r in rows] == [(p, m) for p in (0, "mean") for m in script.METHODS]
    for row in rows:
        assert row["density"] == pytest.approx(1.0) and row["recall"] == pytest.approx(1.0, abs=1e-6)
        assert row["last_max_err"] < 1e-5 and row["top1_agree"] == 1.0 and row["ms"] > 0
        assert (row["query_aware"] is None) == (row["method"] != "flexprefill")
    table = capsys.readouterr().out
    assert table.count("| flexprefill |") == 2 and "time vs dense" in table


def test_recall_of_the_diagonal_tiles_under_uniform_attention(script):
    # q = 0: query i spreads its attention evenly over keys 0..i, so the diagonal tile of its block holds
    # (i mod 8 + 1) / (i + 1) of it. Density: 4 of the 10 causal tiles.
    t, block = 32, 8
    q = jnp.zeros((1, 2, t, 4))
    k = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, t, 4)), jnp.float32)
    keep = jnp.broadcast_to(jnp.eye(4, dtype=bool), (1, 2, 4, 4))
    density, recall = script.kept_share(q, k, keep, block_size=block, scale=0.5)
    i = np.arange(t)
    assert float(density) == pytest.approx(4 / 10)
    assert float(recall) == pytest.approx(np.mean((i % block + 1) / (i + 1)), rel=1e-5)


def test_suite_prompts_have_the_asked_length_and_differ(script):
    from jaxspec.training.tokenizer import ByteTokenizer

    prompts = script.suite_prompts(ByteTokenizer(), 2, 3000)
    assert [len(p) for p in prompts] == [3000, 3000] and prompts[0] != prompts[1]
