"""launch.decode end to end on a saved tiny model: JSON fields, method equality, clear errors before compute."""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import lm
from jaxspec.models.lm import build_model, init_params
from jaxspec.training.checkpoint import CheckpointManager

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def save_run(workdir, config, params):
    with CheckpointManager(workdir) as manager:
        manager.save(0, {"params": params}, {}, config, force=True)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    config = lm.get_config("tiny")
    config.model.update(dict(n_layers=2, d_model=32, d_ff=64, max_len=96, matformer_fractions=(0.5, 1.0)))
    workdir = str(tmp_path_factory.mktemp("target"))
    save_run(workdir, config, init_params(build_model(config.model), jax.random.key(0)))
    return workdir


def decode(*args):
    return subprocess.run([sys.executable, "-m", "launch.decode", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_decode_writes_results_and_speculation_matches_autoregressive(target_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):\\n    return x"}\n{"prompt": "import os"}\n')
    outputs = {}
    runs = {"ar": ("ar", []), "matformer": ("matformer", ["--granularity=0"]),
            "lookup": ("lookup", ["--tree=chain:4"]), "lookup, scanned layers": ("lookup", ["--tree=chain:4",
                                                                                           "--scan_layers"])}
    for label, (method, extra) in runs.items():
        out = tmp_path / f"{len(outputs)}.json"
        proc = decode(f"--workdir={target_dir}", f"--method={method}", f"--prompts_file={prompts}",
                      "--max_new_tokens=12", f"--output_json={out}", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[label] = json.loads(out.read_text())
        assert outputs[label]["settings"]["method"] == method
        assert outputs[label]["settings"]["scan_layers"] == ("--scan_layers" in extra)
    for data in outputs.values():
        rows = data["results"]
        assert len(rows) == 2
        for row in rows:
            assert set(row) >= {"text", "tokens", "new_tokens", "target_steps", "mean_accepted", "wall_time_s",
                                "tokens_per_s"}
            assert row["new_tokens"] == len(row["tokens"]) <= 12
        assert [r["tokens"] for r in rows] == [r["tokens"] for r in outputs["ar"]["results"]]
    # Three samples of the second prompt, its prefix shared: greedy, each is autoregressive decoding's reply.
    out = tmp_path / "shared.json"
    proc = decode(f"--workdir={target_dir}", "--method=lookup", "--prompt=import os", "--samples=3",
                  "--shared_prefix", "--max_new_tokens=12", f"--output_json={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    shared = json.loads(out.read_text())["results"]
    assert [r["tokens"] for r in shared] == [outputs["ar"]["results"][1]["tokens"]] * 3


@pytest.mark.parametrize("args, message", [
    (["--method=draft", "--prompt=x"], "needs a draft model: draft_workdir (--draft_workdir"),
    (["--method=lookup", "--prompt=x", "--granularity=0"], "--granularity does not apply to --method=lookup"),
    (["--method=layerskip", "--prompt=x", "--skip_layers=20-x"], "--skip_layers='20-x': '20-x' is not an index"),
    (["--method=layerskip", "--prompt=x", "--skip_layers=9"], "skip_layers entry 9 is not a layer index"),
    (["--prompt=x", "--chat"], "has no chat template"),
    (["--method=ar", "--prompt=" + "x" * 200], "max_len"),
    (["--method=lookup", "--prompt=x", "--tree=chain:0x"], "tree spec"),
    (["--method=ar", "--prompt=x", "--verify=greedy", "--temperature=-1"], "temperature"),
    (["--method=beam", "--prompt=x"], "method"),
    (["--method=skiplayers", "--prompt=x", "--require_lossless"], "method 'skiplayers' is lossy"),
    (["--method=lookup", "--prompt=x", "--verify=typical", "--require_lossless"], "rule='typical' is lossy"),
    (["--prompt=x", "--samples=0"], "--samples=0 must be at least 1"),
])
def test_bad_requests_exit_with_a_clear_message(target_dir, args, message):
    proc = decode(f"--workdir={target_dir}", *args)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_medusa_heads_of_another_target_are_refused(target_dir, tmp_path):
    from jaxspec.models.heads import MedusaHeads
    from jaxspec.training.train_config import medusa_defaults

    config = lm.get_config("tiny")
    config.model.update(dict(n_layers=2, d_model=32, d_ff=64, max_len=96))
    config.medusa = medusa_defaults()
    config.medusa.num_heads = 2
    config.target_workdir = str(tmp_path / "some_other_target")
    config.train.loss = "medusa"
    heads = MedusaHeads(2, 32, config.model.vocab_size)
    params = heads.init(jax.random.key(0), jax.numpy.zeros((1, 1, 32)))["params"]
    save_run(str(tmp_path / "medusa"), config, params)
    proc = decode(f"--workdir={target_dir}", "--method=medusa", f"--draft_workdir={tmp_path / 'medusa'}", "--prompt=x")
    assert proc.returncode != 0 and "another target" in proc.stderr


def test_every_method_field_has_a_flag():
    """A method's fields reach the command line: each is a flag of launch.decode (one per name, shared by the
    methods that take it), so adding a method with a new field means adding its flag. In a fresh process: the
    script's absl flags would clash with other modules' flags of this test process."""
    check = ("from jaxspec.decoding import methods\n"
             "from launch import decode\n"
             "for name in methods.names():\n"
             "    missing = sorted(set(methods.field_names(name)) - set(decode._METHOD_FLAGS))\n"
             "    assert not missing, f'method {name!r}: fields {missing} have no launch.decode flag'\n")
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
