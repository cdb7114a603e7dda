"""Where a self-draft stops: SpecDec++'s learned acceptance head against the +2/-1 adaptive length and the
confidence stop, on the offline prompt suite, side by side in one run (SmolLM2-135M-Instruct by default).

  python -m launch.train_acceptance --data=/root/sd_smollm2 --method=layerskip --skip_layers=4,5,7,14,17,25 \\
      --out=/root/accept_skip6
  python -m benchmarks.stop_rules --skip_layers=4,5,7,14,17,25 --acceptance_head=/root/accept_skip6

Every row drafts with the same layer-skip drafter over the same chain; only the stop rule differs: none (the
whole chain every round), `adaptive` (+2 after a full accept, -1 otherwise), `confidence` (a branch stops below
the drafter's top probability) and `specdecpp` (SpecDec++) at each `--thresholds` (a branch stops once the
head's predicted P(at least one rejection) passes it). Each row: tau, tokens/s, speedup over autoregressive
decoding, identical output, per category and over all prompts (jaxspec.eval.suite_eval, as the quickstart).
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from configs import quickstart
from jaxspec import cli
from jaxspec.eval import suite_eval

FLAGS = flags.FLAGS


def stop_rule_methods(skip_layers: str, tree: str, head: str, thresholds, adaptive: int, confidence: float
                      ) -> dict:
    """name -> method row of the suite config: one layer-skip drafter, one chain, each stop rule (thresholds in
    names as percentages: config keys take no dots)."""
    base = dict(method="layerskip", skip_layers=cli.parse_index_list("skip_layers", skip_layers), tree=tree)
    grid = {"no_stop": dict(base), f"adaptive{adaptive}": dict(base, adaptive=adaptive),
            f"confidence{round(confidence * 100)}": dict(base, confidence_threshold=confidence)}
    for threshold in thresholds:
        grid[f"specdecpp{round(float(threshold) * 100)}"] = dict(base, acceptance_head=head,
                                                                  stop_threshold=float(threshold))
    return grid


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_string("skip_layers", "4,5,7,14,17,25", "the layer-skip drafter's skipped layers")
    flags.DEFINE_string("acceptance_head", None, "a head trained for that drafter (launch.train_acceptance)")
    flags.DEFINE_list("thresholds", ["0.3", "0.5", "0.7"], "SpecDec++ stop thresholds")
    flags.DEFINE_string("tree", "chain:4", "the chain every row drafts")
    flags.DEFINE_integer("adaptive", 2, "the adaptive row's starting length")
    flags.DEFINE_float("confidence", 0.5, "the confidence row's threshold")
    flags.DEFINE_integer("per_category", 2, "suite prompts per category")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens per prompt")
    flags.DEFINE_string("workdir", "/tmp/stop_rules", "where the tables and plots go")
    flags.mark_flags_as_required(["acceptance_head"])


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    from jaxspec.training import checkpoint

    head_config = checkpoint.load_config(FLAGS.acceptance_head)
    print("acceptance head:", json.dumps(json.loads(head_config.acceptance.metrics)["validation"]), flush=True)
    config = quickstart.get_config(f"model={FLAGS.model},per_category={FLAGS.per_category},"
                                   f"max_new_tokens={FLAGS.max_new_tokens}")
    config.methods = stop_rule_methods(FLAGS.skip_layers, FLAGS.tree, FLAGS.acceptance_head, FLAGS.thresholds,
                                       FLAGS.adaptive, FLAGS.confidence)
    start = time.perf_counter()
    report = suite_eval.evaluate_suite(config, FLAGS.workdir, on_method=lambda name: print(
        f"  {name} ({time.perf_counter() - start:.0f} s)", flush=True))
    print("\n" + suite_eval.table(report["rows"]) + "\n")
    print(f"{report['prompts']} prompts, greedy, max_new_tokens={FLAGS.max_new_tokens}; "
          f"wall time {(time.perf_counter() - start) / 60:.1f} min; results in {FLAGS.workdir}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
