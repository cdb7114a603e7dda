"""Static token trees for speculative decoding.

A token tree has K nodes in topological order. ``parents[i]`` is the index of node i's parent, or -1 for
the node that follows the committed context. In a decoding tree node 0 is the single root (the last
emitted token, not yet processed by the model) and every other node's parent lies in ``[0, i)``. A chain
of k drafts is ``parents = (-1, 0, 1, ..., k-1)``.

``TokenTree`` is a frozen, hashable dataclass so it can be a static argument of ``jax.jit``; its derived
arrays are NumPy constants. ``ancestor_mask_jnp`` builds the same mask from traced parents, for trees that
change per step or per batch row.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import InputError
from jaxspec.state import tree_ancestor_mask

# Medusa's published 63-candidate tree for Vicuna-7B ("mc_sim_7b_63"). Each tuple is a path of top-k
# ranks: (0,) is the top-1 token of head 0, (0, 1) the top-2 token of head 1 below it, and so on.
MEDUSA_63: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0),
    (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0),
    (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5),
    (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9),
    (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5),
    (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)  # fmt: skip

# A 7-candidate tree for small models and CPU tests: three guesses for the next token, two below the
# best one, one below the second, and one third-level guess.
MEDUSA_SMALL: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0))

PRESET_CHOICES: dict[str, tuple[tuple[int, ...], ...]] = {
    "medusa_63": MEDUSA_63,
    "medusa_small": MEDUSA_SMALL,
}


def _as_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what} = {value!r} must be an int")
    return int(value)


def validate_parents(parents: Sequence[int], *, single_root: bool = True) -> tuple[int, ...]:
    """Checks a parent array and returns it as a tuple of ints.

    Every node's parent must come before it (topological order) or be -1. With ``single_root`` (decoding
    trees) node 0 is the only node with parent -1; otherwise any node may follow the committed context.
    Accepts a sequence of ints or a concrete 1-D integer array (NumPy or JAX).
    """
    if hasattr(parents, "shape"):
        array = np.asarray(parents)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise InputError(
                f"parents must be a 1-D integer array, got shape {array.shape} dtype {array.dtype}"
            )
        parents = array.tolist()
    values = tuple(_as_int(p, f"parents[{i}]") for i, p in enumerate(parents))
    if not values:
        raise InputError("parents is empty: a token tree needs at least its root node (parents = (-1,))")
    for i, p in enumerate(values):
        if p < -1:
            raise InputError(f"parents[{i}] = {p}: a parent index is -1 (root) or a node index >= 0")
        if p >= i:
            raise InputError(
                f"parents[{i}] = {p}: a node's parent must come before it (parent index < {i}); "
                "list the nodes in topological order"
            )
        if single_root and i > 0 and p == -1:
            raise InputError(
                f"parents[{i}] = -1: a decoding tree has exactly one root, node 0; "
                f"node {i} needs a parent in [0, {i})"
            )
    return values


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True)
class TokenTree:
    """A static decoding tree: node 0 is the root, ``parents[i] < i`` for every other node.

    ``node_rank`` (optional) says which top-k rank fills each node when the drafter ranks candidates per
    depth (Medusa: node i is the ``node_rank[i]``-th best token of head ``depths[i] - 1``). The root's rank
    is 0 and unused. Two trees are equal (and hash equal) when parents and ranks are equal.
    """

    parents: tuple[int, ...]
    node_rank: tuple[int, ...] | None = None

    def __post_init__(self):
        parents = validate_parents(self.parents)
        object.__setattr__(self, "parents", parents)
        if self.node_rank is None:
            return
        ranks = tuple(_as_int(r, f"node_rank[{i}]") for i, r in enumerate(self.node_rank))
        if len(ranks) != len(parents):
            raise InputError(
                f"node_rank has {len(ranks)} entries but the tree has {len(parents)} nodes; "
                "give one rank per node"
            )
        if ranks[0] != 0:
            raise InputError(f"node_rank[0] = {ranks[0]}: the root's rank must be 0")
        seen = set()
        for i in range(1, len(ranks)):
            if ranks[i] < 0:
                raise InputError(f"node_rank[{i}] = {ranks[i]}: ranks are top-k indices, >= 0")
            if (parents[i], ranks[i]) in seen:
                raise InputError(
                    f"node_rank[{i}] = {ranks[i]} repeats a sibling's rank under parent {parents[i]}; "
                    "siblings must have distinct ranks"
                )
            seen.add((parents[i], ranks[i]))
        object.__setattr__(self, "node_rank", ranks)

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def num_drafts(self) -> int:
        """Nodes other than the root: the draft tokens the tree holds."""
        return len(self.parents) - 1

    @functools.cached_property
    def parents_array(self) -> np.ndarray:
        return _read_only(np.asarray(self.parents, dtype=np.int32))

    @functools.cached_property
    def depths(self) -> np.ndarray:
        """Depth of each node: 0 for the root, parent's depth + 1 otherwise."""
        depths = np.zeros(self.num_nodes, dtype=np.int32)
        for i in range(1, self.num_nodes):
            depths[i] = depths[self.parents[i]] + 1
        return _read_only(depths)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @functools.cached_property
    def ancestor_mask(self) -> np.ndarray:
        """Bool [K, K]: ``mask[i, j]`` is True when node j is node i or one of its ancestors.

        Row i is what node i may attend to among the tree's nodes (besides the committed context).
        """
        mask = np.eye(self.num_nodes, dtype=bool)
        for i in range(1, self.num_nodes):
            mask[i] |= mask[self.parents[i]]
        return _read_only(mask)

    @functools.cached_property
    def _children(self) -> tuple[tuple[int, ...], ...]:
        children = [[] for _ in range(self.num_nodes)]
        for i in range(1, self.num_nodes):
            children[self.parents[i]].append(i)
        return tuple(tuple(c) for c in children)

    def children(self, node: int) -> tuple[int, ...]:
        """The children of ``node`` in index order."""
        node = _as_int(node, "node")
        if not 0 <= node < self.num_nodes:
            raise InputError(f"node = {node} is out of range for a tree with {self.num_nodes} nodes")
        return self._children[node]

    @property
    def leaves(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_nodes) if not self._children[i])

    @property
    def root_to_leaf_paths(self) -> list[list[int]]:
        """One node-index list per leaf, root first, in leaf index order."""
        paths = []
        for leaf in self.leaves:
            path = [leaf]
            while self.parents[path[-1]] >= 0:
                path.append(self.parents[path[-1]])
            paths.append(path[::-1])
        return paths

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, self.num_nodes - 1))


