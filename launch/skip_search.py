"""Choose the layers a layer-skip self-draft skips, by measurement (jaxspec/decoding/skip_search.py).

  python -m launch.skip_search --model=smollm2-135m-instruct --num_skip=10
  python -m launch.decode --model=smollm2-135m-instruct --method=layerskip --skip_layers=<the printed set> ...

Calibration text: the target's own greedy replies to instructions built from the standard library's docstrings
(jaxspec/training/selfdistill.py; disjoint from the offline suite the benchmarks decode). Prints the greedy
path - per size the skip set, the chance that a depth-1 draft is accepted and the predicted speedup of a chain
of `--depth` drafts - and the set with the best predicted speedup.
"""

from __future__ import annotations

import time

from absl import app, flags

from jaxspec import cli

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "the target: a zoo name or a workdir")
_NUM_SKIP = flags.DEFINE_integer("num_skip", 10, "the largest skip set to search")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "calibration instructions")
_MAX_CHARS = flags.DEFINE_integer("max_chars", 160, "longest quoted text of a calibration instruction (every "
                                  "candidate set costs a forward over the prompts and replies)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "reply tokens per calibration instruction")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: argmax agreement; > 0: sampled-draft acceptance")
_DEPTH = flags.DEFINE_integer("depth", 3, "chain depth of the predicted speedup")
_VERIFY_COST = flags.DEFINE_float("verify_cost", 1.4, "a verification's cost in autoregressive steps "
                                  "(benchmarks/step_cost.py measures it; ~1.4 for a 4-node chain on a 2-core CPU)")
_SEED = flags.DEFINE_integer("seed", 0, "which calibration instructions")
_PROMPT_SET = flags.DEFINE_enum("prompt_set", "docs", ["docs", "tasks"], "which instructions calibrate "
                                "(jaxspec/training/instructions.py; the figures in docs/benchmarks.md used docs)")


@cli.error_boundary("model")
def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    from jaxspec.decoding import api
    from jaxspec.decoding.skip_search import search_skip_layers
    from jaxspec.eval import tables
    from jaxspec.training import instructions, selfdistill

    start = time.perf_counter()
    lm = api.load(_MODEL.value)
    prompts = [selfdistill.encode_messages(lm.tokenizer, m)
               for m in instructions.instruction_prompts(_PROMPTS.value, seed=_SEED.value, max_chars=_MAX_CHARS.value,
                                                         prompt_set=_PROMPT_SET.value)]
    replies = api.generate(lm.model, lm.params, prompts, max_new_tokens=_MAX_NEW.value,
                           eos_ids=lm.tokenizer.eos_ids).tokens
    sequences = [p + r for p, r in zip(prompts, replies) if r]
    starts = [len(p) for p, r in zip(prompts, replies) if r]
    print(f"calibration: {len(sequences)} replies, {sum(map(len, replies))} tokens "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    rows = []

    def show(step):
        rows.append({"skipped": len(step.skip_layers), "skip_layers": ",".join(map(str, step.skip_layers)),
                     "acceptance": step.acceptance, "predicted speedup": step.predicted_speedup})
        print(f"  {rows[-1]['skipped']:2d} layers: acceptance {step.acceptance:.3f}, predicted speedup "
              f"{step.predicted_speedup:.2f}x ({time.perf_counter() - start:.0f} s)", flush=True)

    path = search_skip_layers(lm.model, lm.params, sequences, starts, _NUM_SKIP.value,
                              temperature=_TEMPERATURE.value, depth=_DEPTH.value, verify_cost=_VERIFY_COST.value,
                              on_step=show)
    print("\n" + tables.markdown_table(rows, ["skipped", "skip_layers", "acceptance", "predicted speedup"]) + "\n")
    best = max(path, key=lambda s: s.predicted_speedup)
    print(f"best predicted: --method=layerskip --skip_layers={','.join(map(str, best.skip_layers))} "
          f"--tree=chain:{_DEPTH.value} ({best.predicted_speedup:.2f}x predicted)")


if __name__ == "__main__":
    app.run(main)
