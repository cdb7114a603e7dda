"""The toy quickstart (`--arg=toy`): a MatFormer target trained from scratch, its Medusa heads and a draft model,
then every decoding method.

  python -m launch.quickstart --arg=toy        # ~/.cache/jaxspec/quickstart-toy; minutes on a 2-core CPU
  python -m launch.sweep --config=configs/toy_quickstart.py:tiny --workdir=/tmp/qs   # seconds, a smoke test

Runs, in order (each in its own sub-workdir; `run:NAME` refers to an earlier one):
  target   MatFormer LM (FFN fractions 1/4, 1/2, 1) on the Python standard library's source
  medusa   three Medusa heads on the frozen target
  draft    a small LM with the target's byte vocabulary
  compare  autoregressive decoding against every speculative method on held-out prompts, greedy

The trees are the ones that paid off for this model on a 2-core CPU (configs/sweeps/ ablates them): short
chains, because verifying a node costs a noticeable share of a forward for a model this small.

arg: size (default | tiny | small, see configs/sweeps/common.py) and methods ("all" or some of
draft+medusa+matformer+layerskip+lookup; the medusa and draft runs happen only when their method is
compared), e.g. "tiny,methods=lookup+matformer".
"""

from configs.sweeps import common
from jaxspec import config as config_lib

METHODS = ("draft", "medusa", "matformer", "layerskip", "lookup")


def _arg(arg):
    args = config_lib.parse_arg(arg, size="default", methods="all")
    common.size_settings(args.size, "configs/toy_quickstart.py")
    methods = METHODS if args.methods == "all" else tuple(args.methods.split("+"))
    if not methods or any(m not in METHODS for m in methods):
        raise config_lib.ConfigError(f"configs/toy_quickstart.py: methods={args.methods!r} is not allowed: "
                                     f"'all' or names from {METHODS} joined by '+'")
    return args.size, methods


def get_config(arg=None):
    """The target's training config, with the comparison of the methods `arg` selects."""
    size, methods = _arg(arg)
    config = common.target_config(size, "configs/toy_quickstart.py")
    every = dict(
        draft=dict(method="draft", draft_workdir="run:draft", tree="chain:2"),
        medusa=dict(method="medusa", draft_workdir="run:medusa", tree="chain:3"),
        matformer=dict(method="matformer", granularity=0, tree="chain:2"),
        layerskip=dict(method="layerskip", skip_layers=(config.model.n_layers // 2,), tree="chain:2"),
        lookup=dict(method="lookup", tree="chain:3"),
    )
    config.eval.methods = {name: every[name] for name in methods}
    return config


def sweep(add, arg=None):
    size, methods = _arg(arg)
    add(name="target", **common.TARGET_RUN)
    if "medusa" in methods:
        add(name="medusa", **common.medusa_run(size))
    if "draft" in methods:
        add(name="draft", **common.draft_run(size))
    add(name="compare", **common.evaluation())