def from_choices(choices: Sequence[Sequence[int]]) -> TokenTree:
    """Builds a tree from Medusa-style choices: each choice is a non-empty path of top-k ranks.

    Nodes are ordered by depth, then lexicographically by choice (so siblings come in rank order), with the
    root as node 0. Every proper prefix of a choice must itself be a choice.
    """
    paths = []
    for n, choice in enumerate(choices):
        if isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence):
            raise InputError(f"choices[{n}] = {choice!r} must be a tuple of top-k ranks, e.g. (0, 1)")
        path = tuple(_as_int(r, f"choices[{n}] entry") for r in choice)
        if not path:
            raise InputError(f"choices[{n}] is empty; the root is implicit, a choice names a node below it")
        if any(r < 0 for r in path):
            raise InputError(f"choices[{n}] = {path} has a negative rank; ranks are top-k indices, >= 0")
        paths.append(path)
    if len(set(paths)) != len(paths):
        duplicates = sorted({p for p in paths if paths.count(p) > 1})
        raise InputError(f"choices contain duplicates: {duplicates}")
    present = set(paths)
    for path in paths:
        for end in range(1, len(path)):
            if path[:end] not in present:
                raise InputError(f"choice {path} has no parent: its prefix {path[:end]} is not a choice")
    ordered = sorted(paths, key=lambda p: (len(p), p))
    index = {(): 0}
    for i, path in enumerate(ordered, start=1):
        index[path] = i
    parents = (-1,) + tuple(index[p[:-1]] for p in ordered)
    ranks = (0,) + tuple(p[-1] for p in ordered)
    return TokenTree(parents, node_rank=ranks)


def from_branching(branching: Sequence[int]) -> TokenTree:
    """A full tree where every node at depth d has ``branching[d]`` children, ranked 0..b-1 (BFS order)."""
    widths = tuple(_as_int(b, f"branching[{d}]") for d, b in enumerate(branching))
    for d, b in enumerate(widths):
        if b < 1:
            raise InputError(f"branching[{d}] = {b}: every level needs at least one child per node")
    levels = range(1, len(widths) + 1)
    choices = [p for depth in levels for p in itertools.product(*map(range, widths[:depth]))]
    return from_choices(choices)


def chain(k: int) -> TokenTree:
    """A chain of k drafts (K = k + 1 nodes); ranks are all top-1."""
    k = _as_int(k, "k")
    if k < 0:
        raise InputError(f"k = {k}: a chain holds k >= 0 drafts")
    return from_branching((1,) * k)


def tree_from_spec(spec: str) -> TokenTree:
    """Parses a tree spec from a config: ``"chain:4"``, ``"branching:3,2,1"`` or a preset name.

    Presets: the keys of ``PRESET_CHOICES`` (``"medusa_63"``, ``"medusa_small"``).
    """
    allowed = "'chain:<k>', 'branching:<b1>,<b2>,...' or one of " + ", ".join(map(repr, PRESET_CHOICES))
    if not isinstance(spec, str):
        raise InputError(f"tree spec {spec!r} must be a string: {allowed}")
    kind, _, arg = spec.partition(":")

    def integer(piece: str) -> int:
        try:
            return int(piece)
        except ValueError:
            raise InputError(f"{piece!r} is not an integer") from None

    try:
        if kind == "chain" and arg:
            return chain(integer(arg))
        if kind == "branching" and arg:
            return from_branching(tuple(integer(b) for b in arg.split(",")))
    except InputError as err:
        raise InputError(f"tree spec {spec!r}: {err}; allowed: {allowed}") from err
    if spec in PRESET_CHOICES:
        return from_choices(PRESET_CHOICES[spec])
    raise InputError(f"unknown tree spec {spec!r}; allowed: {allowed}")


def ancestor_mask_jnp(parents: jax.Array) -> jax.Array:
    """Bool ancestor mask (self included) from traced parents ``[K]`` or ``[B, K]`` (one tree per row).

    ``mask[..., i, j]`` is True when node j is node i or an ancestor of i; several roots (-1) are allowed.
    The model's tree forward builds its mask with the same function (``jaxspec.state.tree_ancestor_mask``).
    """
    parents = jnp.asarray(parents)
    if parents.ndim not in (1, 2):
        raise InputError(f"parents has shape {parents.shape}; expected [K] or [B, K]")
    batch = parents.shape[0] if parents.ndim == 2 else 1
    mask = tree_ancestor_mask(parents, batch)
    return mask if parents.ndim == 2 else mask[0]
