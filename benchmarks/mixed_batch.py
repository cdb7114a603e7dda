"""Chunked prefill in mixed batches (Sarathi-Serve's stall-free batching) against prefilling first, on a real
model (SmolLM2-135M-Instruct by default): a long request arrives while other rows decode.

  python -m benchmarks.mixed_batch
  python -m benchmarks.mixed_batch --chunks=256,128,64 --long_tokens=1000 --max_new=48 --rounds=2 \
      --output_json=/tmp/mixed_batch.json

The workload (`jaxspec/decoding/mixed_batch.py` serves it): --slots rows; the --slots - 1 shortest suite prompts
(chat template) arrive at iteration 0; one long request (suite texts joined into one summarisation request of about
--long_tokens tokens) arrives at iteration --long_arrival, when the short ones are decoding. Every request
decodes --max_new greedy tokens (stop ids ignored unless --stop_at_eos, so every schedule does the same work).

Schedules: "prefill first" (every prompt in one forward as wide as the longest, decoding rows waiting) and
"chunked C" for each --chunks (prompts fed C tokens per iteration, decoding rows carried in the same forward).
Per schedule: the long request's time to first token, the short requests' worst and median inter-token gap
(the worst is the stall the long prefill causes), generated tokens per second of the whole run, iterations,
and whether every request's tokens equal the prefill-first run's (and, with --check_ar, those of
`api.generate(method="ar")` of the prompt alone). Figures are medians over --rounds round-robin rounds, so
every schedule sees the same machine load; compilation is excluded (each forward width compiles once).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from jaxspec import cli
from jaxspec.errors import InputError

FLAGS = flags.FLAGS
COLUMNS = ("schedule", "long TTFT ms", "worst gap ms", "median gap ms", "tokens/s", "iterations", "same tokens")


def long_request_ids(tokenizer, texts, min_tokens: int) -> list[int]:
    """A chat prompt asking to summarise `texts` joined, with as many of them (cycled) as it takes to reach
    `min_tokens` tokens."""
    parts: list[str] = []
    while True:
        parts.append(texts[len(parts) % len(texts)])
        content = "Summarize the following notes in five sentences.\n\n" + "\n\n".join(parts)
        ids = tokenizer.encode_chat([{"role": "user", "content": content}])
        if len(ids) >= min_tokens:
            return ids


def workload(short_prompts, long_prompt, long_arrival: int):
    """The requests: the short prompts at iteration 0, then the long one at `long_arrival` (last)."""
    from jaxspec.decoding.mixed_batch import Request

    return [Request(tuple(p), 0) for p in short_prompts] + [Request(tuple(long_prompt), long_arrival)]


def schedules(chunks, longest_prompt: int):
    """Prefill first (a forward as wide as the longest prompt at most), then chunked C for each of `chunks`."""
    from jaxspec.decoding.mixed_batch import Schedule

    return [Schedule.prefill_first(longest_prompt)] + [Schedule(int(c)) for c in chunks]


def figures(result) -> dict:
    """The long request's TTFT (it is the last request), the short requests' gaps, throughput, iterations."""
    gaps = np.concatenate([r.gaps_s for r in result.requests[:-1]])
    return {"long TTFT ms": 1e3 * result.requests[-1].ttft_s, "worst gap ms": 1e3 * float(gaps.max()),
            "median gap ms": 1e3 * float(np.median(gaps)), "tokens/s": result.tokens_per_s,
            "iterations": len(result.iteration_s)}


def rounded(value: float):
    """Milliseconds as whole numbers from 100 up, other figures to three significant digits."""
    return int(round(value)) if abs(value) >= 100 else float(f"{value:.3g}")


def compare_schedules(forward, requests, schedule_list, *, max_new: int, eos_ids=(), rounds: int = 1,
                      reference=None) -> tuple[list[dict], list]:
    """One row per schedule: the median of each figure over `rounds` round-robin rounds. "same tokens": every
    request's tokens equal the first schedule's in every round (and `reference`'s, per request, when given).
    Also returns the last round's results."""
    from jaxspec.decoding.mixed_batch import serve

    runs: dict[int, list[dict]] = {i: [] for i in range(len(schedule_list))}
    last, same = [], [True] * len(schedule_list)
    baseline = reference
    for _ in range(rounds):
        last = []
        for i, schedule in enumerate(schedule_list):
            result = serve(forward, requests, schedule, max_new=max_new, eos_ids=eos_ids)
            tokens = [r.tokens for r in result.requests]
            baseline = tokens if baseline is None else baseline
            same[i] = same[i] and tokens == baseline
            runs[i].append(figures(result))
            last.append(result)
    rows = []
    for i, schedule in enumerate(schedule_list):
        row = {"schedule": schedule.name}
        row.update({key: rounded(float(np.median([f[key] for f in runs[i]]))) for key in runs[i][0]})
        row["iterations"] = int(row["iterations"])
        row["same tokens"] = "yes" if same[i] else "NO"
        rows.append(row)
    return rows, last


def alone_reference(model, params, requests, max_new: int, eos_ids=()) -> list[list[int]]:
    """Each request's prompt decoded autoregressively on its own."""
    from jaxspec.decoding import api

    return [api.generate(model, params, [list(r.prompt)], method="ar", max_new_tokens=max_new,
                         eos_ids=eos_ids).tokens[0] for r in requests]


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the model (a zoo name or a workdir)")
    flags.DEFINE_integer("slots", 4, "rows of the batch: slots - 1 short requests and one long one")
    flags.DEFINE_list("chunks", ["256", "128", "64"], "chunk sizes of the chunked schedules")
    flags.DEFINE_integer("long_tokens", 1000, "the long prompt's length, at least (tokens)")
    flags.DEFINE_integer("long_arrival", 8, "the iteration at which the long request arrives")
    flags.DEFINE_integer("max_new", 48, "tokens each request generates")
    flags.DEFINE_bool("stop_at_eos", False, "stop a request at the model's stop ids")
    flags.DEFINE_integer("rounds", 1, "round-robin rounds of all schedules (figures: medians)")
    flags.DEFINE_bool("check_ar", True, "also compare every request with api.generate(method='ar') alone")
    flags.DEFINE_string("output_json", None, "write the rows and the workload here")


@cli.error_boundary("output_json")
def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    import jax

    from jaxspec.decoding import api, engine
    from jaxspec.decoding.mixed_batch import MixedForward
    from jaxspec.eval import suite_eval, tables
    from jaxspec.eval.suite import load_suite

    if FLAGS.slots < 2:
        raise InputError(f"--slots={FLAGS.slots}: the workload needs 2 or more (decoding rows and the long request)")
    start = time.perf_counter()
    lm = api.load(FLAGS.model)
    suite = load_suite()
    short = sorted(suite_eval.encode_suite(lm.tokenizer, suite), key=len)[:FLAGS.slots - 1]
    long = long_request_ids(lm.tokenizer, [p.text for p in suite], FLAGS.long_tokens)
    requests = workload(short, long, FLAGS.long_arrival)
    eos = lm.tokenizer.eos_ids if FLAGS.stop_at_eos else ()
    plans = schedules(FLAGS.chunks, len(long))
    max_len = engine.bucket_len(len(long) + FLAGS.max_new)
    forward = MixedForward(lm.model, lm.params, slots=FLAGS.slots, max_len=max_len)
    print(f"{FLAGS.model} on {jax.devices()[0].platform}: {FLAGS.slots} slots, decode state {max_len}; short "
          f"prompts of {[len(p) for p in short]} tokens at iteration 0, a long one of {len(long)} tokens at "
          f"iteration {FLAGS.long_arrival}; {FLAGS.max_new} new tokens each; {FLAGS.rounds} round(s)\n", flush=True)
    reference = alone_reference(lm.model, lm.params, requests, FLAGS.max_new, eos) if FLAGS.check_ar else None
    rows, results = compare_schedules(forward, requests, plans, max_new=FLAGS.max_new, eos_ids=eos,
                                      rounds=FLAGS.rounds, reference=reference)
    print(tables.markdown_table(rows, list(COLUMNS)) + "\n", flush=True)
    against = "autoregressive decoding of its prompt alone" if reference else "the prefill-first run"
    print(f"\"same tokens\": every request's tokens equal {against}. Compile {forward.compile_s:.0f} s "
          f"(excluded); wall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    if FLAGS.output_json:
        report = {"model": FLAGS.model, "platform": jax.devices()[0].platform, "slots": FLAGS.slots,
                  "max_len": max_len, "short_prompt_tokens": [len(p) for p in short], "long_prompt_tokens": len(long),
                  "long_arrival": FLAGS.long_arrival, "max_new": FLAGS.max_new, "rounds": FLAGS.rounds,
                  "checked_against_ar": reference is not None, "rows": rows,
                  "iteration_ms": {s.name: [1e3 * t for t in r.iteration_s] for s, r in zip(plans, results)}}
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output_json)), exist_ok=True)
        with open(FLAGS.output_json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
