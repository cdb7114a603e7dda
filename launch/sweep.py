"""Run the sweep a config file declares, then write results.csv, results.md and plots into the workdir.

  python -m launch.sweep --config=configs/sweeps/draft_length.py --workdir=/tmp/sweep
  python -m launch.sweep --config=configs/sweeps/temperature.py:size=small --workdir=/tmp/temp \
      --config.eval.num_prompts=8

The config module's `get_config(arg)` is the base of every run (with the --config.key=value overrides);
its `sweep(add, arg)` declares the runs (a module without one is a sweep of one run). Each run works in
`<workdir>/<run name>/`; running the command again skips finished runs and resumes the others.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxspec import cli
from jaxspec.errors import InputError
from jaxspec.eval import sweep, sweep_runs, tables

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file with sweep(add, arg), e.g. "
                                          "configs/sweeps/draft_length.py:size=tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the sweep's directory: one sub-directory per run, results")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress bars over runs, training steps and methods")
flags.mark_flags_as_required(["config", "workdir"])


def load_module(path: str):
    """The Python module of a config file path."""
    if not os.path.isfile(path):
        raise InputError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"sweep_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared_runs(config_spec: str) -> list[sweep_runs.Run]:
    """The runs of "path/to/config.py[:arg]": its sweep(add, arg), or one run of the base config."""
    path, _, arg = config_spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "sweep"):
        return [sweep_runs.Run("base", {})]
    return sweep_runs.collect_runs(module.sweep, arg or None)


@cli.error_boundary("workdir")
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # checkpointing logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    runs = declared_runs(config_flags.get_config_filename(flags.FLAGS["config"]))
    results = sweep.run_sweep(_CONFIG.value, runs, _WORKDIR.value, progress=_PROGRESS.value)
    with open(os.path.join(_WORKDIR.value, tables.RESULTS_MD)) as fh:
        print(fh.read())
    failed = [r["name"] for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(failed)}/{len(results)} runs ok; results in {_WORKDIR.value}")
    if failed:
        sys.exit(f"failed runs: {', '.join(failed)} (see their result.json and error.txt)")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_config_flags)
