"""What a forward over new tokens needs to know besides the tokens: mode, positions, masks."""

from __future__ import annotations

import dataclasses
import enum

import jax


class Mode(str, enum.Enum):
    """How a forward treats its new tokens (see `Step`). A str enum: a member equals and hashes like its value."""

    FULL = "full"
    EXTEND = "extend"
    TREE = "tree"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Step:
    """Mode.FULL: causal forward without state (training, scoring).
    Mode.EXTEND: the T new tokens follow the committed context as a chain and are committed at once;
        `valid[b, t]` is False on right padding (rows may add different counts).
    Mode.TREE: the T new tokens are tree nodes; `mask[b, i, j]` = j is i or an ancestor of i; their
        per-node state is returned as pending for `commit`.
    """

    mode: Mode
    positions: jax.Array  # [B, T] absolute positions (committed length + depth)
    lengths: jax.Array | None = None  # [B] committed length before this forward
    mask: jax.Array | None = None  # [B, T, T] bool
    parents: jax.Array | None = None  # [B, T] int32 (tree mode)
    fresh: bool = False  # extend into an empty state: attention needs no cache reads (dense/block-sparse prefill)
    valid: jax.Array | None = None  # [B, T] bool
