"""What a round costs inside the decode loop, per method, beside the autoregressive step of the same run.

  python -m benchmarks.loop_rounds --model=smollm2-135m-instruct --methods=lookup,recycling --per_category=1
  python -m benchmarks.loop_rounds --methods=lookup --eagle=/tmp/eagle          # also EAGLE on a 2-draft chain
  python -m benchmarks.loop_rounds --methods=lookup --stacks=unrolled,scanned   # both layer stacks, one run

For each suite prompt (padded to the whole suite's width, as the quickstart decodes it) and method, the wall time of
`api.generate` with `max_new_tokens` minus that with one new token (the prefill and the first token), divided
by the rounds the run took (new tokens after the first over tau): the round's whole cost in the compiled loop,
its drafting, verification, commit and the loop's own work included, which a forward timed alone does not
show. Each time is the best of `--repeats` calls after one warm call. Methods are the quickstart's (by name).
`--stacks` runs the target's layers unrolled, scanned (`model.scan_layers`) or both, one stack after the other, the
AR row of each stack its own yardstick.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

from jaxspec import cli

FLAGS = flags.FLAGS
COLUMNS = ["stack", "prompt", "tokens", "method", "tau", "prefill ms", "round ms", "round / AR step"]
STACKS = ("unrolled", "scanned")


def on_stacks(lm, stacks: list[str]):
    """(stack, `lm` with its target's layers on that stack) per name in `stacks` (of STACKS; a bad name raises
    InputError). Same params, same tokens."""
    from jaxspec.errors import InputError
    from jaxspec.models.lm import reconfigured

    if not stacks or set(stacks) - set(STACKS):
        raise InputError(f"--stacks={','.join(stacks)}: expected some of {STACKS}")
    return [(stack, dataclasses.replace(lm, model=reconfigured(lm.model, scan_layers=stack == "scanned")))
            for stack in stacks]


def suite_width(lm, max_new_tokens: int) -> int:
    """The prompt width the whole suite pads to, as the quickstart's comparison decodes it: one compile per
    method."""
    from jaxspec.decoding import engine
    from jaxspec.eval.suite import load_suite
    from jaxspec.eval.suite_eval import encode_suite

    longest = max(map(len, encode_suite(lm.tokenizer, load_suite())))
    return engine.plan_shapes(lm.model.model_cfg, [longest], max_new_tokens, 1)[0]


def best_wall(lm, prompt: list[int], new_tokens: int, repeats: int, fields: dict, prompt_width: int):
    """(best wall seconds of `repeats` calls after a warm one, the last call's output)."""
    from jaxspec.decoding import api

    run = lambda: api.generate(lm.model, lm.params, [prompt], max_new_tokens=new_tokens, prompt_width=prompt_width,
                               eos_ids=lm.tokenizer.eos_ids, **fields)
    run()
    outs = [run() for _ in range(repeats)]
    return min(o.wall_time_s for o in outs), outs[-1]


def measure(lm, prompts: dict, methods: dict, max_new_tokens: int, repeats: int, prompt_width: int) -> list[dict]:
    """Rows per (prompt, method): tau, the prefill (+ first token) in ms, the round in ms and over the AR step of
    the same prompt. `prompts`: name -> token ids; `methods`: name -> generate's fields ("ar" is added)."""
    rows = []
    for prompt_name, prompt in prompts.items():
        ar_round = None
        for name, fields in {"ar": {"method": "ar"}, **methods}.items():
            prefill_s, _ = best_wall(lm, prompt, 1, repeats, fields, prompt_width)
            full_s, out = best_wall(lm, prompt, max_new_tokens, repeats, fields, prompt_width)
            tau = float(out.mean_accepted[0])
            rounds = max(int(out.new_tokens[0]) - 1, 1) / tau
            round_ms = max(full_s - prefill_s, 0.0) / rounds * 1e3
            ar_round = round_ms if name == "ar" else ar_round
            rows.append({"prompt": prompt_name, "tokens": len(prompt), "method": name, "tau": tau,
                         "prefill ms": prefill_s * 1e3, "round ms": round_ms,
                         "round / AR step": round_ms / ar_round if ar_round > 0 else float("nan")})
    return rows


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_list("methods", ["lookup", "ngram", "recycling"], "quickstart methods (configs/quickstart.py)")
    flags.DEFINE_string("eagle", None, "also an EAGLE drafter run on a 2-draft chain")
    flags.DEFINE_integer("per_category", 1, "suite prompts per category")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens per timed run")
    flags.DEFINE_integer("repeats", 3, "timed calls per (prompt, method, length); the best is kept")
    flags.DEFINE_list("stacks", ["unrolled"], f"the target's layer stacks measured, of {STACKS}")


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    from configs import quickstart
    from jaxspec.decoding import api
    from jaxspec.errors import InputError
    from jaxspec.eval import tables
    from jaxspec.eval.suite import load_suite
    from jaxspec.eval.suite_eval import encode_suite

    config = quickstart.get_config(f"model={FLAGS.model}")
    unknown = sorted(set(FLAGS.methods) - set(config.methods))
    if unknown:
        raise InputError(f"--methods: {unknown} are not quickstart methods; choose from {sorted(config.methods)}")
    methods = {name: dict(config.methods[name]) for name in FLAGS.methods}
    if FLAGS.eagle:
        methods["eagle chain:2"] = dict(method="eagle", draft_workdir=FLAGS.eagle, tree="chain:2")
    lm = api.load(FLAGS.model)
    stacks = on_stacks(lm, FLAGS.stacks)
    suite = load_suite(None, FLAGS.per_category)
    encoded = encode_suite(lm.tokenizer, suite)
    prompts = {p.id: ids for p, ids in zip(suite, encoded)}
    width = suite_width(lm, FLAGS.max_new_tokens)
    rows = [{"stack": stack, **row} for stack, on_stack in stacks
            for row in measure(on_stack, prompts, methods, FLAGS.max_new_tokens, FLAGS.repeats, width)]
    print(f"# loop_rounds: {FLAGS.model}, {len(prompts)} prompts at width {width}, {FLAGS.max_new_tokens} new "
          f"tokens, best of {FLAGS.repeats}")
    print(tables.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    define_flags()
    app.run(main)
