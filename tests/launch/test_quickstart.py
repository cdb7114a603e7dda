"""The quickstart's drafter recipe: its arg, its configs (in the cache), and the table that picks up the finished
heads."""

from configs import quickstart
from jaxspec import zoo
from jaxspec.training import checkpoint, selfdistill


def test_args_route_to_the_toy_the_drafter_recipe_or_the_suite():
    assert quickstart.sub_arg("drafters", "drafters") == "" and quickstart.sub_arg("drafters,steps=5", "drafters") == (
        "steps=5")
    assert quickstart.sub_arg("toy", "drafters") is None and quickstart.sub_arg("per_category=2", "toy") is None
    assert quickstart.sub_arg("toy,size=tiny", "toy") == "size=tiny"


def test_drafter_recipe_configs_live_in_the_cache(monkeypatch, tmp_path):
    import pytest

    from jaxspec.config import ConfigError
    from jaxspec.training import train_config

    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path))
    recipe = quickstart.drafter_configs("steps=7,num_prompts=8,self_prompts=4,self_tasks=6")
    assert list(recipe.sets) == ["tasks", "self", "self_tasks"]
    for name, (data, out) in recipe.sets.items():
        selfdistill.validate_config(data)
        assert data.prompt_set == name and data.target == "smollm2-135m-instruct" and out.startswith(str(tmp_path))
    assert [recipe.sets[n][0].num_prompts for n in recipe.sets] == [8, 4, 6]
    assert recipe.sets["self_tasks"][0].passages_from == recipe.sets["self"][1]  # the self set's replies
    assert recipe.sets["tasks"][1] == zoo.drafter_dir("smollm2-135m-instruct", "selfdistill")
    assert recipe.train.data.source == recipe.combined not in {out for _, out in recipe.sets.values()}
    assert recipe.heads == zoo.drafter_dir("smollm2-135m-instruct", "hydra") and recipe.train.train.steps == 7
    assert recipe.train.train.loss == "hydra" and recipe.train.data.window == "reply"
    train_config.validate_hydra_config(recipe.train.hydra)
    alone = quickstart.drafter_configs("self_prompts=0,self_tasks=0")
    assert list(alone.sets) == ["tasks"] and alone.combined == alone.sets["tasks"][1]
    with pytest.raises(ConfigError, match="self_tasks=6 needs self_prompts > 0"):
        quickstart.drafter_configs("self_prompts=0,self_tasks=6")


def test_the_table_shows_the_heads_once_they_are_trained(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path))
    assert "hydra" not in quickstart.get_config().methods
    heads = zoo.drafter_dir("smollm2-135m-instruct", "hydra")
    monkeypatch.setattr(checkpoint, "finished", lambda workdir: workdir == heads)
    methods = quickstart.get_config().methods
    assert methods.hydra.draft_workdir == methods.hydra_tree.draft_workdir == heads
    assert (methods.hydra.tree, methods.hydra_tree.tree) == ("chain:2", "medusa_small")
    assert quickstart.get_config("hydra=/h").methods.hydra.draft_workdir == "/h"  # a given run comes first


def test_methods_all_and_trained_runs_add_rows(monkeypatch, tmp_path):
    import pytest

    from jaxspec.config import ConfigError
    from jaxspec.decoding import methods as registry
    from jaxspec.eval import suite_eval

    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path))
    default = quickstart.get_config()
    config = quickstart.get_config("methods=all,hydra=/h,kangaroo=/k,eagle=/e")
    suite_eval.validate(config)  # every row is a valid spec of a registered method
    assert set(config.methods) == set(default.methods) | set(quickstart.ALL_TRAINING_FREE) | {
        "hydra", "hydra_tree", "kangaroo", "eagle", "eagle2"}
    assert config.methods.hydra_tree.draft_workdir == "/h" and config.methods.eagle2.draft_workdir == "/e"
    lossy = {name for name, row in config.methods.items() if not registry.get(row["method"]).lossless}
    assert lossy == {"skiplayers", "skipdecode", "h2o"}
    with pytest.raises(ConfigError, match="methods='some' is not allowed"):
        quickstart.get_config("methods=some")


def test_scan_layers_reaches_the_suite_decode_settings():
    assert quickstart.get_config().decode.scan_layers is True
    assert quickstart.get_config("scan_layers=0").decode.scan_layers is False
