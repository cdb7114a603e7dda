"""Where a method's whole decode calls spend their time, by kind of op, on each layer stack.

  python -m benchmarks.loop_profile --methods=lookup --stacks=unrolled,scanned
  python -m benchmarks.loop_profile --methods=ar,recycling --prompts=6 --top=12

For each stack and method: `api.generate` on the first `--prompts` suite prompts (padded to the whole suite's
width, as the quickstart decodes them) once to compile and warm, then once more under `jax.profiler`. The traced
ops are summed by kind: an HLO instruction's name without its number (`ffi_call` for the CPU kernels, `dot` for
XLA's products, `copy`, a fusion's kind, and the control flow, `while` and `cond`, whose events hold the ops they
run). The wall time of the profiled calls sits beside them. A loop's step as a whole is measured by
benchmarks/step_profile.py (the AR step, op by op) and benchmarks/loop_rounds.py (the round inside the loop).
"""

from __future__ import annotations

import collections
import re
import tempfile
import time

import jax
from absl import app, flags

from benchmarks.loop_rounds import STACKS, on_stacks, suite_width
from benchmarks.step_profile import read_trace
from jaxspec import cli

FLAGS = flags.FLAGS


def op_kind(event_name: str) -> str:
    """'fusion.12' -> 'fusion', 'copy_bitcast_fusion.3' -> 'copy_bitcast_fusion', 'ffi_call' -> 'ffi_call'."""
    return re.sub(r"(\.\d+)+$", "", event_name)


def profile_calls(lm, prompts: list[list[int]], fields: dict, max_new_tokens: int, prompt_width: int,
                  trace_dir: str) -> tuple[float, dict, list]:
    """(wall ms of the profiled calls, {op kind: [events, ms]}, the calls' results): one warm call per prompt, then
    one call per prompt under the profiler."""
    from jaxspec.decoding import api

    run = lambda prompt: api.generate(lm.model, lm.params, [prompt], max_new_tokens=max_new_tokens,
                                      prompt_width=prompt_width, eos_ids=lm.tokenizer.eos_ids, **fields)
    for prompt in prompts:
        run(prompt)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        outs = [run(prompt) for prompt in prompts]
        wall_ms = (time.perf_counter() - start) * 1e3
    kinds = collections.defaultdict(lambda: [0, 0.0])
    for event in read_trace(trace_dir):
        if event.get("cat") == "python" or event["name"].startswith("$"):  # Python frames, not ops
            continue
        row = kinds[op_kind(event["name"])]
        row[0] += 1
        row[1] += event.get("dur", 0.0) / 1e3
    return wall_ms, dict(kinds), outs


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_list("methods", ["lookup"], "quickstart methods (configs/quickstart.py), or ar")
    flags.DEFINE_list("stacks", list(STACKS), f"the target's layer stacks, of {STACKS}")
    flags.DEFINE_integer("prompts", 3, "suite prompts (the first of each category, in order)")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens per call")
    flags.DEFINE_integer("top", 16, "op kinds listed per (stack, method), by time")


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    from configs import quickstart
    from jaxspec.decoding import api
    from jaxspec.errors import InputError
    from jaxspec.eval.suite import load_suite
    from jaxspec.eval.suite_eval import encode_suite

    config = quickstart.get_config(f"model={FLAGS.model}")
    methods = {"ar": {"method": "ar"}, **{name: dict(spec) for name, spec in config.methods.items()}}
    unknown = sorted(set(FLAGS.methods) - set(methods))
    if unknown:
        raise InputError(f"--methods: {unknown} are not quickstart methods; choose from {sorted(methods)}")
    lm = api.load(FLAGS.model)
    stacks = on_stacks(lm, FLAGS.stacks)
    prompts = encode_suite(lm.tokenizer, load_suite(None, 1))[:FLAGS.prompts]
    width = suite_width(lm, FLAGS.max_new_tokens)
    for stack, on_stack in stacks:
        for name in FLAGS.methods:
            wall_ms, kinds, outs = profile_calls(on_stack, prompts, methods[name], FLAGS.max_new_tokens, width,
                                                 tempfile.mkdtemp(prefix="loop_profile_"))
            taus = ", ".join(f"{float(out.mean_accepted[0]):.2f}" for out in outs)
            print(f"\n## {stack} stack, {name}: {len(prompts)} calls, {wall_ms:.0f} ms wall (tau {taus})\n")
            print("| op kind | events | ms |\n|---|---:|---:|")
            for kind, (count, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:FLAGS.top]:
                print(f"| {kind} | {count} | {ms:.1f} |")


if __name__ == "__main__":
    define_flags()
    app.run(main)
