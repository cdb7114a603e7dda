"""Medusa heads: extra heads on the target's last hidden state guess the next tokens; a tree of their top-k."""

from __future__ import annotations

import dataclasses

from jaxspec.decoding import methods
from jaxspec.decoding.drafters import MedusaDrafter
from jaxspec.decoding.method import Speculative, Target, restore_drafter_run
from jaxspec.errors import InputError
from jaxspec.models.heads import MedusaHeads, lm_head_kernel


def load_heads(workdir: str, target: Target) -> tuple[MedusaHeads, dict]:
    """The heads a Medusa training run left in `workdir`, refused when trained for another target."""
    params, cfg, _ = restore_drafter_run(workdir, target, "medusa", "a Medusa heads")
    m = cfg.medusa
    return MedusaHeads(m.num_heads, cfg.model.d_model, cfg.model.vocab_size, m.num_layers, m.share_lm_head), params


@methods.register
@dataclasses.dataclass(frozen=True)
class Medusa(Speculative):
    """`draft_workdir`: a Medusa heads training run for this target (or pass `heads` and `heads_params`)."""

    name = "medusa"
    needs = "trained Medusa heads"
    objects = ("heads", "heads_params")
    default_tree = "medusa_small"
    draft_workdir: str = ""

    def build(self, target: Target, heads: MedusaHeads | None = None, heads_params=None):
        if heads is None and heads_params is None:
            if not self.draft_workdir:
                raise InputError("method 'medusa' needs trained heads: draft_workdir (--draft_workdir, a Medusa "
                                 "heads run), or heads and heads_params")
            heads, heads_params = load_heads(self.draft_workdir, target)
        if heads is None or heads_params is None:
            raise InputError("method 'medusa' needs both heads and heads_params")
        cfg = target.model.model_cfg
        if heads.d_model != cfg.d_model or heads.vocab_size != cfg.vocab_size:
            raise InputError(f"Medusa heads were built for d_model={heads.d_model}, vocab_size={heads.vocab_size}; "
                             f"the target has d_model={cfg.d_model}, vocab_size={cfg.vocab_size}: heads trained "
                             "for another target")
        dparams = {"heads": heads_params}
        if heads.share_lm_head:
            dparams["lm_head"] = lm_head_kernel(target.params, cfg)
        return MedusaDrafter(heads, self.token_tree()), dparams
