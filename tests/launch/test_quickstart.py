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
