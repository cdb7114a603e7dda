"""Self-drafting over the target's own cache on a real target (SmolLM2-135M-Instruct by default), greedy, batch 1:

- layerskip: the target with a fixed skip set drafts with a cache of its own, caught up every round.
- swift, search_rounds=0: the same skip set drafting over the target's cache (`gated_draft`, no cache of its own).
- del: exit layer and draft length chosen each round from acceptance measured while decoding.
- swift: the skip set searched while decoding, at each of --skip_ratios: candidates scored by trial rounds of
  drafting, and (each of --context_windows W) on the last W committed tokens, as SWIFT's paper does.

Each skip set of --skip_sets (default: layerskip's default, and the 6-layer set the calibration search found,
docs/benchmarks.md "Layer-skip sets by search") gets a layerskip row and an over-the-target's-cache row.

  python benchmarks/adaptive_self_draft.py --output_json=/tmp/adaptive.json

`--carry_search=N` adds a row per swift method whose search carries over from prompt to prompt (SWIFT's
optimisation phase over the first N requests, then its best set), timed beside AR in the same run.

Speed is measured side by side with `jaxspec.eval.compare.compare_methods` (AR in the same run; speedup = AR wall
time / the method's), and again over --rounds round-robin passes of every method over the prompts (best wall
time each), which spreads a shared machine's load changes over all methods. "identical": every reply equals AR's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import numpy as np
from absl import app, flags

from jaxspec import cli

FLAGS = flags.FLAGS
COLUMNS = ["method", "fields", "tau", "tok/s", "speedup", "speedup round-robin", "identical"]


def parse_skip_sets(text: str) -> list[tuple[int, ...]]:
    """"default;4,5,7" -> [(), (4, 5, 7)] (() is layerskip's default set)."""
    return [() if s.strip() == "default" else cli.parse_index_list("skip_sets", s) for s in text.split(";") if s]


def method_specs(n_layers: int, skip_sets, skip_ratios, search_rounds: int, tree: str,
                 context_windows=()) -> dict:
    """name -> spec: per skip set, layerskip and the same set over the target's cache; del; swift per ratio,
    scored by trial rounds and, per context window W, on the last W tokens."""
    from jaxspec.decoding import methods
    from jaxspec.decoding.methods.layerskip import default_skip_layers

    specs = {}
    for skip in skip_sets:
        label = "default" if not skip else ",".join(map(str, skip))
        skip = tuple(skip) or default_skip_layers(n_layers)
        specs[f"layerskip {label}"] = methods.make("layerskip", skip_layers=skip, tree=tree)
        specs[f"over target cache {label}"] = methods.make("swift", skip_layers=skip, search_rounds=0, tree=tree)
    specs["del"] = methods.make("del", tree=tree)
    for ratio in map(float, skip_ratios):
        specs[f"swift {ratio:g}"] = methods.make("swift", skip_ratio=ratio, search_rounds=search_rounds,
                                                 tree=tree)
        for window in map(int, context_windows):
            specs[f"swift {ratio:g} context {window}"] = methods.make(
                "swift", skip_ratio=ratio, search_rounds=search_rounds, tree=tree, context_window=window)
    return specs


def measure(model, params, prompts, specs: dict, max_new_tokens: int, eos_ids, rounds: int) -> list[dict]:
    """One row per method (AR first): compare_methods' side-by-side speed, then `rounds` round-robin passes."""
    from jaxspec.decoding import api, engine
    from jaxspec.eval.compare import compare_methods

    results = compare_methods(model, params, prompts, specs, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                              batch_size=1, on_method=lambda name: print(f"  {name} ...", flush=True))
    every = {"ar": "ar", **specs}
    nodes = max([1] + [spec.num_nodes for spec in specs.values()])
    width, _ = engine.plan_shapes(model.model_cfg, [max(map(len, prompts))], max_new_tokens, nodes)
    best_wall = {}
    for _ in range(rounds):
        for name, spec in every.items():
            walls = [api.generate(model, params, [p], method=spec, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                  prompt_width=width).wall_time_s for p in prompts]
            best_wall[name] = min(best_wall.get(name, np.inf), sum(walls))
    rows = []
    for result in results:
        spec = every[result.name]
        fields = "" if isinstance(spec, str) else ",".join(
            f"{k}={v}" for k, v in spec.fields().items() if v != type(spec)().fields()[k])
        rows.append({"method": result.name, "fields": fields, "tau": result.tau, "tok/s": result.tokens_per_s,
                     "speedup": result.speedup, "identical": result.identical,
                     "speedup round-robin": best_wall["ar"] / best_wall[result.name] if rounds else float("nan")})
    return rows


def carried_search(model, params, prompts, specs: dict, search_prompts: int, max_new_tokens: int, eos_ids
                   ) -> list[dict]:
    """SWIFT's search carried across requests, one row per swift spec beside AR (same prompts, same run): the
    prompts are decoded in order, each starting from the best set the one before found; the first
    `search_prompts` search, the rest draft with the best set (search_rounds=0). Compile time is excluded (a new
    first set is a new static spec)."""
    from jaxspec.decoding import api, engine
    from jaxspec.decoding.methods.swift import searched_skip_layers

    nodes = max([1] + [spec.num_nodes for spec in specs.values()])
    width, _ = engine.plan_shapes(model.model_cfg, [max(map(len, prompts))], max_new_tokens, nodes)
    run = functools.partial(api.generate, model, params, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                            prompt_width=width)
    ar = [run([p]) for p in prompts]
    ar_wall = sum(out.wall_time_s for out in ar)
    rows = []
    for name, spec in specs.items():
        if spec.name != "swift" or not spec.search_rounds:
            continue
        outs, skip = [], spec.skip_layers
        for i, prompt in enumerate(prompts):
            step = dataclasses.replace(spec, skip_layers=skip, search_rounds=spec.search_rounds if i < search_prompts
                                       else 0)
            outs.append(run([prompt], method=step))
            skip = searched_skip_layers(outs[-1])[0]
        wall = sum(out.wall_time_s for out in outs)
        rows.append({"method": f"{name}, carried", "fields": f"search on the first {search_prompts}, then {skip}",
                     "tau": sum(int(o.accepted.sum()) for o in outs) / sum(int(o.target_steps.sum()) for o in outs),
                     "tok/s": sum(int(o.new_tokens.sum()) for o in outs) / wall, "speedup": ar_wall / wall,
                     "identical": all(o.tokens == a.tokens for o, a in zip(outs, ar, strict=True)),
                     "speedup round-robin": float("nan")})
    return rows


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_string("skip_sets", "default;4,5,7,14,17,25", "';'-separated skip sets ('default': layerskip's)")
    flags.DEFINE_list("skip_ratios", ["0.2", "0.45"], "swift: skip ratios searched")
    flags.DEFINE_integer("search_rounds", 32, "swift: rounds of the skip-set search per prompt")
    flags.DEFINE_list("context_windows", [], "swift: also score candidates on the last W committed tokens, per W")
    flags.DEFINE_integer("carry_search", 0, "swift: also a row per swift method whose search carries over from "
                         "prompt to prompt, searching on the first N prompts only (0: none)")
    flags.DEFINE_string("tree", "chain:3", "the tree every method drafts")
    flags.DEFINE_integer("per_category", 1, "suite prompts per category")
    flags.DEFINE_integer("max_new_tokens", 48, "reply tokens per prompt")
    flags.DEFINE_integer("rounds", 1, "round-robin timing passes of every method (best wall time kept)")
    flags.DEFINE_string("output_json", None, "write the table here")


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    from jaxspec.decoding import api
    from jaxspec.eval import suite_eval, tables
    from jaxspec.eval.suite import load_suite

    start = time.perf_counter()
    lm = api.load(FLAGS.model)
    specs = method_specs(lm.model.model_cfg.n_layers, parse_skip_sets(FLAGS.skip_sets), FLAGS.skip_ratios,
                         FLAGS.search_rounds, FLAGS.tree, FLAGS.context_windows)
    prompts = suite_eval.encode_suite(lm.tokenizer, load_suite(per_category=FLAGS.per_category))
    print(f"{len(prompts)} suite prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
          f"max_new_tokens={FLAGS.max_new_tokens}, greedy, batch 1", flush=True)
    rows = measure(lm.model, lm.params, prompts, specs, FLAGS.max_new_tokens, lm.tokenizer.eos_ids, FLAGS.rounds)
    if FLAGS.carry_search:
        rows += carried_search(lm.model, lm.params, prompts, specs, FLAGS.carry_search, FLAGS.max_new_tokens,
                               lm.tokenizer.eos_ids)
    print("\n" + tables.markdown_table(rows, COLUMNS) + "\n")
    print(f"wall time {(time.perf_counter() - start) / 60:.1f} min, load average {os.getloadavg()[0]:.1f} (a "
          "shared machine: compare speed ratios, not tokens/s)", flush=True)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    define_flags()
    app.run(main)
