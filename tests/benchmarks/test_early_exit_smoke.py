"""benchmarks/early_exit.py on a tiny model: its schedules and the measured rows."""

import types

import numpy as np
import pytest


def test_schedules_parse(benchmark_script):
    bench = benchmark_script("early_exit")
    assert bench.parse_schedules("4:2,3:3") == [(4, 2), (3, 3)]
    with pytest.raises(ValueError, match="'4-2' is not max_exit:min_exit"):
        bench.parse_schedules("4-2")


def test_measured_rows(benchmark_script, make_model):
    bench = benchmark_script("early_exit")
    model, params = make_model("A", seed=1, max_len=96)
    similarity = np.asarray([0.5, 0.9])
    specs = bench.method_specs(model, params, similarity, [1], [(2, 1)], decay_start=0, decay_end=8,
                               target_speedups=[2.0])
    assert specs["skiplayers 2x"].target_speedup == 2.0 and not specs["skiplayers 2x"].lossless
    assert specs["ffnskip 1 (text)"].skip_ffn == (1,) and specs["skipdecode 2->1"].lossless is False
    del specs["ffnskip 1 (default)"]  # the same kind of row: one compiled loop fewer
    lm = types.SimpleNamespace(model=model, params=params, tokenizer=types.SimpleNamespace(eos_ids=None))
    rows = bench.measure(lm, [[3, 1, 4, 1], [5, 9]], specs, max_new_tokens=6)
    by_name = {row["method"]: row for row in rows}
    assert by_name["ar"]["agreement"] == 1.0 and by_name["ar"]["speedup"] == 1.0
    for name, row in by_name.items():
        assert row["tok/s"] > 0 and np.isfinite(row["target loglik"])
        if row["lossless"]:  # lossless drafts reproduce AR exactly
            assert row["identical"] and row["agreement"] == 1.0, name
