"""Collectives in compiled HLO text: what communicates, how much, and over how many devices.

Used by the tests (LASP-2 must compile to exactly one all-gather of fixed size) and by the sequence-parallel
benchmark (communication bytes per layer). Reads `jax.jit(f).lower(...).compile().as_text()`. A collective
inside a loop body is listed once; unroll loops when counting them.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from jaxspec.errors import InputError

COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")

_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVE_OPS) + r")(?P<start>-start)?\((?P<rest>.*)$"
)
_ARRAY_SHAPE = re.compile(r"\b(?P<dtype>pred|[a-z]+\d+[a-z0-9]*)\[(?P<dims>[\d,]*)\]")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<groups>\d+),(?P<size>\d+)\]")


class Collective(NamedTuple):
    op: str  # one of COLLECTIVE_OPS
    result_bytes: int  # bytes of the result on one device
    group_size: int  # devices taking part in one group (collective-permute: 2)
    shapes: tuple[str, ...]  # result array shapes as printed, e.g. "f32[4,1,2,17]"

    @property
    def bytes_per_device(self) -> float:
        """Bytes one device sends under the usual ring/bandwidth-optimal algorithms."""
        n = self.group_size
        if self.op == "collective-permute":
            return float(self.result_bytes)
        if self.op == "all-reduce":
            return 2.0 * (n - 1) / n * self.result_bytes
        if self.op == "reduce-scatter":
            return float((n - 1) * self.result_bytes)
        return (n - 1) / n * self.result_bytes  # all-gather, all-to-all


def _dtype_bytes(dtype: str) -> int:
    if dtype == "pred":
        return 1
    bits = int(re.match(r"[a-z]+(\d+)", dtype).group(1))
    return max(1, bits // 8)


def _array_bytes(dtype: str, dims: str) -> int:
    count = 1
    for d in filter(None, dims.split(",")):
        count *= int(d)
    return count * _dtype_bytes(dtype)


def _group_size(op: str, attributes: str) -> int:
    if op == "collective-permute":
        return 2
    explicit = _EXPLICIT_GROUPS.search(attributes)
    if explicit:
        return len([d for d in explicit.group("first").split(",") if d])
    iota = _IOTA_GROUPS.search(attributes)
    if iota:
        return int(iota.group("size"))
    raise InputError(f"cannot read the replica groups of this {op}: {attributes[:200]!r}")


def hlo_collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction in `hlo_text`, in order (async `-start` counted, `-done` skipped)."""
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        arrays = _ARRAY_SHAPE.findall(match.group("shape"))
        sizes = [_array_bytes(dtype, dims) for dtype, dims in arrays]
        # An async start returns (inputs..., outputs..., scratch); its payload is its largest array.
        result_bytes = max(sizes) if match.group("start") else sum(sizes)
        shapes = tuple(f"{dtype}[{dims}]" for dtype, dims in arrays)
        op = match.group("op")
        found.append(Collective(op, result_bytes, _group_size(op, line), shapes))
    return found
