"""Op-level profile of the autoregressive decode step: where a step's time goes, op by op.

  python -m benchmarks.step_profile --model=smollm2-135m-instruct
  python -m benchmarks.step_profile --model=smollm2-135m-instruct --weight_dtype=int8 --top=20

Runs the engine's `autoregressive_loop` on the decode layout under `jax.profiler` (a Perfetto trace: XLA's CPU
runtime records every executed thunk, a fusion or a library product, with its duration), and joins each traced
op with its instruction in the compiled HLO: its module path (the `op_name` metadata, layer index dropped, so
the 30 layers' copies of an op add up), or, for a product without metadata, its operand shapes. Ops that run
once per decode step are those the trace holds at least `new_tokens - 1` times; the prefill's run once.

Prints, per op group: thunks and milliseconds per step, the share of the step, and the bytes its operands hold
over its time (for a weight product, the rate at which it streams the weights). Then the sum of the step's
ops beside the step measured without the profiler (the profiler slows each op a little), and the profiled
call's wall time beside the sum of all its ops: the remainder is time between ops (the runtime's dispatch and
thread-pool hand-offs), which no op accounts for.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from jaxspec.decoding import api, engine
from jaxspec.models.decode_layout import for_decoding
from jaxspec.models.lm import reconfigured

FLAGS = flags.FLAGS
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "s32": 4, "u32": 4, "pred": 1, "s64": 8}


def define_flags() -> None:
    flags.DEFINE_string("model", "smollm2-135m-instruct", "zoo model name or workdir")
    flags.DEFINE_enum("weight_dtype", "float32", ["float32", "int8"], "decode-layout weights")
    flags.DEFINE_integer("prompt_tokens", 160, "prompt length (synthetic ids)")
    flags.DEFINE_integer("new_tokens", 32, "tokens decoded in the profiled call")
    flags.DEFINE_integer("rounds", 5, "timed calls (without the profiler) for the measured step")
    flags.DEFINE_integer("top", 16, "op groups listed (the rest are summed in one row)")
    flags.DEFINE_string("trace_dir", None, "keep the trace here (default: a temporary directory)")
    flags.DEFINE_bool("scan_layers", False, "profile the scanned layer stack (model.scan_layers)")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO array shape 'f32[576,3072]{1,0}' (0 for tuples and tokens)."""
    match = re.match(r"(\w+)\[([\d,]*)\]", shape)
    if not match or match.group(1) not in DTYPE_BYTES:
        return 0
    return DTYPE_BYTES[match.group(1)] * int(np.prod([int(d) for d in match.group(2).split(",") if d]))


