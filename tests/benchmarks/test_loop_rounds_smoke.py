"""benchmarks/loop_rounds.py on a tiny model: a row per (prompt, method), the AR row its own yardstick, and the
rounds counted from each run's tau. Speed is not asserted."""

import types

import numpy as np
import pytest


def test_rows_per_prompt_and_method(benchmark_script, make_model):
    bench = benchmark_script("loop_rounds")
    model, params = make_model("A", seed=1, max_len=96)
    lm = types.SimpleNamespace(model=model, params=params, tokenizer=types.SimpleNamespace(eos_ids=None))
    repeated = [3, 1, 4, 1, 5, 3, 1, 4, 1, 5, 3, 1, 4]  # prompt lookup finds its continuations
    prompts = {"a": repeated, "b": [5, 9, 2, 6]}
    methods = {"lookup": dict(method="lookup", tree="chain:3")}
    rows = bench.measure(lm, prompts, methods, max_new_tokens=12, repeats=1, prompt_width=16)
    assert [(r["prompt"], r["method"]) for r in rows] == [("a", "ar"), ("a", "lookup"), ("b", "ar"), ("b", "lookup")]
    ar_round = {r["prompt"]: r["round ms"] for r in rows if r["method"] == "ar"}
    for row in rows:
        assert row["tokens"] == len(prompts[row["prompt"]])
        assert row["prefill ms"] > 0 and row["round ms"] >= 0
        assert 1.0 <= row["tau"] <= 4.0
        # On a model this small, timing noise can leave no time for the AR rounds: then there is no ratio.
        ar = ar_round[row["prompt"]]
        if ar > 0:
            assert row["round / AR step"] == row["round ms"] / ar
        else:
            assert np.isnan(row["round / AR step"])
    assert [r["tau"] for r in rows if r["method"] == "ar"] == [1.0, 1.0]


def test_stacks_reconfigure_the_target_and_bad_names_are_refused(benchmark_script, make_model):
    from jaxspec.decoding.loading import LoadedLM
    from jaxspec.errors import InputError

    bench = benchmark_script("loop_rounds")
    model, params = make_model("A", seed=1, max_len=96)
    lm = LoadedLM(model, params, None, None, "")
    stacks = bench.on_stacks(lm, ["unrolled", "scanned"])
    assert [name for name, _ in stacks] == ["unrolled", "scanned"]
    assert [on.model.model_cfg.scan_layers for _, on in stacks] == [False, True]
    assert all(on.params is params for _, on in stacks)
    for bad in (["scaned"], []):
        with pytest.raises(InputError, match="--stacks"):
            bench.on_stacks(lm, bad)
