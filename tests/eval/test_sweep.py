"""Sweeps end to end on tiny runs (results table, plots, skip and resume on re-run, a failing run recorded),
and the runner's config handling: overrides, run names, references and validation."""

import csv
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from configs import lm
from configs import toy_quickstart as quickstart
from jaxspec.config import ConfigError
from jaxspec.eval import plots, run_config, run_stages, sweep, sweep_runs, tables
from jaxspec.training.train_config import validate_config
from launch.sweep import declared_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRID = [(n_layers, tree) for n_layers in (1, 2) for tree in ("chain:2", "chain:3")]


def write_corpus(directory) -> str:
    """Small Python-like files: repetitive enough for prompt lookup to accept drafts."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    names = ("alpha", "beta", "gamma", "delta", "value", "index", "total")
    for d in range(12):
        lines = []
        for _ in range(60):
            a, b = rng.choice(names, size=2)
            lines.append(f"    {a} = {b} + {int(rng.integers(10))}\n")
        with open(os.path.join(directory, f"mod_{d:02d}.py"), "w") as fh:
            fh.write(f"def f_{d}(alpha, beta):\n" + "".join(lines) + "    return total\n")
    return str(directory)


def tiny_base(corpus: str) -> ml_collections.ConfigDict:
    """d_model 32, seq_len 16, 4 train steps, 1 prompt of 8 tokens, 6 new tokens."""
    config = lm.get_config("tiny")
    m = config.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.max_len = 32, 2, 2, 1, 64, 64
    d = config.data
    d.source, d.seq_len, d.batch_size, d.val_fraction, d.max_bytes = corpus, 16, 4, 0.3, 30_000
    t = config.train
    t.steps, t.warmup_steps, t.log_every, t.eval_every, t.eval_batches = 4, 1, 2, 0, 1
    t.save_every, t.progress_bar = 4, False
    config.stages = run_config.stages_defaults()
    config.eval = run_config.eval_defaults()
    e = config.eval
    e.num_prompts, e.prompt_len, e.max_new_tokens = 1, 8, 6
    e.methods = {"lookup": dict(method="lookup", tree="chain:2")}
    config.plots = [dict(x="model.n_layers", y="val_loss", group="tree")]
    return config


def grid_name(n_layers, tree):
    return f"n_layers={n_layers},tree={tree.replace(':', '_')}"


def grid_sweep(add, arg=None):
    """n_layers x tree: the first tree's runs train and evaluate, the second's evaluate those models."""
    for n_layers, tree in GRID:
        overrides = {"model.n_layers": n_layers, "eval.methods.lookup.tree": tree}
        if tree == GRID[0][1]:
            add(**overrides)
        else:
            source = f"run:{grid_name(n_layers, GRID[0][1])}"
            add(name=grid_name(n_layers, tree), **{"stages.train": False, "eval.target_workdir": source,
                                                   **overrides})
    add(name="broken", **{"model.n_heads": 3})  # 32 is not a multiple of 3: the trainer's validation refuses


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    workdir = str(tmp_path_factory.mktemp("sweep"))
    base = tiny_base(corpus)
    runs = sweep_runs.collect_runs(grid_sweep)
    results = sweep.run_sweep(base, runs, workdir, progress=False)
    return base, runs, workdir, results


def read_text(path) -> str:
    with open(path) as fh:
        return fh.read()


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sweep_writes_rows_tables_and_plots(swept):
    _, runs, workdir, results = swept
    assert [r.name for r in runs] == [grid_name(*g) for g in GRID] + ["broken"]
    assert [r["status"] for r in results] == ["ok"] * 4 + ["failed"]

    rows = read_csv(os.path.join(workdir, tables.RESULTS_CSV))
    assert len(rows) == 4 * 2 + 1  # (ar + lookup) per run, one row for the failed run
    for n_layers, tree in GRID:
        mine = [r for r in rows if r["run"] == grid_name(n_layers, tree)]
        assert [r["method"] for r in mine] == ["ar", "lookup"]
        ar, lookup = mine
        assert ar["model.n_layers"] == lookup["model.n_layers"] == str(n_layers)
        assert lookup["tree"] == tree and ar["tau"] == "1.0" and float(ar["speedup"]) == 1.0
        assert 1.0 <= float(lookup["tau"]) <= int(tree.split(":")[1]) + 1
        assert lookup["identical"] == "True"  # greedy speculative output is the autoregressive output
        assert float(lookup["tokens_per_s"]) > 0 and float(lookup["speedup"]) > 0
        if tree == GRID[0][1]:  # trained here
            assert 0 < float(ar["val_loss"]) < np.log(259) + 1 and float(ar["val_bpb"]) > 0
        else:
            assert ar["val_loss"] == "" and ar["stages.train"] == "False"
    params = {n: int([r for r in rows if r["model.n_layers"] == str(n)][0]["num_params"]) for n in (1, 2)}
    assert params[2] > params[1]
    for n_layers, tree in GRID[1::2]:  # evaluation-only runs: no training figures, the same baseline output
        evaluated = [r for r in results if r["name"] == grid_name(n_layers, tree)][0]
        trained = [r for r in results if r["name"] == grid_name(n_layers, GRID[0][1])][0]
        assert "train" not in evaluated and evaluated["eval"]["settings"]["target_workdir"] == os.path.join(
            workdir, trained["name"])
        assert evaluated["eval"]["methods"][0]["tokens_per_s"] > 0

    (broken,) = [r for r in rows if r["run"] == "broken"]
    assert broken["status"] == "failed" and "model.n_heads" in broken["error"] and broken["method"] == ""
    assert "n_heads" in json.loads(read_text(os.path.join(workdir, "broken", sweep_runs.RESULT_FILE)))["error"]
    assert "Traceback" in read_text(os.path.join(workdir, "broken", sweep.ERROR_FILE))

    table = read_text(os.path.join(workdir, tables.RESULTS_MD)).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[0].startswith("| run | status | model.n_layers | eval.methods.lookup.tree | stages.train |")
    assert sum("| failed |" in line for line in table) == 1

    for name in (plots.SPEEDUP_VS_TAU, "val_loss_vs_model.n_layers_by_tree.png"):
        with open(os.path.join(workdir, name), "rb") as fh:
            assert fh.read(8) == PNG_MAGIC, name
    assert not os.path.exists(os.path.join(workdir, plots.MATFORMER_LOSS_VS_PARAMS))  # no MatFormer run


def count_executions(monkeypatch) -> list:
    calls = []
    real = run_stages.execute_run

    def counting(config, run_dir, progress=True):
        calls.append(os.path.basename(run_dir))
        return real(config, run_dir, progress)

    monkeypatch.setattr(run_stages, "execute_run", counting)
    return calls


def test_rerun_skips_finished_runs_and_resumes_unfinished(swept, monkeypatch):
    base, runs, workdir, first = swept
    done = grid_name(*GRID[0])
    result_file = lambda name: os.path.join(workdir, name, sweep_runs.RESULT_FILE)
    mtimes = {r.name: os.path.getmtime(result_file(r.name)) for r in runs}

    calls = count_executions(monkeypatch)
    again = sweep.run_sweep(base, runs, workdir, progress=False)
    assert calls == ["broken"]  # a failed run is tried again; finished ones are not
    assert [r.get("skipped", False) for r in again] == [True] * 4 + [False]
    for name in mtimes:
        if name != "broken":
            assert os.path.getmtime(result_file(name)) == mtimes[name]

    # A run without its result (stopped during evaluation) runs again, but does not train again; the run
    # that evaluates its model runs again too.
    metrics_file = os.path.join(workdir, done, "metrics.jsonl")
    trained_at = os.path.getmtime(metrics_file)
    os.remove(result_file(done))
    calls.clear()
    third = sweep.run_sweep(base, runs, workdir, progress=False)
    assert calls == [done, grid_name(*GRID[1]), "broken"]
    assert [r.get("skipped", False) for r in third] == [False, False, True, True, False]
    assert os.path.getmtime(metrics_file) == trained_at
    assert third[0]["train"]["val_loss"] == first[0]["train"]["val_loss"]
    assert third[0]["eval"]["methods"][1]["tau"] == first[0]["eval"]["methods"][1]["tau"]


def test_references_resolve_and_changed_training_is_refused(swept, tmp_path):
    base, _, workdir, _ = swept
    trained = grid_name(*GRID[0])

    def reuse(add, arg=None):
        add(name="evaluate", **{"stages.train": False, "eval.target_workdir": "run:source"})
        add(name="source", **{"model.n_layers": 1})
        add(name="again", **{"stages.train": False, "eval.target_workdir": "run:source"})
        add(name="changed", **{"model.d_model": 16})

    # "source" is a copy of a trained run; "changed" asks for another model in a trained workdir.
    shutil.copytree(os.path.join(workdir, trained), tmp_path / "source")
    shutil.copytree(os.path.join(workdir, trained), tmp_path / "changed")
    for name in ("source", "changed"):
        os.remove(tmp_path / name / sweep_runs.RESULT_FILE)
    results = sweep.run_sweep(base, sweep_runs.collect_runs(reuse), str(tmp_path), progress=False)
    status = {r["name"]: r for r in results}
    assert status["evaluate"]["status"] == "failed" and "comes later" in status["evaluate"]["error"]
    assert status["source"]["status"] == "ok" and "eval" in status["source"]
    assert status["again"]["status"] == "ok"
    assert status["again"]["eval"]["settings"]["target_workdir"] == str(tmp_path / "source")
    assert "train" not in status["again"]  # evaluation only
    assert status["changed"]["status"] == "failed"
    assert "model.d_model: 32 there, 16 here" in status["changed"]["error"]


# ------------------------------------------------------------------------------------- config handling


def test_apply_overrides_sets_dotted_keys_and_refuses_unknown_ones():
    config = tiny_base("unused")
    out = run_config.apply_overrides(config, {"model.n_layers": 1, "eval.methods.lookup.tree": "chain:5",
                                              "train": ml_collections.ConfigDict(dict(steps=9))})
    assert out.model.n_layers == 1 and out.eval.methods.lookup.tree == "chain:5" and out.train.to_dict() == {
        "steps": 9}
    assert config.model.n_layers == 2 and config.train.loss == "lm"  # the base is not touched
    with pytest.raises(ConfigError, match=r"model has no key 'n_layer'.*'n_layers'"):
        run_config.apply_overrides(config, {"model.n_layer": 1})
    with pytest.raises(ConfigError, match=r"model.d_model='big' does not fit"):
        run_config.apply_overrides(config, {"model.d_model": "big"})
    with pytest.raises(ConfigError, match="has no key 'x'"):
        run_config.apply_overrides(config, {"model.d_model.x": 1})


def test_run_names_and_declared_runs(tmp_path):
    assert sweep_runs.run_name({}) == "base"
    assert sweep_runs.run_name({"model.n_layers": 2, "eval.temperature": 0.5}) == "n_layers=2,temperature=0.5"
    assert sweep_runs.run_name({"model.d_model": 8, "medusa.d_model": 4}) == "model.d_model=8,medusa.d_model=4"
    assert sweep_runs.run_name({"eval.methods.x.tree": "branching:2,2"}) == "tree=branching_2,2"
    assert sweep_runs.run_name({"eval.methods.x.skip_layers": (1, 2)}) == "skip_layers=1-2"
    long = sweep_runs.run_name({f"k{i}": "v" * 20 for i in range(8)})
    assert len(long) <= 100 and long == sweep_runs.run_name({f"k{i}": "v" * 20 for i in range(8)})

    with pytest.raises(ValueError, match="two runs are named 'a'"):
        sweep_runs.collect_runs(lambda add, arg: [add(name="a"), add(name="a", **{"seed": 1})])
    with pytest.raises(ValueError, match="not a usable directory name"):
        sweep_runs.collect_runs(lambda add, arg: add(name="../up"))
    with pytest.raises(ValueError, match="declared no runs"):
        sweep_runs.collect_runs(lambda add, arg: None)

    path = tmp_path / "my_sweep.py"
    path.write_text("def get_config(arg=None):\n    return None\n\n"
                    "def sweep(add, arg=None):\n"
                    "    for k in arg.split('+'):\n        add(**{'eval.seed': int(k)})\n")
    assert [r.name for r in declared_runs(f"{path}:1+2")] == ["seed=1", "seed=2"]
    (tmp_path / "single.py").write_text("def get_config(arg=None):\n    return None\n")
    assert declared_runs(str(tmp_path / "single.py")) == [sweep_runs.Run("base", {})]


def test_validation_names_the_key():
    config = tiny_base("unused")
    run_config.validate_run_config(config)
    cases = {
        "top-level config key 'evals'": lambda c: c.update(dict(evals=1)),
        "eval.methods.lookup: method 'lookup' takes no argument 'trees'":
            lambda c: c.eval.methods.lookup.update(dict(trees="chain:2")),
        "eval.methods.x: unknown decoding method 'beam'": lambda c: c.eval.methods.update(dict(x=dict(method="beam"))),
        r"eval.methods.ar=": lambda c: c.eval.methods.update(dict(ar=dict(method="lookup"))),
        "eval.max_new_tokens=0": lambda c: c.eval.update(dict(max_new_tokens=0)),
        "the run does nothing": lambda c: c.stages.update(dict(train=False, eval=False)),
    }
    for message, change in cases.items():
        broken = run_config.apply_overrides(config, {})
        change(broken)
        with pytest.raises(ConfigError, match=message):
            run_config.validate_run_config(broken)
    with pytest.raises(ConfigError, match=r"plots\[0\].colour"):
        plots.validate_plot_specs([dict(x="a", y="b", colour="red")])
    with pytest.raises(ConfigError, match=r"plots\[0\].y=''"):
        plots.validate_plot_specs([dict(x="a")])


def test_references_name_the_problem():
    config = ml_collections.ConfigDict(dict(eval=dict(target_workdir="run:b", methods={})))
    order = ["a", "b", "c"]
    assert sweep_runs.resolve_references(config, {"b": "/w/b"}, order, "c").eval.target_workdir == "/w/b"
    for current, message in (("c", "did not finish"), ("a", "comes later")):
        with pytest.raises(ConfigError, match=f"eval.target_workdir='run:b': run 'b' {message}"):
            sweep_runs.resolve_references(config, {}, order, current)
    with pytest.raises(ConfigError, match="is not a run of this sweep"):
        sweep_runs.resolve_references(config, {}, ["a"], "a")
    assert sweep_runs.references(run_config.config_snapshot(config)) == ["b"]


@pytest.mark.parametrize("arg", ["", "tiny,methods=lookup+matformer"])
def test_quickstart_runs_are_valid_configs(arg):
    base = quickstart.get_config(arg)
    runs = sweep_runs.collect_runs(quickstart.sweep, arg)
    expected = ["target", "medusa", "draft", "compare"] if not arg else ["target", "compare"]
    assert [r.name for r in runs] == expected
    for run in runs:
        config = run_config.active_config(run_config.apply_overrides(base, run.overrides))
        run_config.validate_run_config(config)
        if run_config.will_train(config):
            trainer_sections = {k: config[k] for k in config if k not in run_config.SWEEP_KEYS}
            validate_config(ml_collections.ConfigDict(trainer_sections))
    compare = run_config.active_config(run_config.apply_overrides(base, runs[-1].overrides))
    assert "train" not in compare and compare.eval.target_workdir == "run:target"
    assert set(compare.eval.methods) == ({"draft", "medusa", "matformer", "layerskip", "lookup"} if not arg
                                         else {"lookup", "matformer"})
    with pytest.raises(ConfigError, match="methods='beam'"):
        quickstart.get_config("methods=beam")
