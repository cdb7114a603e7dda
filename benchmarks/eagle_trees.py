"""A trained EAGLE drafter on the offline prompt suite: static chains and EAGLE-2 dynamic trees of several sizes
against autoregressive decoding, side by side in one run (SmolLM2-135M-Instruct by default); optionally beside
an EAGLE-3 drafter, Medusa and Hydra heads trained for the same target (`--eagle3`, `--medusa`, `--hydra`).

  python -m launch.quickstart --arg=drafters                     # or the README's self-distill + train commands
  python -m benchmarks.eagle_trees --drafter=~/.cache/jaxspec/drafters/smollm2-135m-instruct/eagle
  python -m benchmarks.eagle_trees --drafter=/tmp/eagle --chains=2,3,4 --dynamic=4:4:6,4:5:8 --per_category=3
  python -m benchmarks.eagle_trees --drafter=/tmp/eagle --medusa=/tmp/medusa_sd --hydra=/tmp/hydra_sd   # + heads
  python -m benchmarks.eagle_trees --drafter=/tmp/eagle --hydra=/tmp/hydra_sd --head_dynamic=3:3:4
  python -m benchmarks.eagle_trees --drafter=/tmp/eagle --medusa=/tmp/medusa_sd,/tmp/medusa_trim   # two runs
  python -m benchmarks.eagle_trees --hydra=/tmp/hydra_a,/tmp/hydra_b --head_trees=chain:2   # heads only, no EAGLE

Each row: tau (tokens per target forward), tokens/s, speedup over autoregressive decoding and whether the output
is identical to it, per category and over all prompts (jaxspec.eval.suite_eval, as the quickstart).

`--round_split` (on by default) then times one round's parts for each EAGLE variant, jitted apart at a suite
prompt's context: draft (the drafter's propose), verify (the target's tree forward and the acceptance rule) and
commit (the target's cache commit and the drafter's update), beside one autoregressive step.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from configs import quickstart
from jaxspec import cli
from jaxspec.eval import suite_eval, tables

FLAGS = flags.FLAGS


def tree_methods(method: str, workdir: str, trees, dynamic, prefix: str) -> dict:
    """Rows of one trained drafter run: each static tree spec and each dynamic tree (expand:depth:nodes)."""
    grid = {f"{prefix}_{tree.replace(':', '')}": dict(method=method, draft_workdir=workdir, tree=tree)
            for tree in trees}
    for spec in dynamic:
        expand, depth, nodes = (int(x) for x in spec.split(":"))
        grid[f"{prefix}_dyn{expand}x{depth}n{nodes}"] = dict(method=method, draft_workdir=workdir, expand=expand,
                                                            depth=depth, nodes=nodes)
    return grid


def head_methods(method: str, workdirs, trees, dynamic) -> dict:
    """Rows of one or more heads runs (`method` "medusa" or "hydra"); several runs are told apart by their
    workdirs' last folder names, which must then differ."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(set(names)) < len(names):
        raise app.UsageError(f"--{method}: the runs {list(workdirs)} share a last folder name, which names their rows")
    grid = {}
    for workdir, name in zip(workdirs, names, strict=True):
        prefix = method if len(workdirs) == 1 else f"{method}_{name}"
        grid.update(tree_methods(method, workdir, trees, dynamic, prefix=prefix))
    return grid


def eagle_methods(drafter: str, chains, dynamic, prefix: str = "eagle") -> dict:
    """Rows of one EAGLE drafter run (EAGLE or EAGLE-3): a chain of each length and each dynamic tree."""
    return tree_methods("eagle", drafter, [f"chain:{k}" for k in chains], dynamic, prefix)


