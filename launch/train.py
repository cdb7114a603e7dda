"""Train a model from a config file.

  python -m launch.train --config=configs/lm.py:tiny --workdir=/tmp/lm [--config.train.steps=100 ...]

Prints the resolved config and the parameter count, validates every section before compute (a bad value
exits with the key, the value and what is allowed), then trains; a workdir that holds a checkpoint resumes
from its latest step.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from jaxspec import cli
from jaxspec.parallel import distributed
from jaxspec.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/lm.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, config.json and metrics.jsonl")
flags.mark_flags_as_required(["config", "workdir"])


@cli.error_boundary("workdir")
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # checkpointing logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    distributed.maybe_initialize()
    config = trainer.prepare_config(_CONFIG.value)  # a bad value ends here, before any compute
    final = trainer.train(config, _WORKDIR.value)
    print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in sorted(final.items())))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_config_flags)
