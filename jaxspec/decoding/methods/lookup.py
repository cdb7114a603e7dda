"""Prompt lookup: the n-grams of the context itself are the drafts (no model, no training)."""

from __future__ import annotations

import dataclasses

from jaxspec.decoding import methods
from jaxspec.decoding.drafters import PromptLookupDrafter
from jaxspec.decoding.method import Speculative, Target, is_int


@methods.register
@dataclasses.dataclass(frozen=True)
class PromptLookup(Speculative):
    """Find the latest earlier occurrence of the last n-gram (longest n first, max_ngram down to min_ngram)
    and draft what followed it."""

    name = "lookup"
    default_tree = "chain:4"
    min_ngram: int = 1
    max_ngram: int = 3

    def __post_init__(self):
        super().__post_init__()
        self.check(self.token_tree().is_chain, "tree", "a chain (prompt lookup drafts one continuation)")
        self.check(is_int(self.min_ngram) and self.min_ngram >= 1, "min_ngram", "a positive integer")
        self.check(is_int(self.max_ngram) and self.max_ngram >= self.min_ngram, "max_ngram",
                   f"an integer >= min_ngram={self.min_ngram}")

    def build(self, target: Target, **objects):
        return PromptLookupDrafter(self.token_tree(), max_ngram=self.max_ngram, min_ngram=self.min_ngram), ()
