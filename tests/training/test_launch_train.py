"""launch/train.py end to end, and the config checks that run before any compute."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest
from test_trainer import REPO, write_corpus

from configs import draft, eagle, hydra, lm, matformer, medusa
from jaxspec.config import ConfigError
from jaxspec.training.train_config import train_defaults, validate_config
from jaxspec.training.trainer import prepare_config, read_metrics


def run_launch(subprocess_env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


TINY_FLAGS = ("--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
              "--config.model.n_kv_heads=1", "--config.model.d_ff=64", "--config.data.seq_len=32",
              "--config.data.batch_size=4", "--config.data.val_fraction=0.2", "--config.data.max_bytes=30000",
              "--config.train.steps=2", "--config.train.warmup_steps=1", "--config.train.log_every=1",
              "--config.train.eval_batches=1", "--config.train.progress_bar=False")


def test_launch_trains_end_to_end(tmp_path, subprocess_env):
    corpus = write_corpus(tmp_path / "corpus", num_docs=12)
    workdir = str(tmp_path / "run")
    proc = run_launch(subprocess_env, "--config=configs/lm.py:tiny", f"--workdir={workdir}",
                      f"--config.data.source={corpus}", *TINY_FLAGS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parameters: trainable" in proc.stdout and "d_model: 32" in proc.stdout  # the resolved config
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2] and "val_bpb" in records[-1]
    with open(os.path.join(workdir, "config.json")) as fh:
        assert json.load(fh)["model"]["d_model"] == 32
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


def test_launch_rejects_a_bad_value_before_compute(tmp_path, subprocess_env):
    proc = run_launch(subprocess_env, "--config=configs/lm.py:tiny", f"--workdir={tmp_path / 'run'}",
                      "--config.train.warmup_steps=-3")
    assert proc.returncode != 0
    assert "train.warmup_steps=-3" in proc.stderr and "non-negative integer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("override, named", [
    ("--config.data.pth=x", "--config.data.pth: configs/lm.py:tiny has no key config.data.pth; keys of config.data: "),
    ("--config.trian.steps=3", "has no key config.trian; did you mean train?"),
    ("--config.model.d_model.x=3", "config.model.d_model is a value, not a section"),
])
def test_an_override_of_a_missing_key_is_one_line_naming_it(tmp_path, override, named, subprocess_env):
    proc = run_launch(subprocess_env, "--config=configs/lm.py:tiny", f"--workdir={tmp_path / 'run'}", override)
    assert proc.returncode != 0
    assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "run")


def lm_config():
    return lm.get_config("tiny")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: setattr(c.train, "loss", "mse"), r"train.loss='mse'.*one of \('lm'"),
        (lambda c: setattr(c.train, "steps", 0), r"train.steps=0.*positive integer"),
        (lambda c: setattr(c.train, "learning_rate", -1.0), r"train.learning_rate=-1.0"),
        (lambda c: setattr(c.train, "warmup_steps", 300), r"train.warmup_steps=300.*decay horizon"),
        (lambda c: setattr(c.train, "b2", 1.0), r"train.b2=1.0.*\[0, 1\)"),
        (lambda c: setattr(c.train, "distill_alpha", 1.5), r"train.distill_alpha=1.5"),
        (lambda c: setattr(c.train, "medusa_decay", 0.0), r"train.medusa_decay=0.0"),
        (lambda c: setattr(c.train, "eval_every", -1), r"train.eval_every=-1.*non-negative"),
        (lambda c: setattr(c.train, "matformer_weights", (-1.0,)), r"train.matformer_weights=\(-1.0,\)"),
        (lambda c: setattr(c.train, "matformer_weights", (1.0, 2.0)), r"train.matformer_weights=\(1.0, 2.0\)"),
        (lambda c: setattr(c.train, "early_exit_layers", (3,)), r"train.early_exit_layers=\(3,\).*0..2"),
        (lambda c: setattr(c.train, "loss", "matformer"), r"model.matformer_fractions=\(1.0,\).*two"),
        (lambda c: setattr(c.train, "learning_rat", 1.0), r"unknown config key train.learning_rat; did you mean "
                                                            r"learning_rate"),
        (lambda c: c.data.update(dict(sequence_len=8)), r"unknown config key data.sequence_len; did you mean seq_len"),
        (lambda c: c.mesh.update(dict(sequense=2)), r"unknown config key mesh.sequense; did you mean sequence"),
        (lambda c: setattr(c.train, "loss", "medusa"), r"config.target_workdir=''.*medusa"),
        (lambda c: setattr(c.train, "distill_alpha", 0.5) or setattr(c.train, "loss", "distill"),
         r"config.target_workdir=''.*distill_alpha=0.5"),
        (lambda c: setattr(c.data, "seq_len", 0), r"data.seq_len=0"),
        (lambda c: setattr(c.mesh, "data", 3), r"config.mesh"),
        (lambda c: setattr(c.model, "n_kv_heads", 3), r"model.n_kv_heads=3"),
    ],
)
def test_bad_config_values_are_named(edit, match):
    config = lm_config()
    edit(config)
    with pytest.raises(ValueError, match=match):
        validate_config(config)


@pytest.mark.parametrize("module, section, reach, why", [
    (medusa, "medusa", 4, r"medusa.num_heads=4 \(head k is scored k\+1 tokens ahead\)"),
    (hydra, "hydra", 4, r"hydra.num_heads=4 \(head k is scored k\+1 tokens ahead\)"),
    (eagle, "eagle", 3, r"eagle.unroll \+ 1 = 3 \(depth s guesses s \+ 1 tokens ahead\)"),
])
def test_a_drafter_run_needs_its_section_and_windows_longer_than_its_reach(module, section, reach, why):
    config = module.get_config()
    config.target_workdir = "target"
    config.data.seq_len = reach
    with pytest.raises(ConfigError, match=rf"config.data.seq_len={reach} is not allowed: more than {why}"):
        validate_config(config)
    del config[section]
    article = "an" if section == "eagle" else "a"
    with pytest.raises(ConfigError, match=rf"train.loss='{section}' needs {article} `{section}` section "
                                          rf"\(see configs/{section}.py\)"):
        validate_config(config)


def test_medusa_and_draft_configs(tmp_path):
    config = medusa.get_config("heads=3,layers=2")
    with pytest.raises(ConfigError, match="target_workdir"):
        validate_config(config)
    config.target_workdir = str(tmp_path / "target")
    validate_config(config)
    assert (config.medusa.num_heads, config.medusa.num_layers, config.train.loss) == (3, 2, "medusa")
    config.medusa.num_heads = 0
    with pytest.raises(ConfigError, match="medusa.num_heads=0"):
        validate_config(config)
    config.medusa.num_heads = 3
    config.medusa.draft_vocab = -1
    with pytest.raises(ConfigError, match=r"medusa.draft_vocab=-1.*non-negative integer"):
        validate_config(config)
    config.medusa.draft_vocab = config.model.vocab_size + 1
    with pytest.raises(ConfigError, match=r"medusa.draft_vocab=\d+.*at most the target's model.vocab_size"):
        validate_config(config)
    config.medusa.draft_vocab = 64  # a draft vocabulary is made of the target's replies, which a corpus lacks
    with pytest.raises(ConfigError, match=r"medusa.draft_vocab=64.*0 when the heads train on corpus text.*"
                                          r"self-distillation set"):
        validate_config(config)

    d = draft.get_config("micro")
    assert d.model.d_model < lm.get_config("tiny").model.d_model and d.train.loss == "distill"
    d.train.distill_alpha = 0.0  # plain LM training needs no target
    validate_config(d)
    with pytest.raises(ConfigError, match="size='huge'"):
        draft.get_config("huge")
    m = matformer.get_config("tiny")
    m.train.loss = "matformer"
    validate_config(m)


def write_target_config(workdir, vocab_size=264, tokenizer="bytes"):
    """A target workdir's config.json (what prepare_config reads; no checkpoint needed for the checks)."""
    target = lm_config()
    target.model.vocab_size, target.data.tokenizer = vocab_size, tokenizer
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as fh:
        fh.write(target.to_json_best_effort())
    return str(workdir)


