"""An EAGLE-style feature drafter for a frozen target, trained on the target's own replies (a self-distillation
set with the target's hidden states; see training/selfdistill.py).

  python -m launch.selfdistill --config=configs/selfdistill.py:small --out=/tmp/sd
  python -m launch.train --config=configs/eagle.py --workdir=/tmp/eagle --config.data.source=/tmp/sd \
      --config.target_workdir=smollm2-135m-instruct
  python -m launch.decode --model=smollm2-135m-instruct --method=eagle --draft_workdir=/tmp/eagle

EAGLE-3 (`eagle3=1`): the drafter fuses the target's residual streams after layers 2, 15 and 27 (SmolLM2's
30 layers; `models.eagle.eagle3_layers`) instead of reading its final feature, trains on token prediction
alone (no feature regression) and over three unrolled draft depths; the self-distillation set must store those
layers:

  python -m launch.selfdistill --config=configs/selfdistill.py:small --out=/tmp/sd3 --config.feature_layers="(2,15,27)"
  python -m launch.train --config=configs/eagle.py:eagle3=1 --workdir=/tmp/eagle3 --config.data.source=/tmp/sd3

The run's `model` section and tokenizer are the target's (from target_workdir, a workdir or a zoo name); its
checkpoints hold the drafter's parameters only, and `draft_vocab.npy` the draft vocabulary.
arg: layers (decoder layers), vocab (draft vocabulary size, 0: all), unroll (draft depths trained; 0: 2, or 3
with eagle3), steps, eagle3 (0 or 1).
"""

from configs import lm
from jaxspec import config as config_lib
from jaxspec.models.eagle import eagle3_layers
from jaxspec.training.train_config import drafter_schedule, eagle_defaults

SMOLLM2_LAYERS = 30  # the default target's depth (EAGLE-3's layers for another target: --config.eagle.feature_layers)


def get_config(arg=None):
    args = config_lib.parse_arg(arg, layers=1, vocab=8192, unroll=0, steps=600, eagle3=False)
    config = lm.get_config("tiny")
    config.target_workdir = "smollm2-135m-instruct"
    config.data.source = ""  # required: --config.data.source=DIR, a self-distillation set
    config.data.seq_len = 255
    config.data.batch_size = 4
    config.data.val_fraction = 0.05
    config.eagle = eagle_defaults()
    config.eagle.num_layers = args.layers
    config.eagle.draft_vocab = args.vocab
    config.eagle.unroll = args.unroll or (3 if args.eagle3 else 2)
    if args.eagle3:
        config.eagle.feature_layers = eagle3_layers(SMOLLM2_LAYERS)
        config.eagle.feature_weight = 0.0  # EAGLE-3 drops the feature regression: tokens alone
    drafter_schedule(config.train, "eagle", args.steps, warmup_cap=50)
    t = config.train
    t.weight_decay = 0.0
    t.log_every, t.eval_every, t.eval_batches = 20, 200, 4
    return config
