"""A trained EAGLE drafter on the offline prompt suite: static chains and EAGLE-2 dynamic trees of several sizes
against autoregressive decoding, side by side in one run (SmolLM2-135M-Instruct by default).

  python -m launch.quickstart --arg=drafters                     # or the README's self-distill + train commands
  python -m benchmarks.eagle_trees --drafter=~/.cache/jaxspec/drafters/smollm2-135m-instruct/eagle
  python -m benchmarks.eagle_trees --drafter=/tmp/eagle --chains=2,3,4 --dynamic=4:4:6,4:5:8 --per_category=3

Each row: tau (tokens per target forward), tokens/s, speedup over autoregressive decoding and whether the output
is identical to it, per category and over all prompts (jaxspec.eval.suite_eval, as the quickstart).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from configs import quickstart
from jaxspec import cli
from jaxspec.eval import suite_eval

_DRAFTER = flags.DEFINE_string("drafter", None, "an EAGLE drafter's training workdir")
_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
_CHAINS = flags.DEFINE_list("chains", ["2", "3", "4", "5"], "static chain lengths")
_DYNAMIC = flags.DEFINE_list("dynamic", ["4:4:6", "4:5:8", "6:6:12"], "dynamic trees, expand:depth:nodes")
_PER_CATEGORY = flags.DEFINE_integer("per_category", 3, "suite prompts per category")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens per prompt")
_LOOKUP = flags.DEFINE_bool("lookup", True, "also prompt lookup on a 4-draft chain (the best training-free row)")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/eagle_trees", "where the tables and plots go")
flags.mark_flags_as_required(["drafter"])


def eagle_methods(drafter: str, chains, dynamic) -> dict:
    grid = {f"eagle_chain{k}": dict(method="eagle", draft_workdir=drafter, tree=f"chain:{k}") for k in chains}
    for spec in dynamic:
        expand, depth, nodes = (int(x) for x in spec.split(":"))
        grid[f"eagle2_{expand}x{depth}n{nodes}"] = dict(method="eagle", draft_workdir=drafter, expand=expand,
                                                       depth=depth, nodes=nodes)
    return grid


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    config = quickstart.get_config(f"model={_MODEL.value},per_category={_PER_CATEGORY.value},"
                                   f"max_new_tokens={_MAX_NEW.value}")
    lookup = config.methods.lookup
    config.methods = eagle_methods(os.path.abspath(os.path.expanduser(_DRAFTER.value)), _CHAINS.value,
                                   _DYNAMIC.value)
    if _LOOKUP.value:
        config.methods.lookup = lookup
    start = time.perf_counter()
    report = suite_eval.evaluate_suite(config, _WORKDIR.value,
                                       on_method=lambda name: print(f"  {name} ({time.perf_counter() - start:.0f} s)",
                                                                    flush=True))
    print("\n" + suite_eval.table(report["rows"]) + "\n")
    print(f"{report['prompts']} prompts, greedy, max_new_tokens={_MAX_NEW.value}; "
          f"wall time {(time.perf_counter() - start) / 60:.1f} min; results in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
