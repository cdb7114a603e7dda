"""tau and tokens/s of every decoding method against autoregressive, side by side in one process.

  python -m launch.quickstart                        # trains the target, Medusa heads and a draft model once
  python benchmarks/decode_speed.py --target_workdir=~/.cache/jaxspec/quickstart/target \
      --draft_workdir=~/.cache/jaxspec/quickstart/draft --medusa_workdir=~/.cache/jaxspec/quickstart/medusa

Prompts are held-out documents of the target's corpus. Methods whose workdir is not given are left out.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging

from jaxspec.decoding import loading, methods
from jaxspec.eval.compare import compare_methods, markdown_table
from jaxspec.training.data import heldout_prompts

_TARGET = flags.DEFINE_string("target_workdir", None, "target LM run (a MatFormer run enables method matformer)")
_DRAFT = flags.DEFINE_string("draft_workdir", None, "draft model run")
_MEDUSA = flags.DEFINE_string("medusa_workdir", None, "Medusa heads run")
_PROMPTS = flags.DEFINE_integer("num_prompts", 4, "held-out prompts (one batch)")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "prompt tokens")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "tokens per prompt")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per method (best is kept)")
_SKIP = flags.DEFINE_list("skip_layers", [], "layer-skip drafter's skipped layers (default: the upper half)")
flags.mark_flags_as_required(["target_workdir"])


def method_grid(target, draft_workdir, medusa_workdir, skip_layers):
    """Every method the given workdirs allow, with its default tree and a few variants (name -> spec)."""
    n_layers = target.config.model.n_layers
    skip = tuple(skip_layers) or tuple(range(n_layers // 2, n_layers))
    grid = {f"lookup chain:{k}": methods.make("lookup", tree=f"chain:{k}") for k in (3, 6, 10)}
    grid["layerskip chain:3"] = methods.make("layerskip", skip_layers=skip, tree="chain:3")
    if len(target.config.model.matformer_fractions) > 1:
        grid["matformer g0 chain:4"] = methods.make("matformer", granularity=0, tree="chain:4")
    if draft_workdir:
        for tree in ("chain:4", "branching:2,2,1"):
            grid[f"draft {tree}"] = methods.make("draft", draft_workdir=draft_workdir, tree=tree)
    if medusa_workdir:
        for tree in ("chain:3", "medusa_small"):
            grid[f"medusa {tree}"] = methods.make("medusa", draft_workdir=medusa_workdir, tree=tree)
    return grid


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # checkpoint restores log every file at INFO
        logging.set_verbosity(logging.WARNING)
    expand = lambda p: os.path.expanduser(p) if p else p
    target = loading.load_lm(expand(_TARGET.value))
    tok = target.tokenizer
    texts = heldout_prompts(target.config.data, _PROMPTS.value, _PROMPT_LEN.value)
    prompts = [tok.encode_prompt(t)[:_PROMPT_LEN.value] for t in texts]
    grid = method_grid(target, expand(_DRAFT.value), expand(_MEDUSA.value), [int(s) for s in _SKIP.value])
    results = compare_methods(target.model, target.params, prompts, grid, max_new_tokens=_MAX_NEW.value,
                              temperature=_TEMPERATURE.value, repeats=_REPEATS.value, target_workdir=target.workdir)
    print(f"device: {jax.devices()[0].device_kind}, {len(prompts)} prompts x {_MAX_NEW.value} new tokens, "
          f"temperature {_TEMPERATURE.value}")
    print(markdown_table(results))


if __name__ == "__main__":
    app.run(main)
