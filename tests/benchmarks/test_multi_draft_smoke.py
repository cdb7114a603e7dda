"""benchmarks/multi_draft.py on a tiny model: same-draft acceptance per rule, and the end-to-end rows."""

import types

import numpy as np
import pytest


def test_acceptance_table_and_decode_rows(benchmark_script, make_model):
    bench = benchmark_script("multi_draft")
    model, params = make_model("A", seed=1, max_len=128)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8]]
    sequences = [p + [5, 3, 5, 8, 9, 7] for p in prompts]
    target, draft = bench.context_logits(model, params, sequences, [len(p) for p in prompts], (1,))
    assert target.shape == draft.shape == (2 * 6, model.model_cfg.vocab_size)
    full = np.asarray(model.apply({"params": params}, np.asarray([sequences[0]])))[0]
    np.testing.assert_allclose(target[:6], full[len(prompts[0]) - 1:-1], atol=1e-5)

    rows = bench.acceptance_table(target, draft, [1, 3], draws=20)
    single = bench.single_draft_acceptance(target, draft)
    one = rows[0]
    for rule in bench.RULES:  # one child: every rule is plain speculative sampling
        assert one[rule] == pytest.approx(single, abs=0.15), rule
    three = rows[1]
    assert all(three[rule] >= one[rule] - 0.1 for rule in bench.RULES)
    # Identical target and draft: every rule accepts a child with certainty.
    same = bench.acceptance(target, target, 2, draws=4)
    assert all(rate == pytest.approx(1.0) for rate in same.values()), same

    lm = types.SimpleNamespace(model=model, params=params, tokenizer=types.SimpleNamespace(eos_ids=None))
    rows = bench.decode_rows(lm, prompts[:1], (1,), "branching:2,1", max_new_tokens=6)
    assert [r["rule"] for r in rows] == ["ar", *bench.RULES]
    assert all(r["tau"] >= 1.0 and r["tok/s"] > 0 for r in rows)
