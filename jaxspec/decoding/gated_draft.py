"""Self-drafting over the target's own cache: the target with a traced layer gate drafts for itself.

The verification forward writes every committed token's keys/values (or recurrent states) at every layer, so a
self-draft that skips layers can read the target's cache directly (LayerSkip, SWIFT, DEL, Draft & Verify): it
keeps no cache of its own and never catches up on accepted tokens, and its skip set may change from round to
round without leaving holes in any cache. `GatedSelfDrafter` does this through the decode loop's
`reads_target_state` hook: each round it drafts the tree depth by depth with tree forwards of the target over
the target's decode state, with the gate of a `GatePolicy`, and drops the forwards' pending entries, so the
target's state is never changed by drafting. A layer gated off for every row does not run (`DecoderLM`'s
`layer_gate`, a lax.cond per layer); in a batch, a layer runs when any row's gate has it on.

The gate is chosen by a policy (static, hashable; its statistics are the drafter's state, a pytree):
    init(batch, key) -> stats
    choose(stats) -> (gate [B, n_layers] bool, draft_len [B] int32)   # deterministic in stats
    observe(stats, accepted [B], live [B]) -> stats                   # drafts accepted in the round just verified
A policy with `context_window` W > 0 also has each round's candidate gate scored on the text so far, before it
drafts: `candidate(stats) -> (gate, scored [B] bool)`, then `judge(stats, match [B], scored)` with the share of
the last W committed tokens that the gated target predicts (teacher-forced; `context_match`).
Policies here: `FixedGate` (one skip set), `ExitPolicy` (DEL: exit layer and draft length per context) and
`SkipSearchPolicy` (SWIFT: the skip set searched during decoding, by trial drafting or on the context).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding.drafters import Context, Proposal, check_breadth_first, children_tokens, sibling_ranks
from jaxspec.decoding.trees import TokenTree
from jaxspec.errors import InputError

# A verification forward over K nodes, in autoregressive steps, at K = 1, 2, 4, 8, 16: docs/benchmarks.md,
# "Decode step cost" (SmolLM2-135M, decode layout, float32, 2-core CPU; whole forward, cost(K) / cost(1)).
MEASURED_VERIFY_COSTS = (1.0, 1.44, 1.54, 1.83, 2.62)


def verify_cost(num_nodes: int, costs: tuple[float, ...] = MEASURED_VERIFY_COSTS) -> float:
    """The cost of verifying `num_nodes` nodes, from `costs` at K = 1, 2, 4, ... nodes: linear between those
    points, and past the last one along the last segment."""
    ks = 2.0 ** np.arange(len(costs))
    if len(costs) == 1 or num_nodes <= ks[-1]:
        return float(np.interp(num_nodes, ks, costs))
    slope = (costs[-1] - costs[-2]) / (ks[-1] - ks[-2])
    return float(costs[-1] + slope * (num_nodes - ks[-1]))


def nodes_within(tree: TokenTree) -> np.ndarray:
    """[max_depth + 1]: the tree's nodes of depth <= d (the root included): what a draft length d verifies."""
    return np.asarray([int(np.sum(tree.depths <= d)) for d in range(tree.max_depth + 1)])


def depth_outcomes(accepted, draft_len, max_depth: int):
    """Which depths a round tried and which it accepted: ([B, max_depth] bool, [B, max_depth] bool). Depth d's
    draft is tried when d <= draft_len and every shallower draft was accepted (d <= accepted + 1), and accepted
    when d <= accepted."""
    d = jnp.arange(1, max_depth + 1)[None, :]
    accepted = jnp.asarray(accepted, jnp.int32)[:, None]
    tried = (d <= jnp.asarray(draft_len)[:, None]) & (d <= accepted + 1)
    return tried, tried & (d <= accepted)


class GatePolicy(Protocol):
    """Chooses each round's layer gate and draft length per row from its statistics (see the module docstring)."""

    def init(self, batch: int, key) -> Any: ...

    def choose(self, stats) -> tuple[jax.Array, jax.Array]: ...

    def observe(self, stats, accepted, live) -> Any: ...


