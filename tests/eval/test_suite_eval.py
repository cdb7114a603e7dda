"""Suite evaluation end to end on a saved tiny model: one row per (category, method) and over all prompts,
tables and plots written; every bad config names its key."""

import json
import os

import jax
import ml_collections
import pytest

from configs import lm
from jaxspec.config import ConfigError
from jaxspec.eval import suite_eval
from jaxspec.eval.suite import CATEGORIES
from jaxspec.models.lm import build_model, init_params
from jaxspec.training.checkpoint import CheckpointManager


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    config = lm.get_config("tiny")
    config.model.update(dict(n_layers=2, d_model=32, d_ff=64, max_len=2048))
    workdir = str(tmp_path_factory.mktemp("target"))
    with CheckpointManager(workdir) as manager:
        manager.save(0, {"params": init_params(build_model(config.model), jax.random.key(0))}, {}, config,
                     force=True)
    return workdir


def small_config(target_dir):
    config = suite_eval.suite_eval_defaults()
    config.target = target_dir
    config.suite.per_category = 1
    config.decode.max_new_tokens = 4
    config.methods = dict(lookup=dict(method="lookup", tree="chain:2"))
    return config


def test_every_category_and_method_gets_a_row(target_dir, tmp_path):
    report = suite_eval.evaluate_suite(small_config(target_dir), str(tmp_path))
    rows = report["rows"]
    assert [(r["category"], r["method"]) for r in rows] == [
        (c, m) for c in ("all", *CATEGORIES) for m in ("ar", "lookup")]
    assert all(r["identical"] for r in rows) and report["prompts"] == len(CATEGORIES)
    for name in ("results.json", "results.md", "results.csv", suite_eval.SPEEDUP_BY_CATEGORY):
        assert os.path.isfile(tmp_path / name), name
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    table = suite_eval.table(rows).splitlines()
    assert table[-1].startswith("| all | lookup | chain:2 |")  # the summary rows come last
    assert table[0].endswith("| identical to AR | lossless |") and table[-1].endswith("| yes | yes |")
    assert all(r["lossless"] is True for r in rows)  # from the specs: both methods claim it


def test_a_scanned_target_decodes_the_suite_with_the_same_tokens(target_dir, tmp_path, monkeypatch):
    stacks = []  # model.scan_layers of the model each evaluation decodes with
    compare_methods = suite_eval.compare.compare_methods
    monkeypatch.setattr(suite_eval.compare, "compare_methods",
                        lambda model, *a, **k: stacks.append(model.model_cfg.scan_layers) or compare_methods(model, *a,
                                                                                                             **k))
    config = small_config(target_dir)
    config.suite.categories = ("code",)
    reports = []
    for scan in (True, False):
        config.decode.scan_layers = scan
        reports.append(suite_eval.evaluate_suite(config, str(tmp_path / str(scan)))["rows"])
    assert stacks == [True, False]
    scanned, unrolled = reports
    assert all(r["identical"] for r in scanned)  # every method against the scanned stack's AR
    assert [(r["method"], r["new_tokens"], r["tau"]) for r in scanned] == [
        (r["method"], r["new_tokens"], r["tau"]) for r in unrolled]


@pytest.mark.parametrize("change, message", [
    (lambda c: c.methods.update(dict(x=dict(method="lookup", granularity=0))),
     "config.methods.x: method 'lookup' takes no argument 'granularity'"),
    (lambda c: c.methods.update(dict(x=dict(method="ar"))), "config.methods.x.method='ar' is not allowed"),
    (lambda c: c.suite.update(dict(categories=("poetry",))), "config.suite.categories=('poetry',)"),
    (lambda c: c.decode.update(dict(batch_size=0)), "config.decode.batch_size=0"),
    # ConfigDict keeps a field's type; a section built anew (e.g. from JSON) may not
    (lambda c: setattr(c, "decode", ml_collections.ConfigDict({**c.decode.to_dict(), "scan_layers": "yes"})),
     "config.decode.scan_layers='yes' is not allowed: True or False"),
    (lambda c: c.update(dict(modle="x")), "unknown config key config.modle"),
])
def test_bad_configs_name_the_key(target_dir, change, message):
    config = small_config(target_dir)
    change(config)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        suite_eval.validate(config)


def test_speedup_is_a_ratio_of_token_rates():
    """A lossy mode whose output ends sooner takes less wall time without being faster: half the tokens in 0.6 of
    the time is 0.83x, not 1.67x; a lossless method with the same tokens in half the time is 2x."""
    from jaxspec.eval.compare import _PromptRun, _summarise

    baseline = [_PromptRun([1] * 10, 9, 9, 1.0), _PromptRun([2] * 10, 9, 9, 1.0)]
    shorter = [_PromptRun([1] * 5, 4, 4, 0.6), _PromptRun([3] * 5, 4, 4, 0.6)]
    lossy = _summarise("mode", "h2o", False, shorter, baseline, 0.0, "all")
    assert lossy.speedup == pytest.approx((10 / 1.2) / (20 / 2.0)) and not lossy.identical
    faster = [_PromptRun([1] * 10, 5, 9, 0.5), _PromptRun([2] * 10, 5, 9, 0.5)]
    assert _summarise("spec", "lookup", True, faster, baseline, 0.0, "all").speedup == pytest.approx(2.0)
