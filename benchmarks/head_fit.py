"""How well trained Hydra heads predict the target on the evaluation suite, without timing a decode: each head's
teacher-forced top-1 accuracy over the target's own greedy replies to the suite's prompts, per category, the
figure the trainer reports on its held-out split (`val_head{k}_acc`).

  python -m benchmarks.head_fit --hydra=/root/hydra_tasks720,/root/hydra_self --per_category=3

The replies and the target's hidden states come from one autoregressive decode of the suite with
`record_features` (the states a self-distillation set would store); each run's heads are then scored exactly
as its training objective scores them (`losses.hydra_objective`: head k at a reply position predicts the token
k + 2 ahead from the stored state and the path's embeddings). With greedy verification, depth-1 accuracy is the
chance that a chain's first draft is accepted, so a gap between this table and the held-out figure is a gap
between the training prompts and the suite's.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from jaxspec import cli

FLAGS = flags.FLAGS


def suite_rows(lm, prompts: list[list[int]], max_new_tokens: int) -> dict[str, np.ndarray]:
    """A self-distillation batch (tokens, lengths, reply_start, features) of the target's greedy replies."""
    from jaxspec.decoding import api
    from jaxspec.training import selfdistill

    result = api.generate(lm.model, lm.params, prompts, max_new_tokens=max_new_tokens, eos_ids=lm.tokenizer.eos_ids,
                          record_features=())
    seq_len = max(len(p) + len(r) for p, r in zip(prompts, result.tokens))
    tokens, lengths = selfdistill.example_rows(prompts, result.tokens, seq_len)
    stored = selfdistill.stored_features(result.features.final, None, lengths, seq_len)
    return dict(tokens=tokens, lengths=lengths, reply_start=np.asarray([len(p) for p in prompts], np.int32),
                features=stored["features"])


def head_accuracy(lm, workdir: str, rows: dict[str, np.ndarray], groups: dict[str, np.ndarray]
                  ) -> dict[str, list[float]]:
    """{group: [top-1 accuracy of head k]} of the Hydra run in `workdir` over the rows of each group (indices)."""
    import jax

    from jaxspec.decoding.method import Target
    from jaxspec.decoding.methods.hydra import load_heads
    from jaxspec.models.eagle import target_side
    from jaxspec.training import losses, selfdistill
    from jaxspec.training.checkpoint import restore_params

    heads, params, vocab = load_heads(workdir, Target(lm.model, lm.params, lm.workdir))
    _, cfg = restore_params(workdir)
    stats = jax.jit(losses.hydra_objective(heads, cfg.hydra).stats)
    frozen = target_side(lm.params, lm.model.model_cfg, vocab)
    mask = selfdistill.loss_mask(rows)
    out = {}
    for group, index in groups.items():
        streams = stats(params, frozen, dict(tokens=rows["tokens"][index], features=rows["features"][index],
                                             mask=mask[index]))
        out[group] = [float(streams[f"head{k}"]["correct"] / max(float(streams[f"head{k}"]["tokens"]), 1.0))
                      for k in range(heads.num_heads)]
    return out


def define_flags() -> None:
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_list("hydra", [], "Hydra heads runs (launch.train --config=configs/hydra.py) for this target")
    flags.DEFINE_integer("per_category", 3, "suite prompts per category")
    flags.DEFINE_integer("max_new_tokens", 64, "reply tokens at most, as the suite decodes")


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    from jaxspec.decoding import api
    from jaxspec.errors import InputError
    from jaxspec.eval import suite_eval, tables
    from jaxspec.eval.suite import load_suite

    if not FLAGS.hydra:
        raise InputError("--hydra: name at least one Hydra heads run")
    lm = api.load(FLAGS.model)
    suite = load_suite(per_category=FLAGS.per_category)
    rows = suite_rows(lm, suite_eval.encode_suite(lm.tokenizer, suite), FLAGS.max_new_tokens)
    categories = list(dict.fromkeys(p.category for p in suite))
    groups = {"all": np.arange(len(suite)),
              **{c: np.asarray([i for i, p in enumerate(suite) if p.category == c]) for c in categories}}
    table = []
    for workdir in FLAGS.hydra:
        fit = head_accuracy(lm, workdir, rows, groups)
        for k in range(len(fit["all"])):
            table.append({"run": workdir, "head": k, **{g: f"{fit[g][k]:.2f}" for g in groups}})
    print(f"# head_fit: {FLAGS.model}, {len(suite)} suite prompts, {FLAGS.max_new_tokens} new tokens at most; "
          "teacher-forced top-1 accuracy")
    print(tables.markdown_table(table, ["run", "head", *groups]))


if __name__ == "__main__":
    define_flags()
    app.run(main)
