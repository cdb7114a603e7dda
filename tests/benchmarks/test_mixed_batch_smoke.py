"""benchmarks/mixed_batch.py on a tiny model: a long request arriving among decoding rows gives one row per
schedule, every schedule with the prefill-first run's tokens (tests/decoding/test_mixed_batch.py checks those
against decoding each prompt alone). Speed is not asserted."""

from __future__ import annotations


def test_a_row_per_schedule_with_the_same_tokens(benchmark_script, make_model):
    bench = benchmark_script("mixed_batch")
    from jaxspec.decoding.mixed_batch import MixedForward

    model, params = make_model("A", seed=2, max_len=48)
    long = [(7 * i) % 61 + 1 for i in range(30)]
    requests = bench.workload([[3, 1, 4, 1, 5], [2, 7, 1, 8]], long, long_arrival=2)
    assert [r.arrival for r in requests] == [0, 0, 2] and requests[-1].prompt == tuple(long)
    plans = bench.schedules([16], len(long))
    assert [s.name for s in plans] == ["prefill first (30)", "chunked 16"]
    forward = MixedForward(model, params, slots=3, max_len=48)
    rows, results = bench.compare_schedules(forward, requests, plans, max_new=6, rounds=2)
    assert [r["schedule"] for r in rows] == [s.name for s in plans]
    assert all(r["same tokens"] == "yes" for r in rows), rows
    assert [r["iterations"] for r in rows] == [len(x.iteration_s) for x in results]
    assert rows[1]["iterations"] == rows[0]["iterations"] + 1  # the long prompt in one forward, or in two
    for row in rows:
        assert row["long TTFT ms"] > 0 and row["worst gap ms"] >= row["median gap ms"] > 0 and row["tokens/s"] > 0


def test_long_request_reaches_its_length(benchmark_script, chat_tokenizer):
    bench = benchmark_script("mixed_batch")
    ids = bench.long_request_ids(chat_tokenizer, ["first note.", "second, longer note."], 120)
    assert len(ids) >= 120
    assert chat_tokenizer.decode(ids).count("note.") >= 2