def parse_hlo(text: str) -> dict:
    """{instruction name: (shape, opcode, operand names, op_name)} of every instruction in an HLO module."""
    out = {}
    for line in text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)", line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        op_name = re.search(r'op_name="([^"]*)"', line)
        out[name] = (shape, opcode, operands, op_name.group(1) if op_name else "")
    return out


def group_of(name: str, hlo: dict) -> str:
    """A traced op's group: its module path without the layer index and the primitive, or, for an op without
    metadata, its opcode and operand shapes."""
    shape, opcode, operands, op_name = hlo[name]
    if op_name:
        path = op_name.split("/while/body/", 1)[-1]
        path = re.sub(r"layer_\d+/", "", path)
        path = re.sub(r"^jit\([^)]*\)/", "", path)
        parts = path.split("/")
        module_path = "/".join(p for p in parts[:-1] if not p.startswith("DecoderLM"))
        return f"{module_path or 'DecoderLM'}: {parts[-1]} ({opcode})"
    shapes = " x ".join(hlo[o][0].split("{")[0] for o in operands if o in hlo)
    return f"{opcode} {shapes} -> {shape.split('{')[0]}"


def read_trace(trace_dir: str) -> list[dict]:
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: did the profiler run?")
    with gzip.open(sorted(files)[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def op_table(events: list[dict], hlo: dict, steps: int) -> dict:
    """{group: [thunks, microseconds, operand bytes]} summed over the ops that run in every decode step."""
    per_op = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e["name"] in hlo:
            per_op[e["name"]][0] += 1
            per_op[e["name"]][1] += e.get("dur", 0.0)
    groups = collections.defaultdict(lambda: [0, 0.0, 0])
    for name, (count, micros) in per_op.items():
        if count < steps:  # the prefill's and the loop's set-up
            continue
        _, _, operands, _ = hlo[name]
        row = groups[group_of(name, hlo)]
        row[0] += count
        row[1] += micros
        row[2] += count * sum(shape_bytes(hlo[o][0]) for o in operands if o in hlo)
    return groups


def ar_executables(model, params, prompt: list[int], new_tokens: int) -> tuple[dict, dict]:
    """({new_tokens: executable, 1: executable}, their arguments): the AR loop compiled for a run of
    `new_tokens` and for the prefill and first token alone, each run once."""
    width, max_len = engine.plan_shapes(model.model_cfg, [len(prompt)], new_tokens, 1)
    tokens, lens = engine.pad_prompts([prompt], width=width)
    dynamic = dict(params=params, prompts=tokens, prompt_lens=lens, key=jax.random.key(0))
    executables = {}
    for count in (new_tokens, 1):
        statics = dict(model=model, max_new=count, max_len=max_len, sampling=engine.Sampling(), eos_ids=(),
                       stream=False)
        executables[count] = engine.autoregressive_loop.lower(**dynamic, **statics).compile()
        jax.block_until_ready(executables[count](**dynamic))
    return executables, dynamic


def profiled_run(executable, dynamic: dict, trace_dir: str) -> tuple[dict, list[dict], float]:
    """(HLO instructions, traced op events, wall ms) of one call of `executable` under the profiler."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        jax.block_until_ready(executable(**dynamic))
        wall_ms = (time.perf_counter() - start) * 1e3
    hlo = parse_hlo(executable.as_text())
    return hlo, [e for e in read_trace(trace_dir) if e["name"] in hlo], wall_ms


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    lm = api.load(FLAGS.model)
    model = reconfigured(lm.model, weight_dtype=FLAGS.weight_dtype, scan_layers=FLAGS.scan_layers)
    model, params = for_decoding(model, lm.params)
    prompt = [(7919 * i) % model.model_cfg.vocab_size for i in range(FLAGS.prompt_tokens)]
    executables, dynamic = ar_executables(model, params, prompt, FLAGS.new_tokens)
    max_len = engine.plan_shapes(model.model_cfg, [len(prompt)], FLAGS.new_tokens, 1)[1]
    walls = {count: [] for count in executables}
    for _ in range(FLAGS.rounds):
        for count, exe in executables.items():
            start = time.perf_counter()
            jax.block_until_ready(exe(**dynamic))
            walls[count].append(time.perf_counter() - start)
    steps = FLAGS.new_tokens - 1
    step_ms = (min(walls[FLAGS.new_tokens]) - min(walls[1])) / steps * 1e3

    trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="step_profile_")
    hlo, events, profiled_ms = profiled_run(executables[FLAGS.new_tokens], dynamic, trace_dir)
    groups = op_table(events, hlo, steps)
    traced = [e.get("dur", 0.0) for e in events]

    total_us = sum(row[1] for row in groups.values())
    print(f"# step_profile: {FLAGS.model}, decode layout, {FLAGS.weight_dtype} weights, "
          f"{'scanned' if FLAGS.scan_layers else 'unrolled'} stack, prompt "
          f"{FLAGS.prompt_tokens}, {FLAGS.new_tokens} new tokens (state {max_len}); {os.cpu_count()} CPUs, "
          f"jax {jax.__version__}; trace in {trace_dir}\n")
    print("| op group (module path: primitive (opcode), or opcode operand shapes) | thunks/step | ms/step | "
          "share of ops | operand GB/s |")
    print("|---|---:|---:|---:|---:|")
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])
    rest = [0, 0.0, 0]
    for i, (group, (count, micros, nbytes)) in enumerate(ranked):
        if i >= FLAGS.top:
            rest = [a + b for a, b in zip(rest, (count, micros, nbytes))]
            continue
        rate = nbytes / (micros * 1e3) if micros else 0.0
        print(f"| {group} | {count / steps:.0f} | {micros / steps / 1e3:.2f} | {micros / total_us:.1%} | "
              f"{rate:.1f} |")
    if rest[0]:
        print(f"| {len(ranked) - FLAGS.top} other groups | {rest[0] / steps:.0f} | {rest[1] / steps / 1e3:.2f} | "
              f"{rest[1] / total_us:.1%} | {rest[2] / (rest[1] * 1e3) if rest[1] else 0:.1f} |")
    ops_ms = total_us / steps / 1e3
    thunks = sum(row[0] for row in groups.values()) / steps
    print(f"\nper step: {ops_ms:.2f} ms in {thunks:.0f} thunks (profiled); measured without the profiler: "
          f"{step_ms:.2f} ms ({1e3 / step_ms:.1f} tok/s; min over {FLAGS.rounds} calls of {FLAGS.new_tokens} "
          f"tokens, less those of 1 token).")
    between = profiled_ms - sum(traced) / 1e3
    print(f"the profiled call: {profiled_ms:.0f} ms wall, {sum(traced) / 1e3:.0f} ms in its {len(traced)} ops; "
          f"between ops {between:.0f} ms ({between / profiled_ms:.0%}, {between / len(traced) * 1e3:.1f} us per "
          "op).")

if __name__ == "__main__":
    define_flags()
    app.run(main)
