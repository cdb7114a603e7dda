"""The quickstart: a real model of the zoo on the offline prompt suite, autoregressive decoding against every
method that needs no training, per category.

  python -m launch.quickstart                                   # SmolLM2-135M-Instruct, 3 prompts per category
  python -m launch.quickstart --arg=model=gemma3-270m,per_category=2
  python -m launch.quickstart --arg=toy            # the trained-from-scratch toy (configs/toy_quickstart.py)

arg: model (a zoo name or a workdir), per_category (suite prompts per category), max_new_tokens, batch_size.

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
                                batch_size=1)
    config = suite_eval_defaults()
    config.target = args.model
    config.suite.per_category = args.per_category
    config.decode.max_new_tokens = args.max_new_tokens
    config.decode.batch_size = args.batch_size
    config.methods = dict(
        lookup=dict(method="lookup", tree="chain:4"),
        layerskip=dict(method="layerskip", tree="chain:3"),
        ngram=dict(method="ngram", tree="chain:4"),
        recycling=dict(method="recycling", tree="branching:2,1,1"),
    )
    eagle = trained_eagle(args.model)
    if eagle:  # made by `python -m launch.quickstart --arg=drafters` (see launch/quickstart.py)
        config.methods.eagle = dict(method="eagle", draft_workdir=eagle, tree="chain:4")
        config.methods.eagle2 = dict(method="eagle", draft_workdir=eagle, expand=4, depth=4, nodes=6)
    return config


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
