"""benchmarks/stop_rules.py: its grid is one layer-skip drafter over one chain with each stop rule, and every row
is a valid suite method."""

from jaxspec.decoding import methods


def test_grid_has_one_drafter_and_every_stop_rule(benchmark_script):
    bench = benchmark_script("stop_rules")
    grid = bench.stop_rule_methods("4,5,7", "chain:4", "/head", ["0.3", "0.7"], 2, 0.5)
    assert list(grid) == ["no_stop", "adaptive2", "confidence50", "specdecpp30", "specdecpp70"]
    drafters = set()
    for row in grid.values():
        fields = {k: v for k, v in row.items() if k != "method"}
        spec = methods.make(row["method"], **fields)
        drafters.add(tuple(sorted(spec.drafted_by().items())))
        assert spec.tree_spec == "chain:4"
    assert drafters == {(("method", "layerskip"), ("skip_layers", (4, 5, 7)))}
    assert grid["specdecpp70"]["acceptance_head"] == "/head" and grid["specdecpp70"]["stop_threshold"] == 0.7
