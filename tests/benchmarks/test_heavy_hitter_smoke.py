"""benchmarks/heavy_hitter.py on a tiny model: long prompts within their bound and the rows of both tables."""

import types

import pytest

from jaxspec.errors import InputError


def test_long_prompts_within_their_bound(benchmark_script, chat_tokenizer):
    bench = benchmark_script("heavy_hitter")
    texts = ["alpha beta gamma. " * 4, "delta epsilon. " * 6, "zeta eta theta. " * 3]
    prompts = bench.long_prompts(chat_tokenizer, texts, 2, 220)
    assert len(prompts) == 2 and all(100 < len(p) <= 220 for p in prompts) and prompts[0] != prompts[1]
    with pytest.raises(InputError, match="max_tokens=20"):
        bench.long_prompts(chat_tokenizer, texts, 1, 20)


def test_rows(benchmark_script, make_model):
    bench = benchmark_script("heavy_hitter")
    model, params = make_model("A", seed=2, max_len=64, n_layers=1)
    lm = types.SimpleNamespace(model=model, params=params, tokenizer=types.SimpleNamespace(eos_ids=()))
    prompts = [[(7 * i) % 60 + 1 for i in range(20)], [(5 * i) % 60 + 1 for i in range(17)]]
    report = bench.run(lm, prompts, [6], 0.5, 6, "chain:2", split_prefill=False)  # fewer compiles
    ar, lossy = report["lossy"]
    assert ar["method"] == "ar" and lossy["method"] == "h2o" and 0 <= lossy["agreement"] <= 1
    assert ar["log-lik"] < 0 and lossy["log-lik"] < 0 and lossy["speedup"] > 0
    draft, = report["self_draft"]
    assert draft["identical"] and draft["tau"] >= 1 and draft["speedup"] > 0
    assert report["prompt_tokens"] == [20, 17]
