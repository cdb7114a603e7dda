"""Kangaroo self-drafting (Liu et al., 2024): the target's first k layers plus a small trained adapter, over the
target's own LM head, draft for the target (jaxspec/models/kangaroo.py); the full target verifies, so the output
is the target's. Double early exit: the draft exits the layer stack at k, and a branch stops once the draft's top
probability falls below `confidence_threshold` (as the paper's drafting code: the unconfident token is still
proposed, and drafting stops after it; `ModelDrafter.keep_unconfident`). Train the adapter with

  python -m launch.train_kangaroo --config=configs/kangaroo.py --workdir=/tmp/kangaroo --config.data=/tmp/sd
  python -m launch.decode --model=smollm2-135m-instruct --method=kangaroo --draft_workdir=/tmp/kangaroo ...
"""

from __future__ import annotations

import dataclasses

from jaxspec.decoding import methods
from jaxspec.decoding.method import ModelDrafting, Target
from jaxspec.errors import InputError
from jaxspec.models import kangaroo


@methods.register
@dataclasses.dataclass(frozen=True)
class Kangaroo(ModelDrafting):
    """`draft_workdir`: a `launch.train_kangaroo` run for this target (or pass `adapter_params` to `build` /
    `api.generate`); the exit layer is the adapter's. `confidence_threshold` 0.6 and the chain of 6 are the
    defaults of the paper's drafting code (its threshold and speculative steps); the stop makes a long chain
    cheap, since a depth no row is still confident at is not run."""

    name = "kangaroo"
    needs = "a trained Kangaroo adapter"
    objects = ("adapter_params",)
    default_tree = "chain:6"
    draft_workdir: str = ""
    confidence_threshold: float = 0.6

    def __post_init__(self):
        super().__post_init__()
        self.check(isinstance(self.draft_workdir, str), "draft_workdir", "a workdir path (a launch.train_kangaroo "
                   "run)")

    def build(self, target: Target, adapter_params=None):
        if target.model.layout != "standard":
            raise InputError(f"method 'kangaroo' shares the target's parameters in the standard layout; the target "
                             f"has layout={target.model.layout!r} (pass the model and params before for_decoding)")
        if adapter_params is None:
            if not self.draft_workdir:
                raise InputError("method 'kangaroo' needs a trained Kangaroo adapter: draft_workdir "
                                 "(--draft_workdir, a launch.train_kangaroo run), or the adapter_params object")
            from jaxspec.training.kangaroo import load_adapter

            adapter_params = load_adapter(self.draft_workdir, target.params, target.model.model_cfg)
        cfg = target.model.model_cfg
        exit_layer = kangaroo.check_adapter_fits(target.params, cfg, adapter_params)
        return self.model_drafter(kangaroo.draft_model(cfg, exit_layer),
                                  kangaroo.draft_params(target.params, adapter_params), keep_unconfident=True)
