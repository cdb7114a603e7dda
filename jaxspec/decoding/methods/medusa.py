"""Medusa heads: extra heads on the target's last hidden state guess the next tokens; a tree of their top-k.

Heads trained on a draft vocabulary (`medusa.draft_vocab` = N > 0; the run saves it as `draft_vocab.npy`) score
only those N ids: the drafter maps the rows it picks back to target ids, and a sampled draft's distribution is 0
outside them. Runs without a saved vocabulary score the whole vocabulary.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxspec.decoding import methods
from jaxspec.decoding.drafters import MedusaDrafter
from jaxspec.decoding.method import DynamicTreeDrafting, Target, check_vocab_ids, restore_drafter_run
from jaxspec.errors import InputError
from jaxspec.models.eagle import target_side
from jaxspec.models.heads import MedusaHeads, lm_head_kernel


def load_heads(workdir: str, target: Target) -> tuple[MedusaHeads, dict, np.ndarray | None]:
    """(heads, their params, draft vocabulary or None for the whole one) of a Medusa training run, refused when
    trained for another target."""
    from jaxspec.training import checkpoint  # as in restore_drafter_run: only a saved run loads training code

    trimmed = bool(checkpoint.load_config(workdir).get("medusa", {}).get("draft_vocab", 0))
    params, cfg, vocab = restore_drafter_run(workdir, target, "medusa", "a Medusa heads", with_vocab=trimmed)
    m = cfg.medusa
    outputs = cfg.model.vocab_size if vocab is None else len(vocab)
    return MedusaHeads(m.num_heads, cfg.model.d_model, outputs, m.num_layers, m.share_lm_head), params, vocab


@methods.register
@dataclasses.dataclass(frozen=True)
class Medusa(DynamicTreeDrafting):
    """`draft_workdir`: a Medusa heads training run for this target (or pass `heads`, `heads_params` and, for heads
    trained on a draft vocabulary, `vocab_ids`). `expand` > 0 drafts EAGLE-2's dynamic tree over the heads' scores
    (depth at most the number of heads) in place of the static `tree`."""

    name = "medusa"
    needs = "trained Medusa heads"
    objects = ("heads", "heads_params", "vocab_ids")
    default_tree = "medusa_small"
    draft_workdir: str = ""

    def build(self, target: Target, heads: MedusaHeads | None = None, heads_params=None, vocab_ids=None):
        if heads is None and heads_params is None:
            if not self.draft_workdir:
                raise InputError("method 'medusa' needs trained heads: draft_workdir (--draft_workdir, a Medusa "
                                 "heads run), or heads and heads_params")
            heads, heads_params, vocab_ids = load_heads(self.draft_workdir, target)
        if heads is None or heads_params is None:
            raise InputError("method 'medusa' needs both heads and heads_params")
        cfg = target.model.model_cfg
        if heads.d_model != cfg.d_model or (vocab_ids is None and heads.vocab_size != cfg.vocab_size):
            raise InputError(f"Medusa heads were built for d_model={heads.d_model}, vocab_size={heads.vocab_size}; "
                             f"the target has d_model={cfg.d_model}, vocab_size={cfg.vocab_size}: heads trained "
                             "for another target (or on a draft vocabulary: pass its vocab_ids)")
        if vocab_ids is None:
            dparams = {"heads": heads_params}
            if heads.share_lm_head:
                dparams["lm_head"] = lm_head_kernel(target.params, cfg)
            return MedusaDrafter(heads, self.token_tree(), dynamic=self.dynamic), dparams
        side = target_side(target.params, cfg, check_vocab_ids(vocab_ids, cfg.vocab_size, heads.vocab_size))
        dparams = {"heads": heads_params, "vocab_ids": side["vocab_ids"]}
        if heads.share_lm_head:
            dparams["lm_head"] = side["head_t"].T  # the LM head's columns of the draft vocabulary
        return MedusaDrafter(heads, self.token_tree(), vocab_size=cfg.vocab_size, dynamic=self.dynamic), dparams