def round_parts(model, params, drafter, dparams, prefilled, iters: int) -> dict:
    """Median ms of one round's draft, verify and commit for `drafter` after the prefill `prefilled`."""
    import jax
    import jax.numpy as jnp

    from jaxspec.decoding.drafters import Context
    from jaxspec.decoding.engine import drafter_features
    from jaxspec.decoding.verify import verify_tree
    from jaxspec.eval.timing import median_ms
    from jaxspec.state import commit

    tokens, lens, max_len, out, state, first = prefilled
    features = {"features": drafter_features(drafter, out)} if getattr(drafter, "reads_features", False) else {}
    dstate = jax.jit(lambda dp, f: drafter.init(dp, tokens, lens, max_len, first, **f))(dparams, features)
    seq = jnp.zeros((1, max_len), jnp.int32).at[:, :tokens.shape[1]].set(tokens).at[:, tokens.shape[1]].set(first)
    ctx = Context(first, seq, lens + 1, out.hidden[:, -1], jax.random.key(0), 0.0)
    propose = jax.jit(lambda dp, ds: drafter.propose(dp, ds, ctx))
    prop = propose(dparams, dstate)
    dynamic = prop.parents is not None

    def verify(p, s, t, parents):
        o, pending = model.apply({"params": p}, t, state=s, parents=parents, return_hidden=True)
        return verify_tree(o.logits, t, parents if dynamic else drafter.tree, rule="greedy"), pending, o

    parents = prop.parents if dynamic else drafter.tree.parents_array
    verify_j = jax.jit(verify)
    res, pending, o = verify_j(params, state, prop.tokens, parents)
    path_features = {"features": drafter_features(drafter, o)[jnp.arange(1)[:, None], res.path]} if features else {}
    commit_j = jax.jit(lambda pend, ps, r, f: (commit(pend, r.path, r.num_accepted),
                                               drafter.update(ps, r.accepted_tokens, r.num_accepted, **f)))
    return {"draft_ms": median_ms(propose, dparams, dstate, warmup=2, iters=iters),
            "verify_ms": median_ms(verify_j, params, state, prop.tokens, parents, warmup=2, iters=iters),
            "commit_ms": median_ms(commit_j, pending, prop.state, res, path_features, warmup=2, iters=iters)}


