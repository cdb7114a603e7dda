"""Early exit and layer skipping on a real target (SmolLM2-135M-Instruct by default), greedy, batch 1:

- ffnskip: the target with the FFN sub-blocks of its most input-preserving layers left out drafts for itself
  (lossless). The layers are ranked by the cosine similarity of each FFN's input and output residual streams on
  calibration text: the target's chat template around instructions built from the standard library (disjoint
  from the suite), and, for the method's default rule, the fixed random token ids `build` uses.
- skiplayers: unified layer skipping, ceil(n_layers / target speedup) layers spread evenly (lossy).
- kangaroo (with --kangaroo=WORKDIR): the target's first layers plus a trained adapter draft for it (lossless).
- skipdecode: each token runs the first exit(p) layers, exit(p) falling linearly with its position p from
  max_exit to min_exit over [--decay_start, --decay_end] (lossy). A constant schedule (max = min) shows what
  the per-layer gate costs (max = n_layers: nothing skipped) and what it saves (max = min < n_layers).

  python benchmarks/early_exit.py
  python benchmarks/early_exit.py --num_skip_ffn=4,8 --schedules=30:26,30:22 --per_category=2 \
      --output_json=/tmp/early_exit.json

Speed is measured side by side with `jaxspec.eval.compare.compare_methods` (autoregressive decoding in the same
run; speedup = AR wall time / the method's), and again over --rounds round-robin passes of every method (best
wall time each), which spreads a shared machine's load changes over all methods. For every method the table
also gives the agreement with AR (the share of AR's tokens matched before the first difference, mean over the
prompts) and the target's mean log-likelihood of the method's output tokens (teacher-forced; AR's own is the
reference row).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from jaxspec import cli

FLAGS = flags.FLAGS
COLUMNS = ["method", "fields", "lossless", "tau", "tok/s", "speedup", "speedup round-robin", "identical", "agreement",
           "target loglik"]


def calibration_text(tokenizer, n: int, max_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n, T], mask [n, T]): n standard-library instructions through the chat template, right-padded."""
    from jaxspec.training import instructions, selfdistill

    # The "docs" set: the calibration the figures in docs/benchmarks.md were measured with.
    chats = instructions.instruction_prompts(n, max_chars=max_chars, prompt_set="docs")
    texts = [selfdistill.encode_messages(tokenizer, m) for m in chats]
    width = max(map(len, texts))
    tokens, mask = np.zeros((n, width), np.int32), np.zeros((n, width), bool)
    for i, seq in enumerate(texts):
        tokens[i, :len(seq)], mask[i, :len(seq)] = seq, True
    return tokens, mask


