"""Samples of one long prompt (SmolLM2-135M-Instruct by default), decoded as a plain batch and with the prompt
shared (`api.generate(shared_prefix=True)`: prefilled once, its keys/values held and attended once for all rows,
Hydragen), side by side in one run, for each batch size in `--rows`: time to the first token (the prefill),
the whole request, and whether the samples are the same (same seed). Temperature `--temperature` (1: samples),
autoregressive and `--method` (a lossless speculative method) both; compile time excluded.

  python -m benchmarks.shared_prefix_decode
  python -m benchmarks.shared_prefix_decode --rows=4,16 --prompt_tokens=1024 --max_new_tokens=32
"""

from __future__ import annotations

import time

from absl import app, flags

from jaxspec import cli

FLAGS = flags.FLAGS
COLUMNS = ("method", "rows", "prompt tokens", "plain first token s", "shared first token s", "prefill speedup",
           "plain s", "shared s", "speedup", "same samples")


def compare(lm, prompt: list[int], rows: int, max_new_tokens: int, temperature: float, method: dict) -> dict:
    """One request of `rows` samples of `prompt`, plain and shared: each to its first token, then whole."""
    from jaxspec.decoding import api

    options = dict(temperature=temperature, seed=0, eos_ids=lm.tokenizer.eos_ids, **method)

    def timed(shared: bool, new_tokens: int):
        return api.generate(lm.model, lm.params, [prompt] * rows, max_new_tokens=new_tokens, shared_prefix=shared,
                            **options)

    first = {shared: timed(shared, 1).wall_time_s for shared in (False, True)}
    whole = {shared: timed(shared, max_new_tokens) for shared in (False, True)}
    return {"method": method.get("method", "ar"), "rows": rows, "prompt tokens": len(prompt),
            "plain first token s": first[False], "shared first token s": first[True],
            "prefill speedup": first[False] / first[True],
            "plain s": whole[False].wall_time_s, "shared s": whole[True].wall_time_s,
            "speedup": whole[False].wall_time_s / whole[True].wall_time_s,
            "same samples": whole[False].tokens == whole[True].tokens}


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
    print(f"{FLAGS.model} on {jax.devices()[0].platform}: one prompt of {len(prompt)} tokens, "
          f"T={FLAGS.temperature}, up to {FLAGS.max_new_tokens} new tokens per sample\n", flush=True)
    methods = [{}] + ([{"method": FLAGS.method}] if FLAGS.method else [])
    rows = [compare(lm, prompt, int(r), FLAGS.max_new_tokens, FLAGS.temperature, m) for m in methods
            for r in FLAGS.rows]
    print(tables.markdown_table(rows, list(COLUMNS)))
    print(f"\nwall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
