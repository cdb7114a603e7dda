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
"""

import ml_collections

from jaxspec import config as config_lib
from jaxspec.eval.suite_eval import suite_eval_defaults


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
    return config