def round_split(model, params, drafters: dict, prompt: list[int], iters: int = 20) -> list[dict]:
    """One round's parts per drafter (name -> (drafter, its params); see the module docstring) beside one
    autoregressive step of `model`."""
    import jax
    import jax.numpy as jnp

    from jaxspec.decoding import engine
    from jaxspec.eval.timing import median_ms
    from jaxspec.models.decode_layout import for_decoding
    from jaxspec.state import init_decode_state

    model, params = for_decoding(model, params)
    tokens, lens = jnp.asarray([prompt], jnp.int32), jnp.asarray([len(prompt)], jnp.int32)
    max_len = engine.bucket_len(len(prompt) + 64)
    empty = init_decode_state(model.model_cfg, 1, max_len)
    out, state = jax.jit(lambda p: model.apply({"params": p}, tokens, state=empty, num_new=lens, return_hidden=True,
                                               fresh=True))(params)
    first = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
    step = jax.jit(lambda p, s, t: model.apply({"params": p}, t[:, None], state=s))
    ar_ms = median_ms(step, params, state, first, warmup=2, iters=iters)
    rows = [{"method": "ar", "draft_ms": 0.0, "verify_ms": ar_ms, "commit_ms": 0.0}]
    for name, (drafter, dparams) in drafters.items():
        parts = round_parts(model, params, drafter, dparams, (tokens, lens, max_len, out, state, first), iters)
        rows.append({"method": name, **parts})
    for row in rows:
        row["round_ms"] = row["draft_ms"] + row["verify_ms"] + row["commit_ms"]
        row["round / AR step"] = row["round_ms"] / ar_ms
    return rows


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    flags.DEFINE_string("drafter", None, "an EAGLE drafter's training workdir")
    flags.DEFINE_string("model", "smollm2-135m-instruct", "the target (a zoo name or a workdir)")
    flags.DEFINE_list("chains", ["2", "3", "4", "5"], "static chain lengths")
    flags.DEFINE_list("dynamic", ["4:4:6", "4:5:8", "6:6:12"], "dynamic trees, expand:depth:nodes")
    flags.DEFINE_integer("per_category", 3, "suite prompts per category")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens per prompt")
    flags.DEFINE_bool("lookup", True, "also prompt lookup on a 4-draft chain (the best training-free row)")
    flags.DEFINE_string("eagle3", None, "also an EAGLE-3 drafter run (configs/eagle.py:eagle3=1) on the same trees")
    flags.DEFINE_list("medusa", [], "also Medusa heads runs for the same target, on each of --head_trees (several: "
                      "rows named by each workdir's last folder)")
    flags.DEFINE_list("hydra", [], "also Hydra heads runs for the same target, on each of --head_trees (as --medusa)")
    flags.DEFINE_list("head_trees", ["medusa_small", "chain:3"], "static trees of the --medusa / --hydra rows")
    flags.DEFINE_list("head_dynamic", [], "dynamic trees (expand:depth:nodes) of the --medusa / --hydra rows")
    flags.DEFINE_string("workdir", "/tmp/eagle_trees", "where the tables and plots go")
    flags.DEFINE_bool("suite", True, "decode the suite (off: only the round split)")
    flags.DEFINE_bool("round_split", True, "also time draft / verify / commit of one round per variant")


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    cli.enable_compilation_cache(None)
    config = quickstart.get_config(f"model={FLAGS.model},per_category={FLAGS.per_category},"
                                   f"max_new_tokens={FLAGS.max_new_tokens}")
    if not (FLAGS.drafter or FLAGS.eagle3 or FLAGS.medusa or FLAGS.hydra):
        raise app.UsageError("give a trained drafter: --drafter (EAGLE), --eagle3, --medusa or --hydra")
    lookup = config.methods.lookup
    config.methods = {}
    if FLAGS.drafter:
        config.methods.update(eagle_methods(os.path.abspath(os.path.expanduser(FLAGS.drafter)), FLAGS.chains,
                                            FLAGS.dynamic))
    if FLAGS.eagle3:
        config.methods.update(eagle_methods(os.path.abspath(os.path.expanduser(FLAGS.eagle3)), FLAGS.chains,
                                            FLAGS.dynamic, prefix="eagle3"))
    if FLAGS.lookup:
        config.methods.lookup = lookup
    for name in ("medusa", "hydra"):  # draft heads on the same target, beside the EAGLE rows
        runs = [os.path.abspath(os.path.expanduser(w)) for w in FLAGS[name].value]
        config.methods.update(head_methods(name, runs, FLAGS.head_trees, FLAGS.head_dynamic))
    start = time.perf_counter()
    if FLAGS.suite:
        report = suite_eval.evaluate_suite(config, FLAGS.workdir, on_method=lambda name: print(
            f"  {name} ({time.perf_counter() - start:.0f} s)", flush=True))
        print("\n" + suite_eval.table(report["rows"]) + "\n")
        print(f"{report['prompts']} prompts, greedy, max_new_tokens={FLAGS.max_new_tokens}; "
              f"wall time {(time.perf_counter() - start) / 60:.1f} min; results in {FLAGS.workdir}")
    if FLAGS.round_split:
        from jaxspec.decoding import api, methods
        from jaxspec.decoding.method import Target
        from jaxspec.eval.suite import load_suite

        lm = api.load(FLAGS.model)
        prompt = suite_eval.encode_suite(lm.tokenizer, load_suite(per_category=1))[0]
        target = Target(lm.model, lm.params, lm.workdir)
        drafters = {name: methods.make(fields["method"], **{k: v for k, v in fields.items() if k != "method"}
                                       ).build(target) for name, fields in config.methods.items()}
        rows = round_split(lm.model, lm.params, drafters, prompt)
        print(f"\nOne round's parts at a {len(prompt)}-token context (median ms, jitted apart):\n")
        print(tables.markdown_table(rows, ["method", "draft_ms", "verify_ms", "commit_ms", "round_ms",
                                           "round / AR step"]))


if __name__ == "__main__":
    define_flags()
    app.run(main)
