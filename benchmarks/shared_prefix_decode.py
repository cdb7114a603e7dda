"""Rows whose prompts share a long beginning (SmolLM2-135M-Instruct by default), decoded as a plain batch and over
the shared prefix (`api.generate(shared_prefix=True)`: prefilled once, its keys/values held and attended once for
all rows, Hydragen), side by side in one run, for each batch size in `--rows`: time to the first token (the
prefill), the whole request, and whether the outputs are the same (same seed). Two kinds of request:
- "samples": one long prompt (suite passages to summarise) sampled `rows` times at `--temperature`;
- "system prompt": the same passages as a system prompt, under which each row asks its own question (the qa
  suite's), greedy.
Autoregressive decoding and `--method` (a lossless speculative method) both; compile time excluded.

  python -m benchmarks.shared_prefix_decode
  python -m benchmarks.shared_prefix_decode --rows=4,16 --prompt_tokens=1024 --max_new_tokens=32
"""

from __future__ import annotations

import time

from absl import app, flags

from jaxspec import cli

FLAGS = flags.FLAGS
COLUMNS = ("request", "method", "rows", "prompt tokens", "plain first token s", "shared first token s",
           "prefill speedup", "plain s", "shared s", "speedup", "same output")


def compare(lm, prompts: list[list[int]], max_new_tokens: int, temperature: float, method: dict,
            request: str = "samples") -> dict:
    """One request of `prompts` (rows that share a beginning), plain and shared: each to its first token, then
    whole."""
    from jaxspec.decoding import api

    options = dict(temperature=temperature, seed=0, eos_ids=lm.tokenizer.eos_ids, **method)

    def timed(shared: bool, new_tokens: int):
        return api.generate(lm.model, lm.params, prompts, max_new_tokens=new_tokens, shared_prefix=shared, **options)

    first = {shared: timed(shared, 1).wall_time_s for shared in (False, True)}
    whole = {shared: timed(shared, max_new_tokens) for shared in (False, True)}
    return {"request": request, "method": method.get("method", "ar"), "rows": len(prompts),
            "prompt tokens": f"{api.common_prefix_len(prompts)} shared + {max(map(len, prompts))} at most",
            "plain first token s": first[False], "shared first token s": first[True],
            "prefill speedup": first[False] / first[True],
            "plain s": whole[False].wall_time_s, "shared s": whole[True].wall_time_s,
            "speedup": whole[False].wall_time_s / whole[True].wall_time_s,
            "same output": whole[False].tokens == whole[True].tokens}


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_list("rows", ["4", "8"], "samples of the prompt per request")
    flags.DEFINE_integer("prompt_tokens", 1024, "the prompt's length, at most (tokens)")
    flags.DEFINE_integer("max_new_tokens", 32, "tokens per sample, at most")
    flags.DEFINE_float("temperature", 1.0, "sampling temperature (0: greedy, every row the same)")
    flags.DEFINE_string("method", "lookup", "a lossless speculative method beside autoregressive decoding ('': none)")


@cli.error_boundary()
def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    import jax

    from jaxspec.decoding import api
    from jaxspec.eval import tables
    from jaxspec.eval.suite import load_suite, long_prompts

    start = time.perf_counter()
    lm = api.load(FLAGS.model)
    texts = [p.text for p in load_suite(("summarization", "qa"))]
    prompt = long_prompts(lm.tokenizer, texts, 1, FLAGS.prompt_tokens)[0]
    notes = lm.tokenizer.decode(prompt)  # the same passages, as a system prompt below
    questions = [p.text.rsplit("Question:", 1)[-1].strip() for p in load_suite(("qa",))]
    print(f"{FLAGS.model} on {jax.devices()[0].platform}: prompts of about {len(prompt)} tokens, samples at "
          f"T={FLAGS.temperature}, up to {FLAGS.max_new_tokens} new tokens per row\n", flush=True)
    methods = [{}] + ([{"method": FLAGS.method}] if FLAGS.method else [])
    rows = []
    for m in methods:
        for r in map(int, FLAGS.rows):
            rows.append(compare(lm, [prompt] * r, FLAGS.max_new_tokens, FLAGS.temperature, m))
            under_one = [lm.tokenizer.encode_chat([{"role": "system", "content": notes},
                                                   {"role": "user", "content": questions[i % len(questions)]}])
                         for i in range(r)]
            rows.append(compare(lm, under_one, FLAGS.max_new_tokens, 0.0, m, request="system prompt"))
    print(tables.markdown_table(rows, list(COLUMNS)))
    print(f"\nwall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
