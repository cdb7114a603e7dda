"""Multi-draft verification rules on the same drafts, on a real target (SmolLM2-135M-Instruct by default) with a
layer-skip self-draft, at temperature 1:

- rejection: SpecInfer's recursive rejection over n children drawn i.i.d. from the draft;
- kseq: SpecTr's k-sequential selection over the same i.i.d. children;
- rsd: recursive rejection over n children drawn without replacement (RSD's Gumbel-top-k).

  python -m benchmarks.multi_draft
  python -m benchmarks.multi_draft --skip_layers=8-13 --children=1,2,3,4 --draws=16 --per_category=2

Part 1 (same drafts): the contexts are the target's greedy replies to suite prompts. One teacher-forced forward
of the target and of the self-draft over prompt + reply gives, at every reply position, the target's and the
draft's next-token logits. Each draw samples n children per context (i.i.d., and without replacement) and
verifies them with each rule through `verify_tree` on a depth-1 tree; the table gives the fraction of draws in
which a child is accepted (for n = 1 all three rules are plain speculative sampling: sum_x min(p, q)).

Part 2 (end to end, `--decode`): the same self-draft and rules decoding the suite prompts on `--tree` trees:
tau (tokens per target forward) and tokens/s, with sampling autoregressive decoding timed in the same run.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from jaxspec import cli

FLAGS = flags.FLAGS
RULES = ("rejection", "kseq", "rsd")


def context_logits(model, params, sequences, starts, skip_layers):
    """(target, draft) logits [N, V] at every position p >= starts[i] - 1 of each sequence but its last: the
    distributions of the token after position p, teacher-forced (the draft: `model` without `skip_layers`)."""
    import jax
    import jax.numpy as jnp

    forward = jax.jit(lambda p, t, skip: model.apply({"params": p}, t, skip_layers=skip), static_argnums=2)
    target, draft = [], []
    for seq, start in zip(sequences, starts):
        # Right-padded to a multiple of 64: causal, so the padding changes no scored position, and a few
        # widths compile for the whole suite.
        tokens = jnp.asarray([list(seq) + [0] * (-len(seq) % 64)], jnp.int32)
        rows = slice(start - 1, len(seq) - 1)
        target.append(np.asarray(forward(params, tokens, ())[0, rows]))
        draft.append(np.asarray(forward(params, tokens, tuple(skip_layers))[0, rows]))
    return np.concatenate(target), np.concatenate(draft)


def acceptance(target_logits, draft_logits, children: int, draws: int, temperature: float = 1.0, seed: int = 0,
               chunk: int = 256) -> dict:
    """Fraction of draws in which one of `children` drafted children is accepted, per rule (see the module
    docstring); every rule sees the same contexts, and rejection and kseq the same i.i.d. children."""
    import jax
    import jax.numpy as jnp

    from jaxspec.decoding import trees
    from jaxspec.decoding.drafters import children_tokens
    from jaxspec.decoding.verify import verify_tree

    tree = trees.from_branching((children,))
    ranks, siblings = np.arange(children), np.zeros(children, np.int64)

    @jax.jit
    def one_draw(key, target, draft):
        rows, vocab = target.shape
        k_iid, k_wor, k_verify = jax.random.split(key, 3)
        parent = jnp.broadcast_to(draft[:, None], (rows, children, vocab))
        logits = jnp.broadcast_to(target[:, None], (rows, children + 1, vocab))
        root = jnp.zeros((rows, 1), jnp.int32)
        no_draft = jnp.zeros((rows, 1, vocab))
        accepted = []
        for rule, key_draw, without in (("rejection", k_iid, False), ("kseq", k_iid, False),
                                        ("rejection", k_wor, True)):
            tokens, probs = children_tokens(key_draw, parent, ranks, temperature, children,
                                            siblings if without else None)
            out = verify_tree(logits, jnp.concatenate([root, tokens], axis=1), tree, rule=rule, key=k_verify,
                              temperature=temperature, draft_probs=jnp.concatenate([no_draft, probs], axis=1))
            accepted.append(jnp.sum(out.num_accepted > 1))
        return jnp.stack(accepted)

    totals = np.zeros(len(RULES))
    n = len(target_logits)
    for d in range(draws):
        key = jax.random.fold_in(jax.random.key(seed), d)
        for lo in range(0, n, chunk):
            sl = slice(lo, min(lo + chunk, n))
            totals += np.asarray(one_draw(jax.random.fold_in(key, lo), jnp.asarray(target_logits[sl]),
                                          jnp.asarray(draft_logits[sl])))
    return dict(zip(RULES, totals / (draws * n)))


def single_draft_acceptance(target_logits, draft_logits, temperature: float = 1.0) -> float:
    """The exact mean of sum_x min(p, q): the acceptance of one sampled draft."""
    from jaxspec.decoding.sampling import warp_logits

    p = np.asarray(warp_logits(target_logits, temperature))
    q = np.asarray(warp_logits(draft_logits, temperature))
    return float(np.mean(np.sum(np.minimum(p, q), axis=-1)))


def acceptance_table(target_logits, draft_logits, children, draws: int, temperature: float = 1.0) -> list[dict]:
    rows = []
    for n in children:
        rates = acceptance(target_logits, draft_logits, n, draws, temperature)
        rows.append({"children": n, **rates})
    return rows


def decode_rows(lm, prompts, skip_layers, tree: str, max_new_tokens: int, seed: int = 0) -> list[dict]:
    """End to end at temperature 1: sampling AR, then the self-draft under each rule on `tree`."""
    from jaxspec.decoding import api

    options = dict(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                   eos_ids=lm.tokenizer.eos_ids, prompt_width=max(map(len, prompts)))
    ar = [api.generate(lm.model, lm.params, [p], **options) for p in prompts]
    ar_tokens, ar_wall = sum(len(r.tokens[0]) for r in ar), sum(r.wall_time_s for r in ar)
    rows = [{"rule": "ar", "tree": "", "tau": 1.0, "tok/s": ar_tokens / ar_wall, "speedup": 1.0}]
    for rule in RULES:
        method = dict(method="layerskip", skip_layers=tuple(skip_layers), tree=tree,
                      rule="rejection" if rule == "rsd" else rule, without_replacement=rule == "rsd")
        out = [api.generate(lm.model, lm.params, [p], **options, **method) for p in prompts]
        tokens, wall = sum(len(r.tokens[0]) for r in out), sum(r.wall_time_s for r in out)
        tau = sum(int(r.accepted.sum()) for r in out) / sum(int(r.target_steps.sum()) for r in out)
        rows.append({"rule": rule, "tree": tree, "tau": tau, "tok/s": tokens / wall,
                     "speedup": (tokens / wall) / (ar_tokens / ar_wall)})
    return rows


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_string("skip_layers", "3,5,7,9", "layers the self-draft skips")
    flags.DEFINE_list("children", ["1", "2", "3", "4"], "children per node (part 1)")
    flags.DEFINE_integer("draws", 16, "draws per context (part 1)")
    flags.DEFINE_integer("per_category", 2, "suite prompts per category")
    flags.DEFINE_integer("max_new_tokens", 64, "reply tokens per prompt")
    flags.DEFINE_bool("decode", True, "part 2: decode the suite under each rule")
    flags.DEFINE_string("tree", "branching:3,1,1", "the tree of part 2")


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    from jaxspec.decoding import api
    from jaxspec.eval import suite_eval, tables
    from jaxspec.eval.suite import load_suite

    start = time.perf_counter()
    skip = cli.parse_index_list("skip_layers", FLAGS.skip_layers)
    lm = api.load(FLAGS.model)
    prompts = suite_eval.encode_suite(lm.tokenizer, load_suite(per_category=FLAGS.per_category))
    replies = api.generate(lm.model, lm.params, prompts, max_new_tokens=FLAGS.max_new_tokens,
                           eos_ids=lm.tokenizer.eos_ids).tokens
    target, draft = context_logits(lm.model, lm.params, [p + r for p, r in zip(prompts, replies)],
                                   [len(p) for p in prompts], skip)
    print(f"{len(target)} contexts from {len(prompts)} suite prompts; draft: {FLAGS.model} without layers "
          f"{FLAGS.skip_layers}; exact single-draft acceptance {single_draft_acceptance(target, draft):.3f}\n",
          flush=True)
    rows = acceptance_table(target, draft, [int(n) for n in FLAGS.children], FLAGS.draws)
    print("P(a child is accepted) at temperature 1, same contexts (rejection and kseq: the same children):\n")
    print(tables.markdown_table(rows, ["children", *RULES]) + "\n", flush=True)
    if FLAGS.decode:
        rows = decode_rows(lm, prompts, skip, FLAGS.tree, FLAGS.max_new_tokens)
        print(f"End to end, temperature 1, batch 1, {len(prompts)} prompts:\n")
        print(tables.markdown_table(rows, ["rule", "tree", "tau", "tok/s", "speedup"]) + "\n")
    print(f"wall time {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    define_flags()
    app.run(main)