def test_targets_must_share_vocabulary_and_tokenizer(tmp_path):
    heads = medusa.get_config("heads=2")
    heads.target_workdir = write_target_config(tmp_path / "target")
    heads.model.d_model = 999  # replaced: the heads sit on the target's model
    assert prepare_config(heads).model.d_model == 128

    for name, kwargs, match in [("vocab", dict(vocab_size=512), "vocab_size=264 differs from the target's 512"),
                                ("tok", dict(tokenizer="tok.json"), "tokenizer='bytes' differs")]:
        d = draft.get_config("micro")
        d.target_workdir = write_target_config(tmp_path / name, **kwargs)
        with pytest.raises(ConfigError, match=match):
            prepare_config(d)
    d = draft.get_config("micro")
    d.target_workdir = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no config.json"):
        prepare_config(d)


def test_prepare_config_fills_left_out_train_keys_then_validates():
    config = lm_config()
    config.train = ml_collections.ConfigDict({"steps": 5})
    with pytest.raises(ConfigError, match="train.warmup_steps=100"):  # the default warmup outlasts 5 steps
        prepare_config(config)
    config.train.warmup_steps = 1
    prepared = prepare_config(config)
    assert prepared.train.steps == 5 and prepared.train.to_dict().keys() == train_defaults().to_dict().keys()
    assert config.train.to_dict() == {"steps": 5, "warmup_steps": 1}  # the caller's config is not changed


def test_a_zoo_name_as_target_is_its_converted_workdir(tmp_path, monkeypatch):
    from jaxspec import zoo

    target = write_target_config(tmp_path / "target")
    asked = []
    monkeypatch.setattr(zoo, "model_workdir", lambda name, cache_dir=None: asked.append(name) or target)
    heads = medusa.get_config("heads=2")
    heads.target_workdir = "smollm2-135m-instruct"
    prepared = prepare_config(heads)
    assert asked == ["smollm2-135m-instruct"] and prepared.target_workdir == target
    assert prepared.model.d_model == 128  # the target's model, read from its workdir
