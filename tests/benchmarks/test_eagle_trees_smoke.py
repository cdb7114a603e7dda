"""benchmarks/eagle_trees.py on a tiny model: its method grid and one round's parts for a feature drafter (static
and dynamic tree, EAGLE-3's fused streams) and a model-free one."""

import jax
import jax.numpy as jnp
import pytest

from jaxspec.decoding import methods, trees
from jaxspec.decoding.dynamic_tree import DynamicTree
from jaxspec.decoding.method import Target
from jaxspec.decoding.methods.eagle import EagleDrafter
from jaxspec.models.eagle import EagleNet, drafter_model_cfg, target_side


def test_grid_and_round_split(benchmark_script, make_model):
    bench = benchmark_script("eagle_trees")
    grid = bench.eagle_methods("/d", ["2", "4"], ["3:2:4"])
    assert grid["eagle_chain4"] == dict(method="eagle", draft_workdir="/d", tree="chain:4")
    assert grid["eagle_dyn3x2n4"] == dict(method="eagle", draft_workdir="/d", expand=3, depth=2, nodes=4)
    assert set(bench.eagle_methods("/e", ["2"], [], prefix="eagle3")) == {"eagle3_chain2"}
    heads = bench.tree_methods("hydra", "/h", ["medusa_small"], ["2:3:4"], prefix="hydra")
    assert heads == {"hydra_medusa_small": dict(method="hydra", draft_workdir="/h", tree="medusa_small"),
                     "hydra_dyn2x3n4": dict(method="hydra", draft_workdir="/h", expand=2, depth=3, nodes=4)}
    assert bench.head_methods("medusa", ["/runs/m"], ["chain:3"], []) == {
        "medusa_chain3": dict(method="medusa", draft_workdir="/runs/m", tree="chain:3")}
    runs = bench.head_methods("medusa", ["/runs/full", "/runs/trim/"], ["chain:3"], [])  # several: named by folder
    assert set(runs) == {"medusa_full_chain3", "medusa_trim_chain3"}
    with pytest.raises(Exception, match="share a last folder name"):
        bench.head_methods("medusa", ["/a/m", "/b/m"], ["chain:3"], [])

    model, params = make_model("A", seed=1, max_len=128)
    net = EagleNet(drafter_model_cfg(model.model_cfg, 1))
    d = model.model_cfg.d_model
    net_params = net.init(jax.random.key(0), jnp.zeros((1, 1, d)), jnp.zeros((1, 1, d)))["params"]
    side = {"net": net_params, **target_side(params, model.model_cfg, range(model.model_cfg.vocab_size))}
    lookup = methods.make("lookup", tree="chain:3").build(Target(model, params))
    net3 = EagleNet(drafter_model_cfg(model.model_cfg, 1), fused_streams=2)  # EAGLE-3: two residual streams
    side3 = dict(side, net=net3.init(jax.random.key(0), jnp.zeros((1, 1, 2 * d)), jnp.zeros((1, 1, d)))["params"])
    drafters = {"eagle": (EagleDrafter(net, trees.chain(3)), side),
                "eagle2": (EagleDrafter(net, trees.chain(4), DynamicTree(2, 2, 4)), side),
                "eagle3": (EagleDrafter(net3, trees.chain(3), feature_layers=(0, 1)), side3), "lookup": lookup}
    rows = bench.round_split(model, params, drafters, [3, 1, 4, 1, 5, 9, 2, 6], iters=2)
    assert [r["method"] for r in rows] == ["ar", "eagle", "eagle2", "eagle3", "lookup"]
    assert rows[0]["round / AR step"] == 1.0
    assert all(r["verify_ms"] > 0 and r["round_ms"] >= r["verify_ms"] for r in rows)
    assert all(r["draft_ms"] > 0 and r["commit_ms"] > 0 for r in rows[1:])
