"""The quickstart's drafter recipe: its arg, its two configs (in the cache), and the table that picks up a
finished drafter."""

from configs import quickstart
from jaxspec import zoo
from jaxspec.training import checkpoint, selfdistill


def test_args_route_to_the_toy_the_drafter_recipe_or_the_suite():
    assert quickstart.sub_arg("drafters", "drafters") == "" and quickstart.sub_arg("drafters,steps=5", "drafters") == (
        "steps=5")
    assert quickstart.sub_arg("toy", "drafters") is None and quickstart.sub_arg("per_category=2", "toy") is None
    assert quickstart.sub_arg("toy,size=tiny", "toy") == "size=tiny"


def test_drafter_recipe_configs_live_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path))
    data, train, data_dir, eagle_dir = quickstart.drafter_configs("steps=7,num_prompts=8")
    selfdistill.validate_config(data)
    assert (data.num_prompts, data.target, train.train.steps) == (8, "smollm2-135m-instruct", 7)
    assert data_dir == train.data.source == zoo.drafter_dir("smollm2-135m-instruct", "selfdistill")
    assert eagle_dir == zoo.drafter_dir("smollm2-135m-instruct", "eagle") and eagle_dir.startswith(str(tmp_path))
    assert train.data.seq_len == data.seq_len - 1 and train.train.loss == "eagle"


def test_the_table_shows_eagle_once_its_drafter_is_trained(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path))
    assert "eagle" not in quickstart.get_config().methods
    eagle_dir = zoo.drafter_dir("smollm2-135m-instruct", "eagle")
    monkeypatch.setattr(checkpoint, "finished", lambda workdir: workdir == eagle_dir)
    methods = quickstart.get_config().methods
    assert methods.eagle.draft_workdir == eagle_dir and methods.eagle2.expand > 0


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
        "hydra", "hydra_dyn", "kangaroo", "eagle", "eagle2"}
    assert config.methods.hydra_dyn.draft_workdir == "/h" and config.methods.eagle2.draft_workdir == "/e"
    lossy = {name for name, row in config.methods.items() if not registry.get(row["method"]).lossless}
    assert lossy == {"skiplayers", "skipdecode", "h2o"}
    with pytest.raises(ConfigError, match="methods='some' is not allowed"):
        quickstart.get_config("methods=some")


def test_scan_layers_reaches_the_suite_decode_settings():
    assert quickstart.get_config().decode.scan_layers is False
    assert quickstart.get_config("scan_layers=1").decode.scan_layers is True
