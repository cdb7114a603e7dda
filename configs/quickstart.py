"""The quickstart: a real model of the zoo on the offline prompt suite, autoregressive decoding against every
method that needs no training, per category.

  python -m launch.quickstart                                   # SmolLM2-135M-Instruct, 3 prompts per category
  python -m launch.quickstart --arg=model=gemma3-270m,per_category=2
  python -m launch.quickstart --arg=toy            # the trained-from-scratch toy (configs/toy_quickstart.py)

arg: model (a zoo name or a workdir), per_category (suite prompts per category), max_new_tokens, batch_size,
scan_layers (1, the default: the target's repeated layers run as one scan, so each method's loop compiles ~3x
faster at the same tokens/s, docs/benchmarks.md "Scanned layers"; 0: the layers unrolled; same tokens either way);
methods=all for every method that runs on the model as it is (`ALL_TRAINING_FREE`: also the self-drafts DEL, SWIFT
and FFN skipping, and the lossy modes, marked lossless=no); and a trained run's workdir for each of eagle,
eagle3, hydra, medusa, kangaroo adds its rows (`trained_rows`):

  python -m launch.quickstart --arg=methods=all,eagle=DIR,eagle3=DIR,hydra=DIR,medusa=DIR,kangaroo=DIR

Methods: prompt lookup (n-grams of the context as drafts; chain:4 paid best on this CPU), layer-skip
self-drafting (the target without every other layer of its upper two thirds drafts for itself; the default
skip set of `api.default_skip_layers`), adaptive n-gram drafting (the most frequent tri-gram / bi-gram
continuations of the context and output so far) and token recycling (a 7-node tree of the target's own top-k
successors of each token, recorded at every verification). All are lossless: the table's last column checks the
output against autoregressive decoding.

Trained drafters: once `python -m launch.quickstart --arg=drafters` has made the Hydra heads of the model
(`drafter_configs`: self-distillation sets and heads trained on them, in the cache), the table also shows them on
a 2-draft chain and on the 11-node medusa_small tree.
"""

from typing import NamedTuple

import ml_collections

from configs import hydra as hydra_config
from configs import selfdistill as selfdistill_config
from jaxspec import config as config_lib
from jaxspec import zoo
from jaxspec.eval.suite_eval import suite_eval_defaults
from jaxspec.training import checkpoint


def get_config(arg=None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, model="smollm2-135m-instruct", per_category=3, max_new_tokens=64,
                                batch_size=1, scan_layers=True, methods="default", **{name: "" for name in TRAINED})
    config = suite_eval_defaults()
    config.target = args.model
    config.suite.per_category = args.per_category
    config.decode.max_new_tokens = args.max_new_tokens
    config.decode.batch_size = args.batch_size
    config.decode.scan_layers = args.scan_layers
    config.methods = dict(
        lookup=dict(method="lookup", tree="chain:4"),
        layerskip=dict(method="layerskip", tree="chain:3"),
        ngram=dict(method="ngram", tree="chain:4"),
        recycling=dict(method="recycling", tree="branching:2,1,1"),
    )
    if args.methods not in ("default", "all"):
        raise config_lib.ConfigError(f"config arg methods={args.methods!r} is not allowed: 'default' (the methods "
                                     "above) or 'all' (also ALL_TRAINING_FREE)")
    if args.methods == "all":
        config.methods.update(ALL_TRAINING_FREE)
    runs = {name: args[name] for name in TRAINED}
    runs["hydra"] = runs["hydra"] or trained_heads(args.model)  # the recipe's heads, once it has run
    for name, rows in TRAINED.items():
        if runs[name]:
            config.methods.update({row: dict(fields, draft_workdir=runs[name]) for row, fields in rows.items()})
    return config


# Every method that runs on a zoo model without training or another model, beside the default four: the
# self-drafts over the target's own layers (lossless), then the lossy decoding modes (their rows say
# identical=no, lossless=no). Settings are those of their benchmarks' best rows on SmolLM2 (docs/benchmarks.md).
ALL_TRAINING_FREE = dict(
    del_exit=dict(method="del", tree="chain:3"),
    swift=dict(method="swift", tree="chain:3", skip_ratio=0.2),
    ffnskip=dict(method="ffnskip", tree="chain:3", num_skip_ffn=4),
    skiplayers=dict(method="skiplayers", target_speedup=1.25),
    skipdecode=dict(method="skipdecode", max_exit=30, min_exit=26, decay_end=256),
    h2o=dict(method="h2o", budget=64, recent=32),
)

