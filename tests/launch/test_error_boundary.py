"""The launch scripts' error boundary: bad input ends as one line and exit status 1; anything else (a bug, an
error from inside JAX) keeps its traceback.

The helper (`jaxspec.cli.user_errors`) is tested in this process. Each launch script is then run for real, as
`python -m launch.NAME` would run it, in a subprocess that first replaces one library function its main calls
early with one that fails: with an InputError (the user's to fix), or with the ValueError that JAX itself raises
for an impossible split (a stand-in for a shape error deep inside a jit). Nothing compiles a model.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import subprocess
import sys

import pytest
from absl import flags

from jaxspec import cli
from jaxspec.config import ConfigError
from jaxspec.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------- the helper


def test_an_input_error_is_one_line_and_exit_status_1(capsys):
    with pytest.raises(SystemExit) as exit_info, cli.user_errors():
        raise ConfigError("config.train.steps=0 is not allowed: a positive integer")
    assert exit_info.value.code == cli.INPUT_ERROR_STATUS == 1
    assert capsys.readouterr().err == "error: config.train.steps=0 is not allowed: a positive integer\n"


@pytest.mark.parametrize("error", [ValueError("dot_general requires contracting dimensions to have the same "
                                              "shape, got (3,) and (4,)"),
                                   TypeError("add got incompatible shapes for broadcasting: (3,), (4,)"),
                                   KeyError("params"), RuntimeError("XLA ran out of memory")])
def test_any_other_error_propagates_unchanged(error, capsys):
    with pytest.raises(type(error)) as raised, cli.user_errors({"workdir": "/tmp"}):
        raise error
    assert raised.value is error
    assert capsys.readouterr().err == ""


def test_an_os_error_is_the_users_only_for_a_file_they_named(tmp_path, capsys):
    run = str(tmp_path / "run")
    named = {"workdir": run}
    inside = FileNotFoundError(errno.ENOENT, "No such file or directory", os.path.join(run, "checkpoints", "3"))
    with pytest.raises(SystemExit), cli.user_errors(named):
        raise inside
    line = capsys.readouterr().err
    assert line == f"error: --workdir={run}: {inside}\n" and os.path.join(run, "checkpoints", "3") in line
    exactly = PermissionError(errno.EACCES, "Permission denied", run)
    assert cli.user_error_message(exactly, named) == f"--workdir={run}: {exactly}"
    # A sibling whose name merely starts like the named path, another file, or no file at all: not the user's.
    for other in (FileNotFoundError(errno.ENOENT, "No such file or directory", run + "2/x"),
                  FileNotFoundError(errno.ENOENT, "No such file or directory", "/usr/lib/libcuda.so"),
                  OSError(errno.ENOMEM, "Cannot allocate memory")):
        assert cli.user_error_message(other, named) is None
        with pytest.raises(OSError) as raised, cli.user_errors(named):
            raise other
        assert raised.value is other
    # The second file of a rename counts too.
    renamed = OSError(errno.EXDEV, "Invalid cross-device link", "/elsewhere/tmp", None, os.path.join(run, "x"))
    assert cli.user_error_message(renamed, named) is not None


def test_flag_paths_reads_given_string_flags():
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    flags.DEFINE_string("output_json", None, "", flag_values=values)
    flags.DEFINE_integer("steps", 3, "", flag_values=values)
    values(["prog", "--workdir=/data/run"])
    assert cli.flag_paths(["workdir", "output_json", "steps", "absent"], values) == {"workdir": "/data/run"}


# ------------------------------------------------------------------------------------------ every launch script

# Runs launch.NAME as `python -m` does, after replacing MODULE.ATTR with a function that fails as KIND says.
RUNNER = r"""
import errno, importlib, os, runpy, sys
from jaxspec.errors import InputError

script, module, attr, kind, *argv = sys.argv[1:]

def fail(*args, **kwargs):
    if kind == "input":
        raise InputError("config.planted=3 is not allowed: a planted input error")
    if kind == "jax":
        import jax.numpy as jnp
        jnp.split(jnp.ones(3), 2)  # raises JAX's own ValueError
    if kind == "oserror_named":
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.path.join(os.environ["NAMED"], "x"))
    if kind == "oserror_other":
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nonexistent-library-file.so")
    raise AssertionError(kind)

