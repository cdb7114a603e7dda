"""Adaptive n-gram drafting in the manner of ADED (Liu et al., 2024): tri-gram statistics of the prompt and of
everything emitted so far, with a bi-gram fallback, are the drafts (no model, no training).

Each batch row keeps two hashed tables of successor counts with static shapes, one keyed by the last two
tokens (tri-grams) and one by the last token (bi-grams). A context hashes to one bucket, which holds the
context it belongs to (a newer context evicts an older one that hashes alike) and `slots` successors with
their counts and the position they were last seen at. Every committed token is counted (`update`); each
round the draft tree is filled breadth-first over a static template: a node's candidates are the successors
of its parent's tri-gram context, most frequent (then most recent) first, followed by those of the parent
token's bi-gram context that the tri-gram lacks, and the node takes the one at its sibling rank.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding import methods
from jaxspec.decoding.drafters import Context, Proposal, fill_tree, sibling_ranks
from jaxspec.decoding.method import Speculative, Target, is_int
from jaxspec.decoding.trees import TokenTree
from jaxspec.errors import InputError

EMPTY = -1  # a slot holding no successor; also the owner of a bucket no context has used yet
_GOLDEN = np.uint32(0x9E3779B1)  # Fibonacci hashing: multiply, keep the top bits


class Counts(NamedTuple):
    """A hashed table of successor counts per batch row: H buckets of `slots` successors each."""

    owner: jax.Array  # [B, H, n] int32: the context (its n tokens) the bucket counts for
    succ: jax.Array  # [B, H, slots] int32: successor tokens, EMPTY when unused
    count: jax.Array  # [B, H, slots] int32: times each successor followed the context
    last: jax.Array  # [B, H, slots] int32: position of its latest occurrence (-1 when unused)


class NgramState(NamedTuple):
    trigrams: Counts  # keyed by the two tokens before the successor
    bigrams: Counts  # keyed by the token before the successor
    tail: jax.Array  # [B, 2] the last two committed tokens
    length: jax.Array  # [B] tokens committed so far (prompt, then emitted)


def empty_counts(batch: int, buckets: int, slots: int, context: int) -> Counts:
    unused = jnp.full((batch, buckets, slots), EMPTY, jnp.int32)
    return Counts(jnp.full((batch, buckets, context), EMPTY, jnp.int32), unused, jnp.zeros_like(unused), unused)


def bucket_of(context, buckets: int):
    """Bucket index [...] of contexts [..., n] in a table of `buckets` (a power of two) buckets."""
    h = jnp.zeros(context.shape[:-1], jnp.uint32)
    for j in range(context.shape[-1]):
        h = (h ^ context[..., j].astype(jnp.uint32)) * _GOLDEN
    bits = int(buckets).bit_length() - 1
    return (h >> (32 - bits)).astype(jnp.int32)


def count_successor(table: Counts, context, token, position, live) -> Counts:
    """Count `token` [B] after `context` [B, n] (seen at `position` [B]) in the rows where `live` [B]."""
    b, buckets, slots = table.succ.shape
    rows = jnp.arange(b)
    h = bucket_of(context, buckets)
    mine = jnp.all(table.owner[rows, h] == context, axis=-1)[:, None]  # else the bucket starts over
    succ = jnp.where(mine, table.succ[rows, h], EMPTY)
    count = jnp.where(mine, table.count[rows, h], 0)
    last = jnp.where(mine, table.last[rows, h], -1)
    hit = succ == token[:, None]
    # A new successor takes an unused slot, else the least frequent one, the least recent among those.
    least = count == jnp.min(count, axis=-1, keepdims=True)
    weakest = jnp.argmin(jnp.where(least, last, jnp.iinfo(jnp.int32).max), axis=-1)
    slot = jnp.where(hit.any(-1), jnp.argmax(hit, axis=-1), weakest)
    chosen = jnp.arange(slots)[None, :] == slot[:, None]
    new_count = jnp.where(hit.any(-1), count[rows, slot] + 1, 1)
    succ = jnp.where(chosen, token[:, None], succ)
    count = jnp.where(chosen, new_count[:, None], count)
    last = jnp.where(chosen, position[:, None], last)
    h = jnp.where(live, h, buckets)  # out of range: the write is dropped
    return Counts(table.owner.at[rows, h].set(context, mode="drop"), table.succ.at[rows, h].set(succ, mode="drop"),
                  table.count.at[rows, h].set(count, mode="drop"), table.last.at[rows, h].set(last, mode="drop"))


def commit_token(state: NgramState, token, live) -> NgramState:
    """Count one committed token [B] (rows where `live`) after its tri-gram and bi-gram contexts."""
    token = token.astype(jnp.int32)
    trigrams = count_successor(state.trigrams, state.tail, token, state.length, live & (state.length >= 2))
    bigrams = count_successor(state.bigrams, state.tail[:, 1:], token, state.length, live & (state.length >= 1))
    tail = jnp.where(live[:, None], jnp.stack([state.tail[:, 1], token], axis=1), state.tail)
    return NgramState(trigrams, bigrams, tail, state.length + live.astype(jnp.int32))


def ranked_successors(table: Counts, context):
    """Successors [B, N, slots] of contexts [B, N, n]: most frequent first, then most recent; EMPTY where the
    bucket belongs to another context or the slot is unused."""
    rows = jnp.arange(context.shape[0])[:, None]
    h = bucket_of(context, table.succ.shape[1])
    mine = jnp.all(table.owner[rows, h] == context, axis=-1)[..., None]
    count = jnp.where(mine, table.count[rows, h], 0)
    neg_count, _, succ = jax.lax.sort((-count, -table.last[rows, h], table.succ[rows, h]), dimension=-1,
                                      num_keys=2)
    return jnp.where(neg_count < 0, succ, EMPTY)


def candidates(state: NgramState, before, token):
    """Draft candidates [B, N, 2 * slots] after `token` [B, N] preceded by `before` [B, N]: the tri-gram's
    successors, then the bi-gram's that the tri-gram lacks, EMPTY-padded at the end."""
    tri = ranked_successors(state.trigrams, jnp.stack([before, token], axis=-1))
    bi = ranked_successors(state.bigrams, token[..., None])
    bi = jnp.where((bi[..., :, None] == tri[..., None, :]).any(-1), EMPTY, bi)
    merged = jnp.concatenate([tri, bi], axis=-1)
    order = jnp.argsort(merged == EMPTY, axis=-1, stable=True)
    return jnp.take_along_axis(merged, order, axis=-1)


