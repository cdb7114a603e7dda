"""The quickstart: a real model of the zoo on the offline prompt suite, autoregressive decoding against every
method that needs no training, per category.

  python -m launch.quickstart                                   # SmolLM2-135M-Instruct, 3 prompts per category
  python -m launch.quickstart --arg=model=gemma3-270m,per_category=2
  python -m launch.quickstart --arg=toy            # the trained-from-scratch toy (configs/toy_quickstart.py)

arg: model (a zoo name or a workdir), per_category (suite prompts per category), max_new_tokens, batch_size,
scan_layers (1: the target's repeated layers run as one scan, so each method's loop compiles ~2-3x faster and
steps 1.1-1.4x slower; same tokens);
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

Trained drafters: once `python -m launch.quickstart --arg=drafters` has made the EAGLE drafter of the model
(`drafter_configs`: a self-distillation set and a drafter trained on it, in the cache), the table also shows
EAGLE on a 4-draft chain and EAGLE-2's dynamic tree.
"""

import ml_collections

from configs import eagle as eagle_config
from configs import selfdistill as selfdistill_config
from jaxspec import config as config_lib
from jaxspec import zoo
from jaxspec.eval.suite_eval import suite_eval_defaults
from jaxspec.training import checkpoint


def get_config(arg=None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, model="smollm2-135m-instruct", per_category=3, max_new_tokens=64,
                                batch_size=1, scan_layers=False, methods="default", **{name: "" for name in TRAINED})
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
    eagle = args.eagle or trained_eagle(args.model)
    if eagle:  # made by `python -m launch.quickstart --arg=drafters` (see launch/quickstart.py)
        # The trees that paid best for a self-distilled drafter on SmolLM2 (docs/benchmarks.md, "Trained
        # drafters"): deeper chains and wider dynamic trees add almost no tau there and cost a larger forward.
        config.methods.eagle = dict(method="eagle", draft_workdir=eagle, tree="chain:2")
        config.methods.eagle2 = dict(method="eagle", draft_workdir=eagle, expand=3, depth=3, nodes=4)
    for name, rows in TRAINED.items():
        if name != "eagle" and args[name]:
            config.methods.update({row: dict(fields, draft_workdir=args[name]) for row, fields in rows.items()})
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
# best on SmolLM2 (docs/benchmarks.md, "Trained drafters").
TRAINED = dict(
    eagle=None,  # the two rows above (also made by the quickstart's own drafter recipe)
    eagle3=dict(eagle3=dict(method="eagle", tree="chain:2"),
                eagle3_dyn=dict(method="eagle", expand=3, depth=3, nodes=4)),
    hydra=dict(hydra=dict(method="hydra", tree="chain:3"),
               hydra_dyn=dict(method="hydra", expand=3, depth=3, nodes=4)),
    medusa=dict(medusa=dict(method="medusa", tree="chain:3")),
    kangaroo=dict(kangaroo=dict(method="kangaroo")),
)


def sub_arg(arg: str, job: str) -> str | None:
    """The own arg of another quickstart job when `arg` asks for it (`job` or "job,k=v,..."), else None: "toy"
    (configs/toy_quickstart.py) or "drafters" (`drafter_configs`)."""
    head, _, rest = arg.partition(",")
    return rest if head == job else None


def drafter_configs(arg=None) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict, str, str]:
    """The drafter recipe for the quickstart's model: (self-distillation config, EAGLE training config, the set's
    directory, the drafter's workdir), both in the cache. A few minutes each on a 2-core CPU."""
    args = config_lib.parse_arg(arg, model="smollm2-135m-instruct", num_prompts=160, max_new_tokens=128,
                                steps=300)
    data = selfdistill_config.get_config(f"small,target={args.model},num_prompts={args.num_prompts},"
                                         f"max_new_tokens={args.max_new_tokens},batch_size=16")
    data.progress_bar = False
    train = eagle_config.get_config(f"steps={args.steps}")
    train.target_workdir = args.model
    train.data.source = zoo.drafter_dir(args.model, "selfdistill")
    train.data.seq_len = data.seq_len - 1
    train.train.progress_bar = False
    return data, train, train.data.source, zoo.drafter_dir(args.model, "eagle")


def trained_eagle(model: str) -> str:
    """The recipe's EAGLE drafter for `model` when a finished run is in the cache, else ''."""
    if model not in zoo.ZOO:
        return ""
    workdir = zoo.drafter_dir(model, "eagle")
    return workdir if checkpoint.finished(workdir) else ""
