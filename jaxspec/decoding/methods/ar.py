"""Autoregressive decoding: one token per target forward, the baseline every method must reproduce."""

from __future__ import annotations

import dataclasses

from jaxspec.decoding import methods
from jaxspec.decoding.method import Method, Target


@methods.register
@dataclasses.dataclass(frozen=True)
class Autoregressive(Method):
    name = "ar"

    def build(self, target: Target, **objects):
        return None, None
