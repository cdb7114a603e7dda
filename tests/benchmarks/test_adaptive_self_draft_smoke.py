"""benchmarks/adaptive_self_draft.py: its skip-set flag and the methods it compares (no decoding: the methods
themselves are tested in tests/decoding/test_gated_draft.py)."""


def test_skip_sets_and_specs(benchmark_script):
    bench = benchmark_script("adaptive_self_draft")
    assert bench.parse_skip_sets("default;4-5,7") == [(), (4, 5, 7)]
    specs = bench.method_specs(30, [(), (4, 5)], ["0.2"], search_rounds=8, tree="chain:2", context_windows=["16"])
    assert list(specs) == ["layerskip default", "over target cache default", "layerskip 4,5", "over target cache 4,5",
                           "del", "swift 0.2", "swift 0.2 context 16"]
    assert specs["swift 0.2 context 16"].context_window == 16 and specs["swift 0.2"].context_window == 0
    # the same skip set drafts both ways; over the target's cache without a search
    assert specs["layerskip default"].skip_layers == specs["over target cache default"].skip_layers
    assert specs["over target cache 4,5"].search_rounds == 0 and specs["swift 0.2"].search_rounds == 8
    assert all(spec.lossless and spec.tree == "chain:2" for spec in specs.values())


def test_a_search_carried_over_prompts_keeps_the_output(benchmark_script, make_model):
    from jaxspec.decoding import methods

    bench = benchmark_script("adaptive_self_draft")
    model, params = make_model("AAAAA", max_len=64)
    specs = {"swift": methods.make("swift", skip_ratio=0.4, search_rounds=3, trial_rounds=1, tree="chain:2"),
             "del": methods.make("del", tree="chain:2")}  # not a search: no carried row
    rows = bench.carried_search(model, params, [[1, 2, 3, 4], [5, 6, 7]], specs, 1, 6, ())
    assert [r["method"] for r in rows] == ["swift, carried"]
    assert rows[0]["identical"] and rows[0]["tau"] >= 1 and rows[0]["fields"].startswith("search on the first 1")
