"""Running a sweep: each run trains and/or evaluates in its own sub-workdir, in order; results become tables
and plots.

The runs come from the config's ``sweep(add, arg)`` (``sweep_runs.py``), each run's config from the base
config and its overrides (``run_config.py``), and its work from its stages (``run_stages.py``).

Every run leaves ``result.json`` (status, config, metrics, error) in its directory. A re-run of the sweep
skips a run whose result says it finished with the same config (and whose referenced runs did not run
again since); any other run runs again: its training resumes from its checkpoint, and a finished training
is not repeated. A failing run is recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Mapping, Sequence

from tqdm import tqdm

from jaxspec.eval import plots, run_config, run_stages, sweep_runs, tables

ERROR_FILE = "error.txt"


def _jsonable(value):
    """Plain JSON data of an override value (a ConfigDict section becomes a dict, tuples lists)."""
    return json.loads(json.dumps(value, default=lambda v: v.to_dict() if hasattr(v, "to_dict") else str(v)))


def run_one(base_config, run: sweep_runs.Run, workdir: str, finished: Mapping[str, tuple[str, float]],
            order: Sequence[str], progress: bool = True) -> dict:
    """Run (or skip) one run; its result dict, also written to `<workdir>/<name>/result.json`."""
    run_dir = os.path.join(workdir, run.name)
    previous = sweep_runs.read_result(run_dir)
    result = dict(name=run.name, overrides=_jsonable(run.overrides), status="failed")
    start = time.perf_counter()
    try:
        config = run_config.apply_overrides(base_config, run.overrides)
        run_config.validate_run_config(config)
        config = run_config.active_config(config)
        snapshot = run_config.config_snapshot(config)
        depends_on = {name: finished[name][1] for name in sweep_runs.references(snapshot) if name in finished}
        result.update(config=snapshot, depends_on=depends_on)
        if (previous is not None and previous.get("status") == "ok" and previous.get("config") == snapshot
                and previous.get("depends_on") == depends_on):
            return {**previous, "skipped": True}
        resolved = sweep_runs.resolve_references(config, {k: v[0] for k, v in finished.items()}, order, run.name)
        result.update(run_stages.execute_run(resolved, run_dir, progress))
        result.update(status="ok", finished_at=time.time())
    except Exception as err:  # a failing run is recorded, and the sweep goes on
        result["error"] = f"{type(err).__name__}: {err}"
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, ERROR_FILE), "w") as fh:
            fh.write(traceback.format_exc())
    result["seconds"] = time.perf_counter() - start
    os.makedirs(run_dir, exist_ok=True)
    sweep_runs.write_json(os.path.join(run_dir, sweep_runs.RESULT_FILE), result)
    return result


def run_sweep(base_config, runs: Sequence[sweep_runs.Run], workdir: str, *, progress: bool = True) -> list[dict]:
    """Run `runs` in order under `workdir`, then write results.csv, results.md and the plots there."""
    base_config = run_config.unlocked_copy(base_config)
    plot_specs = base_config.get("plots", ())
    if "plots" in base_config:
        del base_config["plots"]  # sweep level: not part of any run's config
    plots.validate_plot_specs(plot_specs)  # a typo in a plot fails now, not after the runs
    os.makedirs(workdir, exist_ok=True)
    order = [run.name for run in runs]
    finished: dict[str, tuple[str, float]] = {}
    results = []
    bar = tqdm(runs, desc="sweep", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.name)
        result = run_one(base_config, run, workdir, finished, order, progress)
        if result["status"] == "ok":
            finished[run.name] = (os.path.join(workdir, run.name), result["finished_at"])
        else:
            tqdm.write(f"run {run.name} failed: {result['error']}")
        results.append(result)
    bar.close()
    rows = tables.result_rows(results)
    tables.write_tables(rows, workdir)
    plots.write_plots(results, rows, workdir, plot_specs)
    return results