setattr(importlib.import_module(module), attr, fail)
sys.argv = [script, *argv]
runpy.run_module(script, run_name="__main__", alter_sys=True)
"""

# script -> (module, attribute its main calls early, arguments; {tmp} is a fresh directory)
SCRIPTS = {
    "launch.train": ("jaxspec.training.trainer", "prepare_config",
                     ["--config=configs/lm.py:tiny", "--workdir={tmp}/run"]),
    "launch.decode": ("jaxspec.decoding.api", "load",
                      ["--workdir={tmp}", "--prompt=x", "--compilation_cache_dir="]),
    "launch.sweep": ("jaxspec.eval.sweep", "run_sweep",
                     ["--config=configs/sweeps/draft_length.py:size=tiny", "--workdir={tmp}/sweep"]),
    "launch.quickstart": ("jaxspec.eval.suite_eval", "evaluate_suite",
                          ["--workdir={tmp}/quickstart", "--compilation_cache_dir=", "--noprogress"]),
    "launch.selfdistill": ("jaxspec.training.selfdistill", "run",
                           ["--config=configs/selfdistill.py:small", "--out={tmp}/set", "--compilation_cache_dir="]),
    "launch.convert": ("jaxspec.interop.workdir", "import_checkpoint", ["--hf_dir={tmp}", "--workdir={tmp}/out"]),
    "launch.skip_search": ("jaxspec.decoding.api", "load", ["--model={tmp}"]),
    "launch.train_acceptance": ("jaxspec.decoding.api", "load", ["--model={tmp}", "--data={tmp}", "--out={tmp}/h"]),
    "launch.train_kangaroo": ("jaxspec.decoding.api", "load",
                              ["--config=configs/kangaroo.py", "--config.data={tmp}", "--workdir={tmp}/k"]),
}
LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch")


def test_every_launch_script_is_covered():
    names = [name for name in os.listdir(LAUNCH_DIR) if name.endswith(".py") and name != "__init__.py"]
    scripts = {f"launch.{name[:-3]}" for name in names}
    assert scripts == set(SCRIPTS)


CASES = [(script, kind) for script in SCRIPTS for kind in ("input", "jax")] + [
    ("launch.train", "oserror_named"), ("launch.train", "oserror_other")]


def _run(script: str, kind: str, tmp: str) -> subprocess.CompletedProcess:
    module, attr, args = SCRIPTS[script]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXSPEC_CACHE=os.path.join(tmp, "cache"),
               NAMED=os.path.join(tmp, "run"), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [a.format(tmp=tmp) for a in args]
    return subprocess.run([sys.executable, "-c", RUNNER, script, module, attr, kind, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(script, kind) -> its finished process; the runs go two at a time (imports dominate, and CI has 2 cores)."""
    tmps = {case: str(tmp_path_factory.mktemp(f"{case[0].split('.')[1]}_{case[1]}")) for case in CASES}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(_run, *case, tmps[case]) for case in CASES}
        return {case: (future.result(), tmps[case]) for case, future in futures.items()}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_an_input_error_inside_main_is_one_line_without_traceback(runs, script):
    proc, _ = runs[script, "input"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: config.planted=3 is not allowed: a planted input error"], proc.stderr[-3000:]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_an_error_from_inside_jax_keeps_its_traceback(runs, script):
    proc, _ = runs[script, "jax"]
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    assert "ValueError: array split does not result in an equal division" in proc.stderr, proc.stderr[-3000:]
    assert "error: " not in proc.stderr.splitlines()[-1]


def test_an_os_error_about_the_named_workdir_is_one_line_and_any_other_keeps_its_traceback(runs):
    proc, tmp = runs["launch.train", "oserror_named"]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    run = os.path.join(tmp, "run")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --workdir={run}: [Errno 2] No such file or directory: '{os.path.join(run, 'x')}'")
    proc, _ = runs["launch.train", "oserror_other"]
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert "FileNotFoundError" in proc.stderr and "/nonexistent-library-file.so" in proc.stderr


def test_a_real_bad_input_end_to_end(tmp_path):
    """No replacement: launch.convert of a directory without config.json."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--hf_dir={tmp_path}",
                           f"--workdir={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: Hugging Face checkpoint config: file "
                                   f"'{tmp_path / 'config.json'}' does not exist")
    assert not (tmp_path / "out").exists()


def test_input_error_is_the_one_type_the_boundary_reports():
    assert issubclass(ConfigError, InputError) and issubclass(InputError, ValueError)
