"""Drafters: propose a token tree for the target to verify.

One protocol for every drafter (all methods are pure; the drafter's state is a pytree in the loop carry):
    init(params, prompts, prompt_lens, max_len, first_token) -> dstate
    propose(params, dstate, ctx) -> Proposal(tokens [B, K], draft_probs [B, K, V] | None, node_valid, dstate)
    update(dstate, emitted [B, K], num_emitted [B]) -> dstate

`ModelDrafter` covers a separate draft model, MatFormer self-drafting (a smaller granularity of the target)
and layer-skip self-drafting (the target with layers skipped): all three are a DecoderLM applied with
static options. Its state trails the committed context by the tokens emitted last round ("lag"); the next
proposal first appends them (a committed extend), so a drafter never rolls back and never re-runs tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding.dynamic_tree import DynamicTree, check_drafter_tree, grow
from jaxspec.decoding.sampling import sample, warp_logits
from jaxspec.decoding.trees import TokenTree
from jaxspec.errors import InputError
from jaxspec.models.acceptance import AcceptanceHead, acceptance_features
from jaxspec.models.heads import MedusaHeads
from jaxspec.models.lm import DecoderLM
from jaxspec.state import init_decode_state


class Context(NamedTuple):
    """What the decode loop knows at the start of a round."""

    root: jax.Array  # [B] last emitted token, the tree's root
    seq: jax.Array  # [B, S] prompt followed by the emitted tokens
    seq_len: jax.Array  # [B]
    target_hidden: jax.Array  # [B, d_model] target's final hidden state at the root's parent (Medusa)
    key: jax.Array
    temperature: float  # what drafts are drawn at (Sampling.draft_temperature); 0: top-k candidates


class Proposal(NamedTuple):
    tokens: jax.Array  # [B, K] int32, node 0 = root
    draft_probs: jax.Array | None  # [B, K, V]: distribution each node was sampled from; None = deterministic
    node_valid: jax.Array | None  # [B, K] bool
    state: Any
    parents: jax.Array | None = None  # [B, K] int32, a tree per row and round (dynamic trees); None: drafter.tree


def sibling_ranks(tree: TokenTree) -> np.ndarray:
    """Rank of each node among its siblings (0 = first child), unless the tree names ranks itself."""
    if tree.node_rank is not None:
        return np.asarray(tree.node_rank)
    ranks, seen = np.zeros(tree.num_nodes, np.int32), {}
    for i, p in enumerate(tree.parents):
        ranks[i] = seen.get(p, 0)
        seen[p] = ranks[i] + 1
    return ranks


def fill_tree(tree: TokenTree, root, draft) -> tuple[jax.Array, jax.Array]:
    """Model-free drafting over a static tree, depth by depth: `draft(tokens, nodes)` gives the tokens
    [B, len(nodes)] of the nodes of one depth, reading their ancestors' tokens from `tokens` [B, K]; a negative
    token means no draft. Returns (tokens, known): a node is known (a draft) when it and all its ancestors got
    one; the others hold token 0 (any valid id) and are never accepted."""
    b, k = root.shape[0], tree.num_nodes
    parents = tree.parents_array
    tokens = jnp.zeros((b, k), jnp.int32).at[:, 0].set(root.astype(jnp.int32))
    known = jnp.ones((b, k), bool)
    for depth in range(1, tree.max_depth + 1):
        nodes = np.flatnonzero(tree.depths == depth)
        drafted = draft(tokens, nodes)
        known = known.at[:, nodes].set((drafted >= 0) & known[:, parents[nodes]])
        tokens = tokens.at[:, nodes].set(jnp.maximum(drafted, 0))
    return tokens, known


def check_breadth_first(tree: TokenTree) -> None:
    if np.any(np.diff(tree.depths) < 0):
        raise InputError("drafting needs a breadth-first tree (node depths non-decreasing); got depths "
                         f"{tree.depths.tolist()}")


def children_tokens(key, parent_logits, ranks, temperature: float, top_k: int, parent_ids=None):
    """Tokens for nodes whose parents have drafter logits parent_logits [B, n, V].

    Greedy drafting takes the rank-th best token (siblings distinct); sampled drafting draws each child
    i.i.d. from the warped distribution, which the verifier needs as draft_probs.

    With `parent_ids` [n] (each node's parent; sampled drafting only) siblings are drawn without replacement,
    as RSD does: Gumbel-top-k over their parent's distribution q with noise shared by the siblings, so the child
    of rank r takes the (r+1)-th draw, and its draft distribution is q without its r earlier siblings' tokens,
    renormalised -- the law of that draw given the earlier ones, which recursive rejection needs to stay
    lossless.
    """
    if temperature == 0:
        best = jax.lax.top_k(parent_logits, top_k)[1]  # [B, n, top_k]
        return jnp.take_along_axis(best, jnp.asarray(ranks)[None, :, None], axis=-1)[..., 0], None
    probs = warp_logits(parent_logits, temperature)
    if parent_ids is None:
        return sample(key, probs), probs
    parent_ids = np.asarray(parent_ids)
    b, _, vocab = probs.shape
    gumbel = jax.random.gumbel(key, (b, int(parent_ids.max()) + 1, vocab))[:, parent_ids]
    scores = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf) + gumbel
    draws = jax.lax.top_k(scores, top_k)[1]  # [B, n, top_k]: distinct tokens, in draw order
    tokens = jnp.take_along_axis(draws, jnp.asarray(ranks)[None, :, None], axis=-1)[..., 0]
    earlier = jnp.arange(top_k)[None, :] < jnp.asarray(ranks)[:, None]  # [n, top_k]
    removed = jnp.zeros(probs.shape, bool)
    for r in range(top_k - 1):  # top_k is a tree's widest branching: a few iterations
        hit = jax.nn.one_hot(draws[..., r], vocab, dtype=bool) & earlier[None, :, r, None]
        removed = removed | hit
    kept = jnp.where(removed, 0.0, probs)
    mass = jnp.sum(kept, axis=-1, keepdims=True)
    # No mass left: every token with probability was drawn before; the draw is then a zero-probability
    # token, which the verifier rejects with certainty.
    return tokens, jnp.where(mass > 0, kept / jnp.where(mass > 0, mass, 1.0), probs)


@dataclasses.dataclass(frozen=True)
class ModelDrafter:
    """A DecoderLM drafting a tree depth by depth; `granularity` / `skip_layers` make it a self-drafter."""

    model: DecoderLM
    tree: TokenTree
    granularity: Any = None
    skip_layers: tuple = ()
    confidence_threshold: float = 0.0  # stop a branch when the drafter's top probability falls below this
    # With a confidence threshold: False drops the unconfident draft itself; True keeps it as the branch's last
    # (Kangaroo's draft early exit: the token is proposed, drafting stops after it).
    keep_unconfident: bool = False
    without_replacement: bool = False  # sampled siblings drawn without replacement (RSD; see children_tokens)
    # SpecDec++: a branch keeps a node while P(at least one rejection along it, the node included), predicted by
    # the head, stays <= stop_threshold. With a head, params are {"draft": ..., "acceptance": ...}.
    acceptance_head: AcceptanceHead | None = None
    stop_threshold: float = 0.5

    def __post_init__(self):
        check_breadth_first(self.tree)

    @property
    def stops(self) -> bool:
        """Whether branches may stop early (then proposals carry node_valid)."""
        return self.confidence_threshold > 0 or self.acceptance_head is not None

    def _split(self, params):
        """(the draft model's params, the acceptance head's or None)."""
        return (params["draft"], params["acceptance"]) if self.acceptance_head is not None else (params, None)

    def _apply(self, params, tokens, **kw):
        return self.model.apply({"params": params}, tokens, granularity=self.granularity,
                                skip_layers=self.skip_layers, **kw)

    def forward_features(self, params, tokens):
        """(hidden [B, T, d], logits [B, T, V]) of a full forward of the drafter: what the acceptance head reads
        at every position (training data, `jaxspec.training.acceptance`)."""
        out = self._apply(self._split(params)[0], tokens, return_hidden=True)
        return out.hidden, out.logits

    def init(self, params, prompts, prompt_lens, max_len, first_token):
        b = prompts.shape[0]
        state = init_decode_state(self.model.model_cfg, b, max_len)
        _, state = self._apply(self._split(params)[0], prompts, state=state, num_new=prompt_lens, fresh=True)
        lag = jnp.zeros((b, self.tree.num_nodes), jnp.int32).at[:, 0].set(first_token)
        return state, lag, jnp.ones((b,), jnp.int32)

    def _accept_probs(self, head_params, hidden, logits):
        return jax.nn.sigmoid(self.acceptance_head.apply({"params": head_params},
                                                         acceptance_features(hidden, logits)))

    def propose(self, params, dstate, ctx: Context) -> Proposal:
        params, head_params = self._split(params)
        state, lag, lag_n = dstate
        tree = self.tree
        b, k = lag.shape[0], tree.num_nodes
        rows = jnp.arange(b)
        out, state = self._apply(params, lag, state=state, num_new=lag_n, return_hidden=True)
        last = jnp.maximum(lag_n - 1, 0)
        node_logits = jnp.zeros((b, k, out.logits.shape[-1]), jnp.float32).at[:, 0].set(out.logits[rows, last])
        node_hidden = jnp.zeros((b, k, out.hidden.shape[-1]), out.hidden.dtype).at[:, 0].set(out.hidden[rows, last])
        tokens = jnp.zeros((b, k), jnp.int32).at[:, 0].set(ctx.root)
        draft_probs = None if ctx.temperature == 0 else jnp.zeros_like(node_logits)
        keep = jnp.ones((b, k), bool)
        grows = jnp.ones((b, k), bool)  # whether a node's children may be drafted
        survival = jnp.ones((b, k), jnp.float32)  # predicted P(every node of the path to here accepted)
        depths, parents, ranks = tree.depths, np.asarray(tree.parents), sibling_ranks(tree)
        widest = int(ranks.max()) + 1
        keys = jax.random.split(ctx.key, tree.max_depth + 1)
        for d in range(1, tree.max_depth + 1):
            nodes = np.flatnonzero(depths == d)
            parent_logits = node_logits[:, parents[nodes]]
            new, probs = children_tokens(keys[d], parent_logits, ranks[nodes], ctx.temperature, widest,
                                         parents[nodes] if self.without_replacement else None)
            tokens = tokens.at[:, nodes].set(new)
            if probs is not None:
                draft_probs = draft_probs.at[:, nodes].set(probs)
            ok = grows[:, parents[nodes]]
            confident = True
            if self.confidence_threshold > 0:
                confident = jnp.max(jax.nn.softmax(parent_logits, axis=-1), axis=-1) >= self.confidence_threshold
                if not self.keep_unconfident:
                    ok &= confident
            if self.acceptance_head is not None:
                # The head was trained on the drafter's top token; every sibling gets its parent's estimate.
                reach = survival[:, parents[nodes]] * self._accept_probs(head_params, node_hidden[:, parents[nodes]],
                                                                         parent_logits)
                survival = survival.at[:, nodes].set(reach)
                ok &= 1.0 - reach <= self.stop_threshold
            keep = keep.at[:, nodes].set(ok)
            growing = ok & confident
            grows = grows.at[:, nodes].set(growing)
            if d < tree.max_depth:
                # Nodes up to depth d form a prefix (breadth-first); their logits score depth d+1. The
                # forward's pending state is dropped: only committed tokens ever enter the drafter's state.
                m = int(np.sum(depths <= d))
                sub_parents = parents[1:m] - 1  # the root is already in the drafter's state

                def deeper(node_logits, node_hidden, m=m, sub_parents=sub_parents, tokens=tokens):
                    sub, _ = self._apply(params, tokens[:, 1:m], state=state, parents=sub_parents,
                                         return_hidden=True)
                    return node_logits.at[:, 1:m].set(sub.logits), node_hidden.at[:, 1:m].set(sub.hidden)

                if self.stops:  # a depth no row still drafts at costs nothing
                    node_logits, node_hidden = jax.lax.cond(jnp.any(growing), deeper, lambda *x: x, node_logits,
                                                            node_hidden)
                else:
                    node_logits, node_hidden = deeper(node_logits, node_hidden)
        return Proposal(tokens, draft_probs, keep if self.stops else None, (state, lag, lag_n))

    def update(self, dstate, emitted, num_emitted):
        state, _, _ = dstate
        return state, emitted.astype(jnp.int32), num_emitted.astype(jnp.int32)


def to_target_vocab(picked, probs, vocab_ids, vocab_size: int):
    """(target ids, draft_probs over the target's whole vocabulary) of drafts a head picked among the rows of a
    draft vocabulary: `picked` [B, n] rows, `probs` [B, n, N] the distribution they were drawn from (None:
    deterministic drafts), `vocab_ids` [N] each row's target id (None: the rows are the target ids themselves).
    The probability of an id outside the draft vocabulary is 0, so the verifier never expects the drafter to
    propose it."""
    if vocab_ids is None:
        return picked, probs
    tokens = jnp.take(vocab_ids, picked)
    if probs is None:
        return tokens, None
    full = jnp.zeros((*probs.shape[:-1], vocab_size), probs.dtype)
    return tokens, full.at[..., vocab_ids].set(probs)


@dataclasses.dataclass(frozen=True)
class MedusaDrafter:
    """Medusa heads on the target's last hidden state: a node at depth d takes head d-1's rank-th token (greedy),
    or a draw from head d-1's distribution (sampled; siblings i.i.d.); with `dynamic`, EAGLE-2's tree over the
    heads' log-probabilities (deterministic drafts). Params: {"heads", "lm_head" when shared,
    "vocab_ids" when the heads score a draft vocabulary}; `vocab_size` is then the target's vocabulary (0: the heads
    score the whole of it)."""

    heads: MedusaHeads
    tree: TokenTree  # the static tree; with `dynamic`, only its node count (dynamic.nodes + 1) matters
    vocab_size: int = 0
    dynamic: DynamicTree | None = None  # EAGLE-2's tree over the heads' scores (children of depth d: head d)

    def __post_init__(self):
        check_drafter_tree(self.tree, self.dynamic, self.heads.num_heads, "Medusa")
        if self.vocab_size and self.heads.vocab_size > self.vocab_size:
            raise InputError(f"Medusa heads score {self.heads.vocab_size} ids, more than the target's vocabulary "
                             f"of {self.vocab_size}")

    def init(self, params, prompts, prompt_lens, max_len, first_token):
        return ()

    def propose(self, params, dstate, ctx: Context) -> Proposal:
        head_logits = self.heads.apply({"params": params["heads"]}, ctx.target_hidden[:, None],
                                       params.get("lm_head"))[:, 0]  # [B, num_heads, N]
        if self.dynamic is not None:
            log_probs = jax.nn.log_softmax(head_logits.astype(jnp.float32), axis=-1)

            def score_children(carry, pool_tokens, pool_parents):
                # The heads ignore the path: the children of every node at depth L are scored by head L.
                m = 1 if pool_tokens.shape[1] == 1 else self.dynamic.expand
                level = (pool_tokens.shape[1] - 1) // m
                return jnp.broadcast_to(log_probs[:, level, None], (log_probs.shape[0], m, log_probs.shape[-1])), carry

            tokens, parents = grow(self.dynamic, score_children, (), ctx.root, params.get("vocab_ids"))
            return Proposal(tokens, None, None, dstate, parents)
        depths, ranks = self.tree.depths, sibling_ranks(self.tree)
        nodes = np.arange(1, self.tree.num_nodes)
        # Every node of depth d reads head d-1, whatever its path: one call drafts the whole tree.
        picked, probs = children_tokens(ctx.key, head_logits[:, depths[nodes] - 1], ranks[nodes], ctx.temperature,
                                        int(ranks.max()) + 1)
        drafts, probs = to_target_vocab(picked, probs, params.get("vocab_ids"), self.vocab_size)
        tokens = jnp.concatenate([ctx.root[:, None].astype(jnp.int32), drafts.astype(jnp.int32)], axis=1)
        if probs is not None:  # the root is no draft: its row stays 0
            probs = jnp.pad(probs, ((0, 0), (1, 0), (0, 0)))
        return Proposal(tokens, probs, None, dstate)

    def update(self, dstate, emitted, num_emitted):
        return dstate


@dataclasses.dataclass(frozen=True)
class PromptLookupDrafter:
    """Model-free drafting: find the latest earlier occurrence of the sequence's last n-gram (longest n first)
    in the prompt and generated text, and propose the tokens that followed it (repeated periodically when
    they run into the end of the text)."""

    tree: TokenTree  # a chain
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        if not self.tree.is_chain:
            raise InputError("prompt lookup drafts a chain; got a branching tree")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise InputError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}")

    def init(self, params, prompts, prompt_lens, max_len, first_token):
        return ()

    def propose(self, params, dstate, ctx: Context) -> Proposal:
        seq, n = ctx.seq, ctx.seq_len
        b, s = seq.shape
        k = self.tree.num_drafts
        pos = jnp.arange(s)[None, :]
        found = jnp.zeros((b,), bool)
        start = jnp.zeros((b,), jnp.int32)
        for g in range(self.max_ngram, self.min_ngram - 1, -1):
            # match[b, i]: the g tokens ending at i equal the last g tokens, for an earlier end i < n - 1.
            match = (pos >= g - 1) & (pos < n[:, None] - 1) & (n[:, None] >= g)
            for j in range(g):
                shifted = jnp.roll(seq, j, axis=1)  # shifted[:, i] = seq[:, i - j]
                target = jnp.take_along_axis(seq, jnp.maximum(n - 1 - j, 0)[:, None], axis=1)
                match &= shifted == target
            latest = jnp.max(jnp.where(match, pos, -1), axis=1)
            use = ~found & (latest >= 0)
            start = jnp.where(use, latest + 1, start)
            found |= latest >= 0
        # What followed the match, continued periodically once it reaches the present: a text that repeats
        # with period p = n - start keeps repeating (loops are common), so k drafts need not stop at p.
        period = jnp.maximum(n - start, 1)
        idx = start[:, None] + jnp.arange(k)[None, :] % period[:, None]
        drafts = jnp.take_along_axis(seq, jnp.minimum(idx, s - 1), axis=1)
        valid = jnp.broadcast_to(found[:, None], (b, k))
        tokens = jnp.concatenate([ctx.root[:, None], drafts], axis=1).astype(jnp.int32)
        node_valid = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)
        return Proposal(tokens, None, node_valid, dstate)

    def update(self, dstate, emitted, num_emitted):
        return dstate