def method_specs(model, params, similarity, counts, schedules, decay_start: int, decay_end: int,
                 target_speedups=()) -> dict:
    """name -> spec: ffnskip with the `counts` most similar FFNs (by `similarity`) and with its default rule,
    skipdecode with each (max_exit, min_exit) of `schedules`, and skiplayers (unified layer skipping) at each
    of `target_speedups`."""
    from jaxspec.decoding import methods
    from jaxspec.decoding.methods import ffnskip

    specs = {}
    for count in counts:
        specs[f"ffnskip {count} (text)"] = methods.make(
            "ffnskip", skip_ffn=ffnskip.most_similar_ffns(similarity, count))
    default = ffnskip.calibrated_skip_ffn(model, params, max(1, model.model_cfg.n_layers // 5))
    specs[f"ffnskip {len(default)} (default)"] = methods.make("ffnskip", skip_ffn=default)
    for max_exit, min_exit in schedules:
        specs[f"skipdecode {max_exit}->{min_exit}"] = methods.make(
            "skipdecode", max_exit=max_exit, min_exit=min_exit, decay_start=decay_start, decay_end=decay_end)
    for speedup in target_speedups:
        specs[f"skiplayers {speedup:g}x"] = methods.make("skiplayers", target_speedup=float(speedup))
    return specs


def measure(lm, prompts, specs: dict, max_new_tokens: int, rounds: int = 2) -> list[dict]:
    """One row per method (AR first): compare_methods' speed side by side; then `rounds` round-robin passes of
    every method over the prompts (the executables compare_methods compiled), whose best wall times give a second
    speedup that shares the machine's load changes between methods; agreement and log-likelihood of the output."""
    from jaxspec.decoding import api, engine
    from jaxspec.eval.compare import compare_methods
    from jaxspec.eval.quality import mean_log_likelihood

    eos = lm.tokenizer.eos_ids
    results = compare_methods(lm.model, lm.params, prompts, specs, max_new_tokens=max_new_tokens, eos_ids=eos,
                              batch_size=1, on_method=lambda name: print(f"  {name} ...", flush=True))
    nodes = max([1] + [spec.num_nodes for spec in specs.values()])
    width, _ = engine.plan_shapes(lm.model.model_cfg, [max(map(len, prompts))], max_new_tokens, nodes)
    every = {"ar": "ar", **specs}
    best_wall, tokens = {}, {}
    for _ in range(max(rounds, 1)):
        for name, spec in every.items():
            runs = [api.generate(lm.model, lm.params, [p], method=spec, max_new_tokens=max_new_tokens, eos_ids=eos,
                                 prompt_width=width) for p in prompts]
            best_wall[name] = min(best_wall.get(name, np.inf), sum(r.wall_time_s for r in runs))
            tokens[name] = [r.tokens[0] for r in runs]
    rows = []
    for result in results:
        spec = every[result.name]
        defaults = {} if isinstance(spec, str) else type(spec)().fields()  # show only the fields set
        fields = "" if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in spec.fields().items()
                                                           if v != defaults[k])
        rows.append({"method": result.name, "fields": fields, "lossless": result.lossless, "tau": result.tau,
                     "tok/s": result.tokens_per_s, "speedup": result.speedup,
                     "speedup round-robin": best_wall["ar"] / best_wall[result.name], "identical": result.identical,
                     "agreement": result.agreement,
                     "target loglik": mean_log_likelihood(lm.model, lm.params, prompts, tokens[result.name])})
    return rows


def parse_schedules(text: str) -> list[tuple[int, int]]:
    """"30:26,30:22" -> [(30, 26), (30, 22)] (max_exit:min_exit)."""
    from jaxspec.errors import InputError

    pairs = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InputError(f"--schedules entry {item!r} is not max_exit:min_exit (two integers)")
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_list("num_skip_ffn", ["4", "6", "10"], "FFN-skip drafts: FFNs left out, by real-text calibration")
    flags.DEFINE_string("schedules", "30:30,30:26,30:22,15:15", "skipdecode max_exit:min_exit pairs")
    flags.DEFINE_list("target_speedups", ["1.25", "1.5"], "skiplayers (unified layer skipping) target speedups")
    flags.DEFINE_string("kangaroo", "", "a Kangaroo adapter run (launch.train_kangaroo) for the target: adds a "
                        "kangaroo row ('': none)")
    flags.DEFINE_integer("decay_start", 0, "skipdecode: position where the exit starts to fall")
    flags.DEFINE_integer("decay_end", 256, "skipdecode: position where the exit reaches min_exit")
    flags.DEFINE_integer("calibration_prompts", 8, "standard-library instructions for the FFN calibration")
    flags.DEFINE_integer("per_category", 1, "suite prompts per category")
    flags.DEFINE_integer("max_new_tokens", 48, "reply tokens per prompt")
    flags.DEFINE_integer("rounds", 2, "round-robin timing passes of every method (best wall time kept)")
    flags.DEFINE_string("output_json", None, "write the similarities and the table here")


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    from jaxspec.decoding import api, methods
    from jaxspec.decoding.methods import ffnskip
    from jaxspec.eval import suite_eval, tables
    from jaxspec.eval.suite import load_suite

    start = time.perf_counter()
    lm = api.load(FLAGS.model)
    tokens, mask = calibration_text(lm.tokenizer, FLAGS.calibration_prompts, max_chars=160)
    similarity = ffnskip.ffn_similarity(*ffnskip.ffn_residual_streams(lm.model, lm.params, tokens), mask)
    print("FFN input/output cosine similarity per layer (calibration text):\n"
          + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(similarity)) + "\n", flush=True)
    specs = method_specs(lm.model, lm.params, similarity, [int(c) for c in FLAGS.num_skip_ffn],
                         parse_schedules(FLAGS.schedules), FLAGS.decay_start, FLAGS.decay_end,
                         [float(x) for x in FLAGS.target_speedups])
    if FLAGS.kangaroo:  # lossless self-drafting: the target's first layers plus a trained adapter
        specs["kangaroo"] = methods.make("kangaroo", draft_workdir=FLAGS.kangaroo)
    prompts = suite_eval.encode_suite(lm.tokenizer, load_suite(per_category=FLAGS.per_category))
    print(f"{len(prompts)} suite prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
          f"max_new_tokens={FLAGS.max_new_tokens}, greedy, batch 1", flush=True)
    rows = measure(lm, prompts, specs, FLAGS.max_new_tokens, FLAGS.rounds)
    print("\n" + tables.markdown_table(rows, COLUMNS) + "\n")
    print(f"wall time {(time.perf_counter() - start) / 60:.1f} min, load average {os.getloadavg()[0]:.1f} (a "
          "shared machine: compare speed ratios, not tokens/s)", flush=True)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"similarity": similarity.tolist(), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    define_flags()
    app.run(main)
