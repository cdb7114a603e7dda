"""A self-distillation set: the target's own greedy replies to standard-library instructions with its hidden
states, for training drafters (jaxspec/training/selfdistill.py).

  python -m launch.selfdistill --config=configs/selfdistill.py:small --out=/tmp/sd
  python -m launch.selfdistill --config=configs/selfdistill.py:small,num_prompts=32,max_new_tokens=64 --out=/tmp/sd
  python -m launch.selfdistill --config=configs/selfdistill.py --out=/tmp/sd --config.feature_layers="(2,15,27)"

arg: preset (small: 64 prompts of up to 96 new tokens in 384-token examples, minutes on a CPU; default: 2048
prompts of up to 256 new tokens in 768-token examples, for an accelerator), target (a zoo name or a workdir), and
num_prompts, max_new_tokens, batch_size (0: the preset's). EAGLE-3 style drafters also read a low, a middle and
a high layer: set feature_layers (for SmolLM2-135M's 30 layers, e.g. (2, 15, 27)). The instructions
(jaxspec/training/instructions.py) are the "tasks" set, the suite's six kinds of request over library text;
`--config.prompt_set=docs` gives the earlier set of instructions about the library's own docstrings and code;
`--config.prompt_set=self` has the target write the requests itself (jaxspec/training/self_requests.py, sampled
once and stored in the set's requests.json); `--config.prompt_set=self_tasks --config.passages_from=DIR` asks the
suite's prose requests over the replies of such a set (jaxspec/training/passage_tasks.py).
`launch.selfdistill --combine=A,B --out=C` joins sets of one target.
"""

import ml_collections

from jaxspec import config as config_lib
from jaxspec.training import selfdistill

PRESETS = {
    # num_prompts, max_new_tokens, seq_len, batch_size, max_prompt_chars
    "small": (64, 96, 384, 8, 800),
    "default": (2048, 256, 768, 16, 1500),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, preset="default", target="smollm2-135m-instruct", num_prompts=0,
                                max_new_tokens=0, batch_size=0)
    if args.preset not in PRESETS:
        raise config_lib.ConfigError(f"configs/selfdistill.py: preset={args.preset!r} is not one of {sorted(PRESETS)}")
    config = selfdistill.config_defaults()
    config.target = args.target
    (config.num_prompts, config.max_new_tokens, config.seq_len, config.batch_size,
     config.max_prompt_chars) = PRESETS[args.preset]
    for key in ("num_prompts", "max_new_tokens", "batch_size"):
        if args[key]:
            config[key] = args[key]
    selfdistill.validate_config(config)
    return config
