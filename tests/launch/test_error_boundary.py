"""The launch scripts' error boundary: bad input ends as one line and exit status 1; anything else (a bug, an
error from inside JAX) keeps its traceback.

The helper (`jaxspec.cli.user_errors`) is tested in this process. Each launch script is then run for real, as
`python -m launch.NAME` would run it, in a process of its own (forked from one that has imported the libraries)
that first replaces one library function its main calls early with one that fails: with an InputError (the
user's to fix), or with the ValueError that JAX itself raises for an impossible split (a stand-in for a shape
error deep inside a jit). Nothing compiles a model.
"""

from __future__ import annotations

import errno
import json
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

# One process imports the libraries the launch scripts use (about all of their start-up time), then forks a child per
# CASE, which runs launch.NAME as `python -m` does after replacing MODULE.ATTR with a function that fails as KIND
# says, and ends as the interpreter would: an uncaught exception prints its traceback (sys.excepthook) and exits 1,
# SystemExit exits with its code. The child's stdout, stderr and exit status go to files in its scratch directory.
# Nothing here starts a JAX backend before the fork (each child starts its own).
RUNNER = r"""
import errno, importlib, json, os, runpy, sys

cases = json.loads(sys.argv[1])
import jax.numpy  # noqa: F401
from jaxspec.errors import InputError
for name in sorted({case["module"] for case in cases}):
    importlib.import_module(name)


def fail(*args, **kwargs):
    kind = os.environ["KIND"]
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


def child(case):
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(os.path.join(case["tmp"], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.update(case["env"])
    setattr(importlib.import_module(case["module"]), case["attr"], fail)
    sys.argv = [case["script"], *case["argv"]]
    status = 0
    try:
        runpy.run_module(case["script"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_info:
        if exit_info.code is None or isinstance(exit_info.code, int):
            status = exit_info.code or 0
        else:
            print(exit_info.code, file=sys.stderr)
            status = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


running = {}


def reap():
    pid, status = os.wait()
    with open(os.path.join(running.pop(pid)["tmp"], "status"), "w") as fh:
        fh.write(str(os.waitstatus_to_exitcode(status)))


for case in cases:
    if len(running) == 2:  # two children at a time
        reap()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(case)
    running[pid] = case
while running:
    reap()
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory, subprocess_env):
    """(script, kind) -> (its finished run, its scratch directory), all from one RUNNER process: importing the
    libraries once rather than once per case saves most of this module's time."""
    cases = []
    for script, kind in CASES:
        module, attr, args = SCRIPTS[script]
        tmp = str(tmp_path_factory.mktemp(f"{script.split('.')[1]}_{kind}"))
        cases.append(dict(script=script, module=module, attr=attr, tmp=tmp, argv=[a.format(tmp=tmp) for a in args],
                          env=dict(KIND=kind, JAXSPEC_CACHE=os.path.join(tmp, "cache"),
                                   NAMED=os.path.join(tmp, "run"))))
    runner = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cases)], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert runner.returncode == 0, runner.stderr[-3000:]
    results = {}
    for (script, kind), case in zip(CASES, cases):
        def read(name, tmp=case["tmp"]):
            with open(os.path.join(tmp, name)) as fh:
                return fh.read()
        proc = subprocess.CompletedProcess(case["argv"], int(read("status")), read("stdout"), read("stderr"))
        results[script, kind] = (proc, case["tmp"])
    return results


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


def test_a_real_bad_input_end_to_end(tmp_path, subprocess_env):
    """No replacement: launch.convert of a directory without config.json."""
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--hf_dir={tmp_path}",
                           f"--workdir={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: Hugging Face checkpoint config: file "
                                   f"'{tmp_path / 'config.json'}' does not exist")
    assert not (tmp_path / "out").exists()


def test_input_error_is_the_one_type_the_boundary_reports():
    assert issubclass(ConfigError, InputError) and issubclass(InputError, ValueError)