@dataclasses.dataclass(frozen=True)
class NgramDrafter:
    """Drafts the most frequent continuations of hashed tri-gram (bi-gram fallback) counts."""

    tree: TokenTree
    buckets: int = 1 << 14
    slots: int = 4

    def __post_init__(self):
        if self.tree.num_drafts < 1:
            raise InputError("n-gram drafting needs a tree with at least one draft node; got the root alone")
        if self.buckets < 2 or self.buckets & (self.buckets - 1):
            raise InputError(f"n-gram drafting needs a power-of-two number of buckets >= 2, got {self.buckets}")
        widest = int(sibling_ranks(self.tree).max()) + 1
        if self.slots < widest:
            raise InputError(f"n-gram drafting keeps slots={self.slots} successors per context; the tree ranks "
                             f"up to {widest} children per node")

    def init(self, params, prompts, prompt_lens, max_len, first_token):
        b, width = prompts.shape
        state = NgramState(empty_counts(b, self.buckets, self.slots, 2), empty_counts(b, self.buckets, self.slots, 1),
                           jnp.full((b, 2), EMPTY, jnp.int32), jnp.zeros((b,), jnp.int32))
        lens = jnp.asarray(prompt_lens)

        def count_prompt_token(i, state):
            return commit_token(state, jax.lax.dynamic_index_in_dim(prompts, i, axis=1, keepdims=False), i < lens)

        state = jax.lax.fori_loop(0, width, count_prompt_token, state)
        return commit_token(state, jnp.asarray(first_token), jnp.ones((b,), bool))

    def propose(self, params, state: NgramState, ctx: Context) -> Proposal:
        parents, ranks = self.tree.parents_array, sibling_ranks(self.tree)

        def draft(tokens, nodes):
            # The context of a node's draft is its parent's token and the one before it (the grandparent's, or
            # the text's last token before the root).
            grand = parents[parents[nodes]]
            before = jnp.where(grand[None, :] >= 0, tokens[:, np.maximum(grand, 0)], state.tail[:, :1])
            options = candidates(state, before, tokens[:, parents[nodes]])
            return jnp.take_along_axis(options, jnp.asarray(ranks[nodes])[None, :, None], axis=-1)[..., 0]

        tokens, known = fill_tree(self.tree, ctx.root, draft)  # EMPTY (-1): no candidate, no draft
        return Proposal(tokens, None, known, state)

    def update(self, state: NgramState, emitted, num_emitted):
        def count_emitted_token(j, state):
            token = jax.lax.dynamic_index_in_dim(emitted, j, axis=1, keepdims=False)
            return commit_token(state, token, j < num_emitted)

        return jax.lax.fori_loop(0, emitted.shape[1], count_emitted_token, state)


@methods.register
@dataclasses.dataclass(frozen=True)
class AdaptiveNgram(Speculative):
    """Drafts the most frequent tri-gram (bi-gram fallback) continuations of the prompt and the output so far.
    `table_size`: buckets per table (a power of two); `slots`: successors kept per context (at least the tree's
    widest branching)."""

    name = "ngram"
    default_tree = "chain:4"  # paid best on a 2-core CPU; wider trees raise tau a little, at more cost
    table_size: int = 1 << 14
    slots: int = 4

    def __post_init__(self):
        super().__post_init__()
        tree = self.token_tree()
        self.check(tree.num_drafts >= 1, "tree", "a tree with at least one draft node")
        self.check(is_int(self.table_size) and self.table_size >= 2 and not self.table_size & (self.table_size - 1),
                   "table_size", "a power of two >= 2 (buckets per table)")
        widest = int(sibling_ranks(tree).max()) + 1
        self.check(is_int(self.slots) and self.slots >= widest, "slots",
                   f"an integer >= {widest}, the widest branching of tree={self.tree_spec!r}")

    def build(self, target: Target, **objects):
        return NgramDrafter(self.token_tree(), buckets=self.table_size, slots=self.slots), ()