@dataclasses.dataclass(frozen=True)
class FixedGate:
    """One gate every round (False: a skipped layer), the whole tree."""

    gate: tuple[bool, ...]
    max_depth: int

    def init(self, batch: int, key):
        return jnp.zeros((batch,), jnp.int32)  # only the batch size: a fixed gate learns nothing

    def choose(self, stats):
        b = stats.shape[0]
        return (jnp.broadcast_to(jnp.asarray(self.gate), (b, len(self.gate))),
                jnp.full((b,), self.max_depth, jnp.int32))

    def observe(self, stats, accepted, live):
        return stats


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """DEL (Zarch et al., 2024): the draft runs the first E layers, E one of `exits`, and each round takes the
    (exit, draft length) pair with the most expected tokens per unit cost.

    Statistics per row, exit and depth: decayed counts of tried and accepted drafts (`depth_outcomes`). Every
    count decays by `decay` each round, so an estimate follows the context, and an exit left alone drifts
    back to its optimistic prior (one pseudo-observation of an accepted draft) and gets measured again:
        a[e, d] = (hits[e, d] + 1) / (tries[e, d] + 1)
        value(e, g) = (1 + sum_{d <= g} prod_{j <= d} a[e, j]) / (g * E_e / n_layers + verify_cost(nodes(g)))
    """

    n_layers: int
    exits: tuple[int, ...]
    node_counts: tuple[int, ...]  # nodes_within(tree): the nodes a draft length verifies
    verify_costs: tuple[float, ...] = MEASURED_VERIFY_COSTS
    decay: float = 0.9

    @property
    def max_depth(self) -> int:
        return len(self.node_counts) - 1

    def init(self, batch: int, key):
        shape = (batch, len(self.exits), self.max_depth)
        return {"hits": jnp.zeros(shape, jnp.float32), "tries": jnp.zeros(shape, jnp.float32)}

    def acceptance(self, stats):
        """[B, exits, max_depth]: each depth's estimated acceptance given the shallower drafts accepted."""
        return (stats["hits"] + 1.0) / (stats["tries"] + 1.0)

    def values(self, stats):
        """[B, exits, max_depth]: expected tokens per unit cost of drafting g = 1..max_depth at each exit."""
        tokens = 1.0 + jnp.cumsum(jnp.cumprod(self.acceptance(stats), axis=-1), axis=-1)
        g = np.arange(1, self.max_depth + 1)
        verify = np.asarray([verify_cost(self.node_counts[i], self.verify_costs) for i in g])
        cost = g[None, :] * np.asarray(self.exits)[:, None] / self.n_layers + verify[None, :]
        return tokens / jnp.asarray(cost, jnp.float32)[None]

    def best(self, stats):
        """(exit index [B], draft length [B]) of the best value; ties go to the shallower exit, the shorter draft."""
        flat = jnp.argmax(self.values(stats).reshape(stats["hits"].shape[0], -1), axis=-1)
        return flat // self.max_depth, (flat % self.max_depth + 1).astype(jnp.int32)

    def choose(self, stats):
        exit_index, draft_len = self.best(stats)
        exit_layer = jnp.asarray(self.exits, jnp.int32)[exit_index]
        return jnp.arange(self.n_layers)[None, :] < exit_layer[:, None], draft_len

    def observe(self, stats, accepted, live):
        exit_index, draft_len = self.best(stats)
        tried, hit = depth_outcomes(accepted, draft_len, self.max_depth)
        at_exit = (jnp.arange(len(self.exits))[None, :] == exit_index[:, None])[:, :, None]  # [B, exits, 1]
        new = {"hits": self.decay * stats["hits"] + (at_exit & hit[:, None]),
               "tries": self.decay * stats["tries"] + (at_exit & tried[:, None])}
        keep = live[:, None, None]
        return {k: jnp.where(keep, new[k], stats[k]) for k in stats}


