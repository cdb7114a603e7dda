"""A Kangaroo adapter for a frozen target (jaxspec/training/kangaroo.py), trained on the target's own replies (a
self-distillation set, configs/selfdistill.py).

  python -m launch.selfdistill --config=configs/selfdistill.py:small --out=/tmp/sd
  python -m launch.train_kangaroo --config=configs/kangaroo.py --workdir=/tmp/kangaroo --config.data=/tmp/sd
  python -m launch.train_kangaroo --config=configs/kangaroo.py:exit_layer=3,steps=200 --workdir=/tmp/k3 \
      --config.data=/tmp/sd
  python -m launch.decode --model=smollm2-135m-instruct --method=kangaroo --draft_workdir=/tmp/kangaroo ...

arg: exit_layer (the draft runs the target's first exit_layer layers; the paper exits after 2 of Vicuna-7B's 32,
and 2 of SmolLM2-135M's 30 is the same share), steps, batch_size, target.
"""

import ml_collections

from jaxspec import config as config_lib
from jaxspec.training import kangaroo


def get_config(arg=None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, exit_layer=2, steps=600, batch_size=8, target="smollm2-135m-instruct")
    config = kangaroo.config_defaults()
    config.update(args.to_dict())
    kangaroo.validate_config(config)
    return config
