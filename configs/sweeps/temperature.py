"""Temperature ablation: every drafter under lossless rejection sampling as the temperature rises (greedy
verification at 0).

  python -m launch.sweep --config=configs/sweeps/temperature.py --workdir=/tmp/temperature          # tiny
  python -m launch.sweep --config=configs/sweeps/temperature.py:size=default,temperatures=0+0.3+0.7+1

Runs: `target`, `medusa`, `draft`, then `temperature=T` per temperature: decoding only, with the quickstart's
methods. Plots tau and speedup against the temperature.
arg: size (see configs/sweeps/common.py), temperatures ("+"-separated).
"""

from configs import toy_quickstart as quickstart
from configs.sweeps import common
from jaxspec import config as config_lib


def _arg(arg):
    args = config_lib.parse_arg(arg, size="tiny", temperatures="0+0.5+1")
    temperatures = common.plus_list(args.temperatures, float, key="temperatures",
                                    where="configs/sweeps/temperature.py", minimum=0, allowed="non-negative numbers")
    return args.size, temperatures


def get_config(arg=None):
    size, _ = _arg(arg)
    config = quickstart.get_config(f"size={size}")
    config.plots = common.tau_and_speedup_plots("temperature", "method", "")
    return config


def sweep(add, arg=None):
    size, temperatures = _arg(arg)
    add(name="target", **common.TARGET_RUN)
    add(name="medusa", **common.medusa_run(size))
    add(name="draft", **common.draft_run(size))
    for t in temperatures:
        add(name=f"temperature={t:g}", **common.evaluation(**{"eval.temperature": t}))
