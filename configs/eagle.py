"""An EAGLE-style feature drafter for a frozen target, trained on the target's own replies (a self-distillation
set with the target's hidden states; see training/selfdistill.py).

  python -m launch.selfdistill --config=configs/selfdistill.py:small --out=/tmp/sd
  python -m launch.train --config=configs/eagle.py --workdir=/tmp/eagle --config.data.source=/tmp/sd \
      --config.target_workdir=smollm2-135m-instruct
  python -m launch.decode --model=smollm2-135m-instruct --method=eagle --draft_workdir=/tmp/eagle

The run's `model` section and tokenizer are the target's (from target_workdir, a workdir or a zoo name); its
checkpoints hold the drafter's parameters only, and `draft_vocab.npy` the draft vocabulary.
arg: layers (decoder layers), vocab (draft vocabulary size, 0: all), unroll (draft depths trained), steps.
"""

from configs import lm
from jaxspec import config as config_lib
from jaxspec.training.train_config import drafter_schedule, eagle_defaults


def get_config(arg=None):
    args = config_lib.parse_arg(arg, layers=1, vocab=8192, unroll=2, steps=600)
    config = lm.get_config("tiny")
    config.target_workdir = "smollm2-135m-instruct"
    config.data.source = ""  # required: --config.data.source=DIR, a self-distillation set
    config.data.seq_len = 255
    config.data.batch_size = 4
    config.data.val_fraction = 0.05
    config.eagle = eagle_defaults()
    config.eagle.num_layers = args.layers
    config.eagle.draft_vocab = args.vocab
    config.eagle.unroll = args.unroll
    drafter_schedule(config.train, "eagle", args.steps, warmup_cap=50)
    t = config.train
    t.weight_decay = 0.0
    t.log_every, t.eval_every, t.eval_batches = 20, 200, 4
    return config
