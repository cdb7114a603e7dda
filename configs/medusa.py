"""Medusa-1 heads on a frozen target checkpoint: head k learns to predict the token k+2 ahead.

  python -m launch.train --config=configs/lm.py:tiny --workdir=/tmp/lm
  python -m launch.train --config=configs/medusa.py:heads=4 --workdir=/tmp/medusa --config.target_workdir=/tmp/lm

or on a self-distillation set (the target's own replies with its final hidden states, `python -m
launch.selfdistill`): the heads then train on the stored features and the target never runs. There they may
score a draft vocabulary only (VocabTrim, as EAGLE and Hydra heads do): the N most frequent reply tokens of the
set, saved as `draft_vocab.npy` beside the heads (`vocab=N` or --config.medusa.draft_vocab=N; corpus runs keep 0).

  python -m launch.train --config=configs/medusa.py:share=True,steps=600 --workdir=/tmp/medusa_sd \
      --config.target_workdir=smollm2-135m-instruct --config.data.source=/tmp/sd --config.data.seq_len=255

The run's `model` section is replaced by the target's (from target_workdir/config.json; on a self-distillation
set its tokenizer too); its checkpoints hold the heads' parameters only, and `target_workdir` (saved in its
config.json) names the backbone.
arg: heads (num_heads), layers (residual blocks per head), share (share_lm_head: the target's LM head), vocab
(draft_vocab, 0: all), steps.
"""

from configs import lm
from jaxspec import config as config_lib
from jaxspec.training.train_config import drafter_schedule, medusa_defaults


def get_config(arg=None):
    args = config_lib.parse_arg(arg, heads=4, layers=1, share=False, vocab=0, steps=300)
    config = lm.get_config("tiny")
    config.target_workdir = ""  # required: --config.target_workdir=DIR (or a zoo name)
    config.medusa = medusa_defaults()
    config.medusa.num_heads = args.heads
    config.medusa.num_layers = args.layers
    config.medusa.share_lm_head = args.share
    config.medusa.draft_vocab = args.vocab
    drafter_schedule(config.train, "medusa", args.steps, warmup_cap=30)
    config.train.medusa_decay = 0.8
    config.train.eval_every = 100
    return config