# The rows of each trained drafter, when its run is given (`draft_workdir` added): the trees its benchmark found
# best on SmolLM2 (docs/benchmarks.md, "Trained drafters"): deeper chains and wider dynamic trees add little tau
# there and cost a larger forward. Hydra's rows are also those of the quickstart's own drafter recipe.
TRAINED = dict(
    eagle=dict(eagle=dict(method="eagle", tree="chain:2"),
               eagle2=dict(method="eagle", expand=3, depth=3, nodes=4)),
    eagle3=dict(eagle3=dict(method="eagle", tree="chain:2"),
                eagle3_dyn=dict(method="eagle", expand=3, depth=3, nodes=4)),
    hydra=dict(hydra=dict(method="hydra", tree="chain:2"),
               hydra_tree=dict(method="hydra", tree="medusa_small")),
    medusa=dict(medusa=dict(method="medusa", tree="chain:3")),
    kangaroo=dict(kangaroo=dict(method="kangaroo")),
)


def sub_arg(arg: str, job: str) -> str | None:
    """The own arg of another quickstart job when `arg` asks for it (`job` or "job,k=v,..."), else None: "toy"
    (configs/toy_quickstart.py) or "drafters" (`drafter_configs`)."""
    head, _, rest = arg.partition(",")
    return rest if head == job else None


class DrafterRecipe(NamedTuple):
    """The quickstart's drafter recipe for one model, everything in the cache: self-distillation sets made in
    order (a later one may read an earlier one's replies), joined into one set, and the Hydra heads trained on it."""

    sets: dict  # name -> (selfdistill config, its directory)
    combined: str  # the joined set's directory (the only set's own when there is one)
    train: ml_collections.ConfigDict  # the heads' training config (data.source is `combined`)
    heads: str  # the heads' workdir


def drafter_configs(arg=None) -> DrafterRecipe:
    """The drafter recipe for the quickstart's model (docs/benchmarks.md, "Trained drafters"): the `tasks` set (the
    suite's six kinds of request over library text), a `self` set (requests the target writes) and a `self_tasks`
    set (the suite's prose requests over the `self` set's replies), then Hydra heads on the three together, on
    windows from each reply's root. 26.8 minutes end to end on a 2-core CPU (docs/benchmarks.md);
    self_prompts=0 (which needs self_tasks=0) keeps to the `tasks` set."""
    args = config_lib.parse_arg(arg, model="smollm2-135m-instruct", num_prompts=240, self_prompts=120,
                                self_tasks=240, max_new_tokens=128, steps=400)
    if args.self_tasks and not args.self_prompts:
        raise config_lib.ConfigError(f"config arg self_tasks={args.self_tasks} needs self_prompts > 0: its passages "
                                     "are the self set's replies")
    sizes = dict(tasks=args.num_prompts, self=args.self_prompts, self_tasks=args.self_tasks)
    sets = {}
    for name, num_prompts in sizes.items():
        if not num_prompts:
            continue
        data = selfdistill_config.get_config(f"small,target={args.model},num_prompts={num_prompts},"
                                             f"max_new_tokens={args.max_new_tokens},batch_size=16")
        data.prompt_set, data.progress_bar = name, False
        if name == "self_tasks":
            data.passages_from = sets["self"][1]
        sets[name] = (data, zoo.drafter_dir(args.model, "selfdistill" if name == "tasks" else f"selfdistill_{name}"))
    combined = (next(iter(sets.values()))[1] if len(sets) == 1
                else zoo.drafter_dir(args.model, "selfdistill_" + "_".join(sets)))
    train = hydra_config.get_config(f"steps={args.steps}")
    train.target_workdir = args.model
    train.data.source = combined
    train.train.progress_bar = False
    return DrafterRecipe(sets, combined, train, zoo.drafter_dir(args.model, "hydra"))


def trained_heads(model: str) -> str:
    """The recipe's Hydra heads for `model` when a finished run is in the cache, else ''."""
    if model not in zoo.ZOO:
        return ""
    workdir = zoo.drafter_dir(model, "hydra")
    return workdir if checkpoint.finished(workdir) else ""
