"""benchmarks/shared_prefix_decode.py on a tiny model: rows of its table (samples, and rows under one prefix), with
the outputs the same."""

import types


def test_compare_row(benchmark_script, make_model):
    bench = benchmark_script("shared_prefix_decode")
    model, params = make_model("A", seed=2, max_len=64, n_layers=1)
    lm = types.SimpleNamespace(model=model, params=params, tokenizer=types.SimpleNamespace(eos_ids=()))
    prompt = [(7 * i) % 60 + 1 for i in range(20)]
    row = bench.compare(lm, [prompt] * 3, 5, 1.0, {})
    assert set(row) == set(bench.COLUMNS)
    assert row["same output"] and row["rows"] == 3 and row["prompt tokens"] == "20 shared + 20 at most"
    assert row["speedup"] > 0 and row["prefill speedup"] > 0
    row = bench.compare(lm, [prompt + [5, 6], prompt + [9]], 5, 0.0, {}, request="system prompt")
    assert row["same output"] and row["prompt tokens"] == "20 shared + 22 at most"
