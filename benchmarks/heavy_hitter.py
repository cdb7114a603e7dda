"""Heavy-hitter KV (H2O) on a real target (SmolLM2-135M-Instruct by default), on long prompts (suite passages
joined into one summarisation request of about `--prompt_tokens` tokens), for each `--budgets` entry:

- the lossy mode "h2o": agreement with autoregressive decoding (the share of AR's tokens it reproduces before
  the first difference) and the target's mean log-likelihood of its output (teacher-forced, per token; AR's own
  is the reference row), and its speed against AR;
- the lossless self-draft "h2o_draft": tau (tokens per target forward), whether its output is AR's, and its
  speed against AR.

Greedy, batch 1, every method timed in the same run as AR (compile time excluded): "speedup" end to end (prefill
included: the self-draft's drafter prefills the prompt too), "decode speedup" after the first token (each prompt
is also decoded to its first token alone, and that time subtracted).

  python -m benchmarks.heavy_hitter
  python -m benchmarks.heavy_hitter --budgets=128,256,512 --prompts=3 --max_new_tokens=128 --output_json=h2o.json
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from jaxspec import cli
from jaxspec.eval.suite import long_prompts

FLAGS = flags.FLAGS
LOSSY_COLUMNS = ("method", "budget", "recent", "agreement", "log-lik", "speedup", "decode speedup")
DRAFT_COLUMNS = ("method", "budget", "recent", "tree", "tau", "identical", "speedup", "decode speedup")


def run(lm, prompts, budgets, recent_fraction: float, max_new_tokens: int, tree: str, split_prefill: bool = True
        ) -> dict:
    """Decode every prompt with AR, then with "h2o" and "h2o_draft" at every budget; the rows of both tables.
    `split_prefill`: also time each method to its first token, for the decode-phase speedups (else not given)."""
    from jaxspec.decoding import api, engine
    from jaxspec.eval.quality import agreement_with, mean_log_likelihood

    width = engine.bucket_width(max(map(len, prompts)))
    options = dict(max_new_tokens=max_new_tokens, eos_ids=lm.tokenizer.eos_ids, prompt_width=width)

    def decode(**method):
        # Each prompt twice: to its first token (the prefills: the target's, and the drafter's own for the
        # self-draft) and whole; the difference times the decode phase alone.
        first = [api.generate(lm.model, lm.params, [p], **{**options, "max_new_tokens": 1}, **method)
                 for p in prompts] if split_prefill else []
        results = [api.generate(lm.model, lm.params, [p], **options, **method) for p in prompts]
        tokens = [r.tokens[0] for r in results]
        wall, prefill_s = sum(r.wall_time_s for r in results), sum(r.wall_time_s for r in first)
        return dict(tokens=tokens, tok_s=sum(map(len, tokens)) / wall,
                    decode_tok_s=(sum(map(len, tokens)) - len(prompts)) / max(wall - prefill_s, 1e-9)
                    if split_prefill else float("nan"),
                    steps=sum(int(r.target_steps.sum()) for r in results),
                    accepted=sum(int(r.accepted.sum()) for r in results),
                    compile_s=sum(r.compile_s for r in results + first))

    def speed(out) -> dict:
        return {"speedup": out["tok_s"] / ar["tok_s"], "decode speedup": out["decode_tok_s"] / ar["decode_tok_s"]}

    def log_lik(tokens):
        return mean_log_likelihood(lm.model, lm.params, prompts, tokens)

    ar = decode()
    print(f"ar: {ar['tok_s']:.2f} tok/s end to end, {ar['decode_tok_s']:.2f} after the first token (compile "
          f"{ar['compile_s']:.0f} s)", flush=True)
    lossy = [{"method": "ar", "budget": "", "recent": "", "agreement": 1.0, "log-lik": log_lik(ar["tokens"]),
              **speed(ar)}]
    drafts = []
    for budget in budgets:
        fields = dict(budget=budget, recent=int(budget * recent_fraction))
        out = decode(method="h2o", **fields)
        lossy.append({"method": "h2o", **fields,
                      "agreement": float(np.mean([agreement_with(t, a) for t, a in zip(out["tokens"], ar["tokens"])])),
                      "log-lik": log_lik(out["tokens"]), **speed(out)})
        print(f"h2o {fields}: {lossy[-1]}", flush=True)
        out = decode(method="h2o_draft", tree=tree, **fields)
        drafts.append({"method": "h2o_draft", **fields, "tree": tree, "tau": out["accepted"] / out["steps"],
                       "identical": out["tokens"] == ar["tokens"], **speed(out)})
        print(f"h2o_draft {fields}: {drafts[-1]}", flush=True)
    return {"prompt_tokens": [len(p) for p in prompts], "ar_tok_s": ar["tok_s"], "ar_decode_tok_s": ar["decode_tok_s"],
            "lossy": lossy, "self_draft": drafts}


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_list("budgets", ["128", "256", "512"], "cache budgets (keys per layer, row and KV head)")
    flags.DEFINE_float("recent_fraction", 0.5, "the share of each budget kept for the latest positions")
    flags.DEFINE_integer("prompts", 3, "long prompts")
    flags.DEFINE_integer("prompt_tokens", 1024, "each prompt's length, at most (tokens)")
    flags.DEFINE_integer("max_new_tokens", 128, "reply tokens per prompt, at most (replies stop at the stop ids)")
    flags.DEFINE_string("tree", "chain:4", "the self-draft's tree")
    flags.DEFINE_string("output_json", None, "write the options and rows here")


@cli.error_boundary("output_json")
def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    import jax

    from jaxspec.decoding import api
    from jaxspec.eval import tables
    from jaxspec.eval.suite import load_suite

    start = time.perf_counter()
    lm = api.load(FLAGS.model)
    texts = [p.text for p in load_suite(("summarization", "qa"))]
    prompts = long_prompts(lm.tokenizer, texts, FLAGS.prompts, FLAGS.prompt_tokens)
    budgets = [int(b) for b in FLAGS.budgets]
    print(f"{FLAGS.model} on {jax.devices()[0].platform}: {len(prompts)} prompts of {[len(p) for p in prompts]} "
          f"tokens, up to {FLAGS.max_new_tokens} new tokens each, budgets {budgets}\n", flush=True)
    report = run(lm, prompts, budgets, FLAGS.recent_fraction, FLAGS.max_new_tokens, FLAGS.tree)
    print("\nLossy mode (agreement: share of AR's tokens matched before the first difference; log-lik: the target's "
          "mean log-probability per output token):\n")
    print(tables.markdown_table(report["lossy"], list(LOSSY_COLUMNS)) + "\n")
    print("Lossless self-draft (identical: output equals AR's):\n")
    print(tables.markdown_table(report["self_draft"], list(DRAFT_COLUMNS)) + "\n")
    print(f"wall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    if FLAGS.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output_json)), exist_ok=True)
        with open(FLAGS.output_json, "w") as fh:
            json.dump({"model": FLAGS.model, "platform": jax.devices()[0].platform, "budgets": budgets,
                       "recent_fraction": FLAGS.recent_fraction, "max_new_tokens": FLAGS.max_new_tokens,
                       "tree": FLAGS.tree, **report}, fh, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