def _pick_one(key, allowed):
    """[L] bool with one True at a uniformly drawn position where `allowed` [L] is True (none when none is)."""
    scores = jnp.where(allowed, jax.random.gumbel(key, allowed.shape), -jnp.inf)
    return (jnp.arange(allowed.shape[0]) == jnp.argmax(scores)) & jnp.any(allowed)


def swap_one(key, skip, pool):
    """SWIFT's mutation of a skip set [L] bool: one skipped layer of `pool` [L] bool runs again and one running
    layer of the pool is skipped instead (the set keeps its size)."""
    k_out, k_in = jax.random.split(key)
    back, out = _pick_one(k_out, skip & pool), _pick_one(k_in, ~skip & pool)
    moves = jnp.any(back) & jnp.any(out)
    return jnp.where(moves, (skip & ~back) | out, skip)


def random_skip_set(key, pool: np.ndarray, num_skip: int):
    """[L] bool: `num_skip` layers of `pool` [L] bool, drawn uniformly without replacement."""
    scores = jnp.where(jnp.asarray(pool), jax.random.gumbel(key, pool.shape), -jnp.inf)
    return jnp.zeros(pool.shape, bool).at[jax.lax.top_k(scores, num_skip)[1]].set(True)


@dataclasses.dataclass(frozen=True)
class SkipSearchPolicy:
    """SWIFT (Xia et al., 2024): the skip set is searched while decoding, with no calibration run.

    For the first `search_rounds` rounds of a row (the optimisation phase) a candidate skip set is scored; a
    candidate that beats the best so far becomes the best, and the next candidate is the best with one layer
    swapped (`swap_one`: a random mutation within `pool` that keeps the skip ratio). Afterwards the row drafts
    with its best set. The first candidate is `initial` (a skip set), or `num_skip` layers of the pool drawn with
    the drafter's key; every row starts from the same set and draws its own mutations. `search_rounds` = 0
    drafts with the first set throughout. Two ways to score a candidate:

    - trial (`context_window` = 0): the row drafts with the candidate for `trial_rounds` rounds, scored by the
      mean drafts accepted per round. The skip count and the draft length are the same for every candidate, so
      a round costs the same whichever is tried, and drafts accepted per round rank candidates as drafts per
      unit cost do.
    - context (`context_window` = W, SWIFT's context-based optimisation): every search round the candidate is
      run teacher-forced over the row's last W committed tokens, scored by the share of them it predicts
      (greedy), one candidate per round; the row meanwhile drafts with its best set, so a poor candidate never
      drafts. It costs a W-token forward of the gated target per search round.
    """

    pool: tuple[bool, ...]  # [n_layers]: the layers a mutation may move
    num_skip: int
    max_depth: int
    initial: tuple[bool, ...] = ()  # [n_layers] skip set; (): drawn from the pool
    search_rounds: int = 64
    trial_rounds: int = 2
    context_window: int = 0  # W > 0: score candidates on the last W committed tokens instead of by trials

    def init(self, batch: int, key):
        key, first = jax.random.split(key)
        pool = np.asarray(self.pool)
        skip = jnp.asarray(self.initial) if self.initial else random_skip_set(first, pool, self.num_skip)
        skip = jnp.broadcast_to(skip, (batch, len(self.pool)))
        zeros = jnp.zeros((batch,), jnp.int32)
        return {"best": skip, "best_score": jnp.full((batch,), -jnp.inf), "candidate": skip,
                "trial_sum": jnp.zeros((batch,), jnp.float32), "trial_count": zeros, "round": zeros,
                "key": jax.random.key_data(jax.random.split(key, batch))}  # raw key data: jnp.where selects it

    def choose(self, stats):
        searching = (stats["round"] < self.search_rounds) & (self.context_window == 0)  # trials draft with it
        skip = jnp.where(searching[:, None], stats["candidate"], stats["best"])
        return ~skip, jnp.full(skip.shape[:1], self.max_depth, jnp.int32)

    def candidate(self, stats):
        """Context scoring: (the candidate's gate [B, n_layers], the rows still searching [B])."""
        return ~stats["candidate"], stats["round"] < self.search_rounds

    def judge(self, stats, match, scored):
        """Context scoring: the candidate of rows `scored` [B] predicted a share `match` [B] of the context."""
        return self._judged(stats, scored, match)

    def _judged(self, stats, judged, score):
        """Rows `judged` [B] compare their candidate's `score` [B] with their best; a better one becomes the best,
        and the next candidate is a mutation of the best."""
        better = judged & (score > stats["best_score"])
        best = jnp.where(better[:, None], stats["candidate"], stats["best"])
        keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(stats["key"]))  # [B, 2]: next key, mutation's
        mutated = jax.vmap(swap_one, in_axes=(0, 0, None))(keys[:, 1], best, jnp.asarray(self.pool))
        return dict(stats, best=best, best_score=jnp.where(better, score, stats["best_score"]),
                    candidate=jnp.where(judged[:, None], mutated, stats["candidate"]),
                    key=jnp.where(judged[:, None], jax.random.key_data(keys[:, 0]), stats["key"]))

    def report(self, stats):
        """The best skip set of each row [B, n_layers] bool and its score (trials: mean drafts accepted per round;
        context: the share of its window predicted; -inf when no candidate was judged)."""
        return {"skip_layers": stats["best"], "score": stats["best_score"]}

    def observe(self, stats, accepted, live):
        stats = dict(stats, round=stats["round"] + live)
        if self.context_window:  # candidates were judged on the context, before drafting
            return stats
        searching = live & (stats["round"] <= self.search_rounds)  # the round just verified was a search round
        trial_sum = stats["trial_sum"] + jnp.where(searching, accepted, 0)
        trial_count = stats["trial_count"] + searching
        judged = searching & (trial_count >= self.trial_rounds)
        stats = self._judged(stats, judged, trial_sum / jnp.maximum(trial_count, 1))
        return dict(stats, trial_sum=jnp.where(judged, 0.0, trial_sum), trial_count=jnp.where(judged, 0, trial_count))


