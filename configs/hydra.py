"""Hydra heads (sequentially dependent draft heads) for a frozen target, trained on the target's own replies (a
self-distillation set with its final hidden states; see training/selfdistill.py). Teacher forcing: head k reads the
stored feature f_t and the embeddings of the reply tokens x_{t+1} .. x_{t+k+1}, which are the target's own greedy
tokens, i.e. exactly what the drafter holds on the path it drafts.

  python -m launch.selfdistill --config=configs/selfdistill.py:small --out=/tmp/sd
  python -m launch.train --config=configs/hydra.py --workdir=/tmp/hydra --config.data.source=/tmp/sd \
      --config.target_workdir=smollm2-135m-instruct
  python -m launch.decode --model=smollm2-135m-instruct --method=hydra --draft_workdir=/tmp/hydra

The run's `model` section and tokenizer are the target's (from target_workdir, a workdir or a zoo name); its
checkpoints hold the heads' parameters only, and `draft_vocab.npy` the draft vocabulary of the LM head.
arg: heads (num_heads), layers (residual blocks per head), vocab (draft vocabulary size, 0: all), steps, window,
teacher (hydra.teacher: the weight of the target's own distribution against its greedy token, 0 to 1).
window=reply (the default) trains on windows that start at each reply's root (data.window="reply"): 8 windows of
129 positions a step, each holding a whole reply of up to 128 tokens and no prompt, whose positions carry no loss.
window=start gives the earlier setting: 4 windows of 256 positions from each example's first token, most of them
prompt, and replies cut where prompt + reply pass 256.
"""

from configs import lm
from jaxspec import config as config_lib
from jaxspec.training.train_config import drafter_schedule, hydra_defaults

# window -> (data.seq_len, data.batch_size): about the same positions a step either way.
WINDOWS = {"reply": (128, 8), "start": (255, 4)}


def get_config(arg=None):
    args = config_lib.parse_arg(arg, heads=4, layers=1, vocab=8192, steps=600, window="reply", teacher=0.0)
    if args.window not in WINDOWS:
        raise config_lib.ConfigError(f"configs/hydra.py: window={args.window!r} is not one of {sorted(WINDOWS)}")
    config = lm.get_config("tiny")
    config.target_workdir = "smollm2-135m-instruct"
    config.data.source = ""  # required: --config.data.source=DIR, a self-distillation set
    config.data.window = args.window
    config.data.seq_len, config.data.batch_size = WINDOWS[args.window]
    config.data.val_fraction = 0.05
    config.hydra = hydra_defaults()
    config.hydra.num_heads = args.heads
    config.hydra.num_layers = args.layers
    config.hydra.draft_vocab = args.vocab
    config.hydra.teacher = float(args.teacher)
    drafter_schedule(config.train, "hydra", args.steps, warmup_cap=50)
    t = config.train
    t.weight_decay = 0.0
    t.log_every, t.eval_every, t.eval_batches = 20, 200, 4
    return config
