"""Train a Kangaroo adapter (a shallow exit of the target plus one attention sub-block) on a self-distillation set
of the target.

  python -m launch.selfdistill --config=configs/selfdistill.py:small --out=/tmp/sd       # the target's replies
  python -m launch.train_kangaroo --config=configs/kangaroo.py --workdir=/tmp/kangaroo --config.data=/tmp/sd
  python -m launch.decode --model=smollm2-135m-instruct --method=kangaroo --draft_workdir=/tmp/kangaroo --prompt=...

A workdir that holds a checkpoint resumes from it (with the same config). Prints the held-out next-token loss
and top-1 agreement with the target of the untrained draft (the plain shallow exit) and of the trained one.
"""

from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags

from jaxspec import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/kangaroo.py:exit_layer=2",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, config.json and kangaroo_metrics.json")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 0.0, "stop (with a checkpoint) once training has taken this long; "
                                  "a later run resumes (0: no limit)")
flags.mark_flags_as_required(["config", "workdir"])


@cli.error_boundary("workdir")
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_libraries()
    from jaxspec.decoding import api
    from jaxspec.errors import InputError
    from jaxspec.training import kangaroo

    config = _CONFIG.value
    kangaroo.validate_config(config)  # a bad value ends here, before the target loads
    if _MAX_MINUTES.value < 0:
        raise InputError(f"--max_minutes={_MAX_MINUTES.value} must be >= 0 (0: no limit)")
    start = time.perf_counter()
    target = api.load(config.target)
    arrays = kangaroo.read_set(config, target.model.model_cfg, target.workdir)
    out = kangaroo.train(config, target.model.model_cfg, target.params, arrays, _WORKDIR.value,
                         max_seconds=60 * _MAX_MINUTES.value or None, log=lambda line: print(line, flush=True))
    for name in ("unadapted", "adapted"):
        score = out[name]
        print(f"{name}: held-out loss {score['loss']:.4f}, top-1 agreement with the target {score['agreement']:.4f} "
              f"over {score['positions']} positions", flush=True)
    print(f"step {out['step']}, {time.perf_counter() - start:.0f} s; saved to {_WORKDIR.value}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_config_flags)
