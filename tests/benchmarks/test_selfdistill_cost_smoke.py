"""benchmarks/selfdistill_cost.py on a tiny model: a row per (order, way of taking the states), the same replies
every way, and batches sorted by prompt length. Speed is not asserted."""

import types


def test_rows_and_batches(benchmark_script, make_model, chat_tokenizer):
    bench = benchmark_script("selfdistill_cost")
    prompts = [[5] * n for n in (9, 3, 7, 4, 8)]
    assert [[len(p) for p in b] for b in bench.batches_of(prompts, 2, by_length=True)] == [[3, 4], [7, 8], [9]]
    assert [[len(p) for p in b] for b in bench.batches_of(prompts, 2, by_length=False)] == [[9, 3], [7, 4], [8]]
    model, params = make_model("A", vocab_size=264, max_len=96)
    lm = types.SimpleNamespace(model=model, params=params, tokenizer=chat_tokenizer)
    rows = bench.measure(lm, [[7, 11 + n, 3] * n for n in (1, 4, 2, 3, 5)], batch_size=2, max_new_tokens=6,
                         seq_len=32)
    assert [(r["order"], r["states"]) for r in rows] == [("stream", "feature forward"), ("stream", "recorded"),
                                                         ("by length", "feature forward"), ("by length", "recorded")]
    assert len({r["reply tokens"] for r in rows}) == 1 and all(r["batches"] == 3 for r in rows)
    for row in rows:
        assert (row["feature forward s"] > 0) == (row["states"] == "feature forward")
        assert row["total s"] == row["decode s"] + row["feature forward s"]
    assert rows[0]["vs before"] == 1.0
