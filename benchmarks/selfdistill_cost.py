"""What a self-distillation set's batches cost, side by side in one run: the replies decoded and then one feature
forward over [prompt + reply] (how sets were made before) against decoding that records the target's hidden
states as it goes (`record_features`, how `selfdistill.generate` makes them now); and batches in the
instruction stream's order against batches of prompts sorted by length (the set's order now).

  python -m benchmarks.selfdistill_cost --model=smollm2-135m-instruct --num_prompts=64 --max_new_tokens=64

Decoding times exclude compilation (`api.generate`'s wall time); each feature forward is timed after one untimed
call of its shape. The first batch's recorded states are checked against a feature forward's.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from jaxspec import cli

FLAGS = flags.FLAGS
COLUMNS = ["order", "states", "batches", "reply tokens", "decode s", "feature forward s", "total s", "tokens/s",
           "vs before"]


def batches_of(prompts: list[list[int]], batch_size: int, by_length: bool) -> list[list[list[int]]]:
    ordered = sorted(prompts, key=len) if by_length else prompts
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def measure(lm, prompts: list[list[int]], batch_size: int, max_new_tokens: int, seq_len: int) -> list[dict]:
    """One row per (order, way of taking the states): decoding and feature-forward seconds over all batches."""
    from jaxspec.decoding import api, engine
    from jaxspec.training import selfdistill

    rows, warm = [], set()
    for by_length in (False, True):
        for recording in (False, True):
            decode_s = feature_s = 0.0
            tokens = 0
            for index, batch in enumerate(batches_of(prompts, batch_size, by_length)):
                result = api.generate(lm.model, lm.params, batch, max_new_tokens=max_new_tokens,
                                      eos_ids=lm.tokenizer.eos_ids, record_features=() if recording else None)
                decode_s += result.wall_time_s
                tokens += sum(map(len, result.tokens))
                padded, lengths = selfdistill.example_rows(batch, result.tokens, seq_len)
                if recording:
                    if index == 0:  # the recorded states are the states a feature forward gives
                        recorded = selfdistill.stored_features(result.features.final, None, lengths, seq_len)
                        forward = selfdistill.feature_pass(lm.model, lm.params, padded, lengths, ())
                        np.testing.assert_allclose(recorded["features"], forward["features"], rtol=0.05,
                                                   atol=0.05)
                    continue
                shape = (len(batch), engine.bucket_len(int(np.max(lengths))))
                if shape not in warm:  # compile this width's forward outside the timing
                    selfdistill.feature_pass(lm.model, lm.params, padded, lengths, ())
                    warm.add(shape)
                start = time.perf_counter()
                selfdistill.feature_pass(lm.model, lm.params, padded, lengths, ())
                feature_s += time.perf_counter() - start
            total = decode_s + feature_s
            rows.append({"order": "by length" if by_length else "stream", "states": "recorded" if recording
                         else "feature forward", "batches": -(-len(prompts) // batch_size), "reply tokens": tokens,
                         "decode s": decode_s, "feature forward s": feature_s, "total s": total,
                         "tokens/s": tokens / max(total, 1e-9)})
    before = rows[0]["total s"]
    for row in rows:
        row["vs before"] = before / max(row["total s"], 1e-9)
    return rows


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_string("prompt_set", "tasks", "instruction set (jaxspec.training.instructions)")
    flags.DEFINE_integer("num_prompts", 64, "instructions decoded")
    flags.DEFINE_integer("batch_size", 16, "rows per batch")
    flags.DEFINE_integer("max_new_tokens", 64, "reply tokens at most")
    flags.DEFINE_integer("seq_len", 384, "a set's example length (prompt + reply)")


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    from jaxspec.decoding import api
    from jaxspec.eval import tables
    from jaxspec.training import instructions, selfdistill

    lm = api.load(FLAGS.model)
    prompts, _ = selfdistill.plan_prompts(lm.tokenizer, FLAGS.num_prompts, 0, instructions.DEFAULT_MAX_CHARS,
                                          FLAGS.seq_len - FLAGS.max_new_tokens, FLAGS.prompt_set)
    rows = measure(lm, prompts, FLAGS.batch_size, FLAGS.max_new_tokens, FLAGS.seq_len)
    print(f"# selfdistill_cost: {FLAGS.model}, {len(prompts)} '{FLAGS.prompt_set}' prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, batch {FLAGS.batch_size}, "
          f"{FLAGS.max_new_tokens} new tokens at most")
    print(tables.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    define_flags()
    app.run(main)