def context_match(model, params, state, seq, seq_len, gate, window: int):
    """[B] float32: the share of each row's last `window` committed tokens that the target under `gate`
    [B, n_layers] predicts greedily, teacher-forced: one chain forward over the tokens before them, from the
    target's own cache up to where that chain starts (entries after it are masked by the row's length, and the
    forward's pending entries are dropped). Rows with fewer committed tokens score the ones they have.

    `seq` [B, S] holds the committed tokens then the root (`seq_len` [B] = committed + 1). Needs a state of
    plain KV caches: a recurrent state (linear attention, Mamba), a shared prefix or a budgeted cache cannot be
    rewound this way."""
    from jaxspec.state import KVCache

    entries = [entry for entry in state.layers + (state.stacked or ()) if entry is not None]
    if not all(isinstance(entry, KVCache) for entry in entries):
        kinds = sorted({type(entry).__name__ for entry in entries if not isinstance(entry, KVCache)})
        raise InputError(f"scoring skip sets on the context rewinds the target's cache, which needs plain KV "
                         f"caches in every layer; this decode state has {kinds}")
    committed = seq_len - 1  # the root is not in the state yet
    start = jnp.maximum(committed - window, 0)
    at = start[:, None] + jnp.arange(window)[None, :]  # [B, W]: positions of the chain's tokens
    rows = jnp.arange(seq.shape[0])[:, None]
    tokens = seq[rows, jnp.minimum(at, seq.shape[1] - 1)]
    nexts = seq[rows, jnp.minimum(at + 1, seq.shape[1] - 1)]
    scored = at + 1 <= committed[:, None]  # the next token is committed, or is the root
    rewound = state.replace(lengths=start.astype(state.lengths.dtype))
    logits, _ = model.apply({"params": params}, tokens, state=rewound, parents=np.arange(window) - 1,
                            layer_gate=gate)
    hits = (jnp.argmax(logits, axis=-1) == nexts) & scored
    return jnp.sum(hits, axis=-1) / jnp.maximum(jnp.sum(scored, axis=-1), 1)


@dataclasses.dataclass(frozen=True)
class GatedSelfDrafter:
    """The target (decode layout) drafts its own tree over its own decode state, with a policy's layer gate.

    Depth d's tokens come from one tree forward over the nodes of depth < d (the root first: it is not yet in
    the target's state), whose pending entries are dropped; a depth no row drafts to is not run. Nodes deeper
    than a row's draft length are not valid drafts. Params come from the loop (`target_params`); the drafter's
    own params are unused, its state is the policy's statistics.
    """

    model: Any  # DecoderLM in the decode layout (the loop converts the target's params to it)
    tree: TokenTree
    policy: Any  # a GatePolicy
    seed: int = 0

    reads_target_state = True

    def __post_init__(self):
        check_breadth_first(self.tree)
        if self.policy.max_depth != self.tree.max_depth:
            raise InputError(f"the gate policy drafts up to depth {self.policy.max_depth}; the tree has depth "
                             f"{self.tree.max_depth}")

    def init(self, params, prompts, prompt_lens, max_len, first_token):
        return self.policy.init(prompts.shape[0], jax.random.key(self.seed))

    def propose(self, params, dstate, ctx: Context, *, target_state, target_params) -> Proposal:
        window = getattr(self.policy, "context_window", 0)
        if window:
            candidate, scored = self.policy.candidate(dstate)
            match = jax.lax.cond(
                jnp.any(scored),
                lambda: context_match(self.model, target_params, target_state, ctx.seq, ctx.seq_len, candidate,
                                      window),
                lambda: jnp.zeros(scored.shape, jnp.float32))
            dstate = self.policy.judge(dstate, match, scored)
        gate, draft_len = self.policy.choose(dstate)
        tree = self.tree
        b, k = ctx.root.shape[0], tree.num_nodes
        depths, parents, ranks = tree.depths, np.asarray(tree.parents), sibling_ranks(tree)
        widest = int(ranks.max()) + 1
        tokens = jnp.zeros((b, k), jnp.int32).at[:, 0].set(ctx.root)
        draft_probs = None
        keys = jax.random.split(ctx.key, tree.max_depth + 1)
        vocab = self.model.model_cfg.vocab_size
        for d in range(1, tree.max_depth + 1):
            nodes = np.flatnonzero(depths == d)
            m = int(np.sum(depths < d))  # breadth-first: the nodes above depth d are a prefix

            def shallower(tokens, m=m):
                logits, _ = self.model.apply({"params": target_params}, tokens[:, :m], state=target_state,
                                             parents=parents[:m], layer_gate=gate)
                return logits  # the pending entries are dropped: the target's state stays as it was

            logits = jax.lax.cond(jnp.any(draft_len >= d), shallower,
                                  lambda tokens, m=m: jnp.zeros((b, m, vocab), jnp.float32), tokens)
            new, probs = children_tokens(keys[d], logits[:, parents[nodes]], ranks[nodes], ctx.temperature, widest)
            tokens = tokens.at[:, nodes].set(new)
            if probs is not None:
                draft_probs = jnp.zeros((b, k, vocab), jnp.float32) if draft_probs is None else draft_probs
                draft_probs = draft_probs.at[:, nodes].set(probs)
        node_valid = jnp.asarray(depths)[None, :] <= draft_len[:, None]
        return Proposal(tokens, draft_probs, node_valid, dstate)

    def update(self, dstate, emitted, num_emitted):
        live = num_emitted > 0  # rows that finished commit nothing and learn nothing
        return self.policy.observe(dstate, jnp.maximum(num_emitted - 1, 0), live)

    def report(self, dstate) -> dict:
        """The policy's report of what it learned (see method.Drafter), if it makes one."""
        return self.policy.report(dstate) if hasattr(self.policy, "report") else {}


def build_gated(target, tree: TokenTree, policy, seed: int = 0) -> tuple[GatedSelfDrafter, tuple]:
    """(the drafter, its params: none, it drafts with the target's) for a method's `build`."""
    model = target.model if target.model.layout == "decode" else target.model.clone(layout="decode")
    return GatedSelfDrafter(model, tree, policy, seed), ()
