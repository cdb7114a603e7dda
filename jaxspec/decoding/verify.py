"""Verification of a draft token tree against the target model's logits.

One traversal serves every rule. Nodes are visited in index order while each row tracks its current node
(the deepest accepted one, initially the root). A node is tested when it is a valid child of the current
node; if it passes, it becomes the current node. Siblings after an accepted sibling no longer hang below
the current node, so they are skipped without extra bookkeeping, for any topological order. Among children
that would pass, the first in index order wins (for greedy with distinct sibling tokens at most one can).

Rules (p_u is the target distribution at node u, from ``sampling.warp_logits``; x_j is node j's token):

- ``"greedy"``: accept j iff x_j is the argmax of the target logits at the current node; the bonus token is
  the argmax after the last accepted node. Greedy output equals greedy autoregressive decoding.
- ``"rejection"``: speculative sampling with SpecInfer's recursive rejection over siblings. Each row keeps a
  residual distribution r (p at the current node when it becomes current). Node j, drafted from q_j, is
  accepted with probability min(1, r(x_j) / q_j(x_j)); on rejection r <- normalise(max(r - q_j, 0)). The
  bonus token is drawn from the final residual. Deterministic drafts (``draft_probs=None``) use one-hot
  q_j, so a rejection just removes x_j from r. The emitted tokens follow the target distribution exactly,
  provided every child was drawn independently from its q_j given its root path.
- ``"kseq"``: SpecTr's k-sequential selection (Sun et al., 2023) for multiple i.i.d. drafts. At a node u whose
  n valid children were drawn independently from one q_u, child j is accepted with probability
  min(1, p_u(x_j) / (rho_u q_u(x_j))), trying the children in index order; if all fail, the bonus is drawn from
  the residual normalise(p_u - c min(q_u, p_u / rho_u)), c = (1 - (1 - beta)^n) / beta, beta =
  sum_x min(q_u, p_u / rho_u). The emitted token then follows p_u for any rho_u with c <= rho_u; rho_u in
  [1, n] is the smallest such (bisection), which makes the acceptance largest. With one child it is plain
  speculative sampling. Unlike "rejection" it needs the children i.i.d. (not RSD's without-replacement
  siblings) and real draft distributions.
- ``"typical"``: Medusa's typical acceptance: node j passes iff p_parent(x_j) > min(eps, alpha *
  exp(-H(p_parent))). As Medusa defines it, among all root paths whose every node passes the longest one is
  accepted, ties going to the larger summed log p (not the first passing child, which can accept fewer
  tokens when several children pass). Not lossless; the bonus token is a draw from p at the last accepted
  node (its argmax at temperature 0). Its candidates are the drafter's top-k: the decode loop asks drafters for
  sampled drafts only under rejection and kseq (``engine.Sampling.draft_temperature``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding.sampling import greedy, sample, warp_logits
from jaxspec.decoding.trees import TokenTree
from jaxspec.errors import InputError

RULES = ("greedy", "rejection", "kseq", "typical")
# Bisection steps for SpecTr's rho: the bracket [1, n] shrinks 2^-24-fold; any bracket end is lossless.
_RHO_STEPS = 24


class VerifyResult(NamedTuple):
    """What one verification step accepted, per batch row.

    path: [B, K] int32 accepted node indices, root first (path[:, 0] == 0), 0 past ``num_accepted``.
    num_accepted: [B] int32 accepted nodes including the root (>= 1); also the number of tokens emitted.
    bonus: [B] int32 the token the target emits after the last accepted node.
    accepted_tokens: [B, K] int32 tokens emitted this step: the accepted drafts (nodes path[1:n]) then the
        bonus, 0 past ``num_accepted``.
    """

    path: jax.Array
    num_accepted: jax.Array
    bonus: jax.Array
    accepted_tokens: jax.Array


def _parents_per_row(tree, batch: int, num_nodes: int) -> jax.Array:
    """Parents as int32 [B, K] from a TokenTree or a traced parent array [K] / [B, K]."""
    if isinstance(tree, TokenTree):
        if tree.num_nodes != num_nodes:
            raise InputError(
                f"tree has {tree.num_nodes} nodes but target_logits/tree_tokens have K = {num_nodes} nodes"
            )
        return jnp.broadcast_to(jnp.asarray(tree.parents_array), (batch, num_nodes))
    parents = jnp.asarray(tree)
    if not jnp.issubdtype(parents.dtype, jnp.integer):
        raise InputError(f"tree must be a TokenTree or an int parent array, got dtype {parents.dtype}")
    if parents.shape not in ((num_nodes,), (batch, num_nodes)):
        raise InputError(
            f"parent array has shape {parents.shape}; expected ({num_nodes},) or ({batch}, {num_nodes})"
        )
    return jnp.broadcast_to(parents.astype(jnp.int32), (batch, num_nodes))


def _entropy(probs: jax.Array) -> jax.Array:
    """Entropy (nats) over the last axis, with 0 log 0 = 0."""
    safe = jnp.where(probs > 0, probs, 1.0)
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(safe), 0.0), axis=-1)


def _accepts_draft(uniform: jax.Array, target_prob: jax.Array, draft_prob: jax.Array) -> jax.Array:
    """True with probability min(1, target_prob / draft_prob) for uniform in [0, 1); no division."""
    return uniform * draft_prob < target_prob


def _residual_after_reject(residual: jax.Array, draft: jax.Array, fallback: jax.Array) -> jax.Array:
    """normalise(max(residual - draft, 0)); ``fallback`` where that has no mass (residual == draft)."""
    leftover = jnp.maximum(residual - draft, 0.0)
    mass = jnp.sum(leftover, axis=-1, keepdims=True)
    return jnp.where(mass > 0, leftover / jnp.where(mass > 0, mass, 1.0), fallback)


def _descend(parents: jax.Array, valid: jax.Array, test, aux):
    """Walks nodes 1..K-1 in order, moving each row to the first child of its current node that passes.

    ``test(j, current, candidate, aux) -> (accepted [B], aux)`` sees ``candidate``: rows where node j is a
    valid child of the current node; it must accept only candidate rows. Returns (current, path, count, aux).
    """
    batch, num_nodes = parents.shape
    slots = jnp.arange(num_nodes)

    def visit(j, carry):
        current, path, count, aux = carry
        candidate = (parents[:, j] == current) & valid[:, j]
        accepted, aux = test(j, current, candidate, aux)
        path = jnp.where(accepted[:, None] & (slots == count[:, None]), j, path)
        return jnp.where(accepted, j, current), path, count + accepted.astype(jnp.int32), aux

    start = (
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, num_nodes), jnp.int32),
        jnp.ones((batch,), jnp.int32),
        aux,
    )
    return jax.lax.fori_loop(1, num_nodes, visit, start)


def _longest_passing_path(parents: jax.Array, passes: jax.Array, log_probs: jax.Array):
    """(current, path, count) of the longest root path whose every node passes, ties to the larger summed
    `log_probs`; as `_descend` returns them. Nodes are in topological order (parents before children)."""
    batch, num_nodes = parents.shape
    rows = jnp.arange(batch)

    def accumulate(j, carry):
        ok, depth, score = carry
        parent = parents[:, j]
        ok = ok.at[:, j].set(passes[:, j] & ok[rows, parent])
        depth = depth.at[:, j].set(depth[rows, parent] + 1)
        return ok, depth, score.at[:, j].set(score[rows, parent] + log_probs[:, j])

    start = (jnp.ones((batch, num_nodes), bool), jnp.zeros((batch, num_nodes), jnp.int32),
             jnp.zeros((batch, num_nodes), jnp.float32))
    ok, depth, score = jax.lax.fori_loop(1, num_nodes, accumulate, start)
    deepest = jnp.max(jnp.where(ok, depth, 0), axis=1, keepdims=True)
    best = jnp.argmax(jnp.where(ok & (depth == deepest), score, -jnp.inf), axis=1).astype(jnp.int32)
    count = deepest[:, 0] + 1

    def climb(_, carry):  # write each ancestor of `best` at its depth
        node, path = carry
        path = path.at[rows, depth[rows, node]].set(node)
        return jnp.maximum(parents[rows, node], 0), path

    _, path = jax.lax.fori_loop(0, num_nodes, climb, (best, jnp.zeros((batch, num_nodes), jnp.int32)))
    return best, path, count


def _fixed_test(passes: jax.Array):
    """A test whose outcome per node is known in advance (greedy, typical): ``passes [B, K]``."""
    return lambda j, current, candidate, aux: (candidate & passes[:, j], aux)


def _rejection_test(probs: jax.Array, tree_tokens: jax.Array, draft_probs, uniforms: jax.Array):
    """The recursive-rejection test; its aux is the residual distribution [B, V]."""
    batch, _, vocab = probs.shape
    rows = jnp.arange(batch)

    def test(j, current, candidate, residual):
        token = tree_tokens[:, j]
        if draft_probs is None:
            draft = jax.nn.one_hot(token, vocab, dtype=jnp.float32)
        else:
            draft = draft_probs[:, j].astype(jnp.float32)
        accepted = candidate & _accepts_draft(uniforms[:, j], residual[rows, token], draft[rows, token])
        rejected = candidate & ~accepted
        after_reject = _residual_after_reject(residual, draft, probs[rows, current])
        residual = jnp.where(rejected[:, None], after_reject, residual)
        residual = jnp.where(accepted[:, None], probs[:, j], residual)
        return accepted, residual

    return test


def _children_draft(parents: jax.Array, valid: jax.Array, draft_probs: jax.Array, internal: np.ndarray):
    """(n [B, I], q [B, I, V]) for the nodes `internal` (those that may have children): their valid children and
    the draft distribution those were drawn from (their mean: under "kseq" every child of u came from one q_u)."""
    child_of = (parents[:, :, None] == jnp.asarray(internal)) & valid[:, :, None]  # [B, child, I]
    child_of = child_of.at[:, 0].set(False)
    n = jnp.sum(child_of, axis=1).astype(jnp.float32)
    q = jnp.einsum("bju,bjv->buv", child_of.astype(jnp.float32), draft_probs.astype(jnp.float32))
    return n, q / jnp.maximum(n, 1.0)[..., None]


def _kseq_scale(n: jax.Array, beta: jax.Array) -> jax.Array:
    """c = (1 - (1 - beta)^n) / beta, the mass factor of tokens accepted among n i.i.d. tries (n as beta -> 0)."""
    safe = jnp.where(beta > 1e-12, beta, 1.0)
    return jnp.where(beta > 1e-12, (1.0 - (1.0 - safe) ** n) / safe, n)


def _kseq_rho(probs: jax.Array, q: jax.Array, n: jax.Array) -> jax.Array:
    """[B, K] the smallest rho in [1, max(n, 1)] (to bisection precision, from above) with c(rho) <= rho.

    rho = max(n, 1) always qualifies (Bernoulli: 1 - (1 - beta)^n <= n beta); the bisection keeps `hi`
    qualifying, so the rule stays lossless whatever the precision."""
    def scale_minus_rho(rho):
        beta = jnp.sum(jnp.minimum(q, probs / rho[..., None]), axis=-1)
        return _kseq_scale(n, beta) - rho

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        ok = scale_minus_rho(mid) <= 0
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    hi = jnp.maximum(n, 1.0)
    _, hi = jax.lax.fori_loop(0, _RHO_STEPS, halve, (jnp.ones_like(hi), hi))
    return hi


def _kseq_residual(probs: jax.Array, q: jax.Array, n: jax.Array, rho: jax.Array) -> jax.Array:
    """normalise(p - c min(q, p / rho)) per node: the law of the bonus after all n children failed."""
    accepted_mass = jnp.minimum(q, probs / rho[..., None])
    scale = _kseq_scale(n, jnp.sum(accepted_mass, axis=-1))
    leftover = jnp.maximum(probs - scale[..., None] * accepted_mass, 0.0)
    mass = jnp.sum(leftover, axis=-1, keepdims=True)
    return jnp.where(mass > 0, leftover / jnp.where(mass > 0, mass, 1.0), probs)


def _emitted_tokens(path: jax.Array, count: jax.Array, bonus: jax.Array, tree_tokens: jax.Array) -> jax.Array:
    """Accepted draft tokens (path[1:count]) followed by the bonus; zeros after."""
    batch, num_nodes = path.shape
    slots = jnp.arange(num_nodes)
    path_tokens = tree_tokens[jnp.arange(batch)[:, None], path]
    following = jnp.concatenate([path_tokens[:, 1:], jnp.zeros_like(path_tokens[:, :1])], axis=1)
    last = count[:, None] - 1
    return jnp.where(slots < last, following, jnp.where(slots == last, bonus[:, None], 0)).astype(jnp.int32)


def _check_inputs(target_logits, tree_tokens, rule, key, draft_probs, node_valid, eps, alpha) -> None:
    if rule not in RULES:
        raise InputError(f"rule = {rule!r}; allowed: {', '.join(map(repr, RULES))}")
    if target_logits.ndim != 3:
        raise InputError(f"target_logits has shape {target_logits.shape}; expected [B, K, V]")
    batch, num_nodes, _ = target_logits.shape
    if tree_tokens.shape != (batch, num_nodes):
        raise InputError(f"tree_tokens has shape {tree_tokens.shape}; expected [B, K] = {(batch, num_nodes)}")
    if not jnp.issubdtype(tree_tokens.dtype, jnp.integer):
        raise InputError(f"tree_tokens has dtype {tree_tokens.dtype}; expected an integer dtype")
    if draft_probs is not None and draft_probs.shape != target_logits.shape:
        raise InputError(
            f"draft_probs has shape {draft_probs.shape}; expected target_logits' shape {target_logits.shape}"
        )
    if node_valid is not None and node_valid.shape != (batch, num_nodes):
        raise InputError(f"node_valid has shape {node_valid.shape}; expected [B, K] = {(batch, num_nodes)}")
    if rule == "kseq" and draft_probs is None:
        raise InputError("rule = 'kseq' (SpecTr) needs draft_probs: the distribution each child was drawn from "
                         "(a drafter that samples its drafts, at temperature > 0)")
    if rule != "greedy" and key is None:
        raise InputError(f"rule = {rule!r} samples tokens and needs a PRNG key (key=None given)")
    if isinstance(eps, (int, float)) and eps <= 0:
        raise InputError(f"typical_threshold = {eps} must be > 0")
    if isinstance(alpha, (int, float)) and alpha < 0:
        raise InputError(f"typical_alpha = {alpha} must be >= 0")


def verify_tree(
    target_logits: jax.Array,
    tree_tokens: jax.Array,
    tree: TokenTree | jax.Array,
    *,
    rule: str,
    key: jax.Array | None = None,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    draft_probs: jax.Array | None = None,
    node_valid: jax.Array | None = None,
    typical_threshold=0.09,
    typical_alpha=0.3,
) -> VerifyResult:
    """Accepts a root path of the draft tree and the target's bonus token, per batch row.

    target_logits: [B, K, V], the target's next-token logits at each node (they score its children).
    tree_tokens: [B, K] int, node tokens (node 0 holds the root token).
    tree: a static TokenTree, or a parent array [K] / [B, K] (traced; topological with node 0 the only
        root, which is not checked).
    rule: "greedy", "rejection", "kseq" or "typical" (see the module docstring). All but "greedy" need
        ``key``; "kseq" needs ``draft_probs``. temperature/top_k/top_p define the target distribution
        (``sampling.warp_logits``); the greedy rule ignores them.
    draft_probs: [B, K, V], the distribution node i was drawn from (rejection, kseq); None means
        deterministic drafts (one-hot at each token; rejection only).
    node_valid: [B, K] bool; invalid nodes are never accepted (node 0 is always kept).
    typical_threshold, typical_alpha: eps and alpha of the typical rule.

    Jittable with ``tree`` and ``rule`` static (and top_k/top_p static for their fast paths).
    """
    target_logits = jnp.asarray(target_logits)
    tree_tokens = jnp.asarray(tree_tokens)
    _check_inputs(
        target_logits, tree_tokens, rule, key, draft_probs, node_valid, typical_threshold, typical_alpha
    )
    batch, num_nodes, _ = target_logits.shape
    tree_tokens = tree_tokens.astype(jnp.int32)
    draft_probs = None if draft_probs is None else jnp.asarray(draft_probs)
    parents = _parents_per_row(tree, batch, num_nodes)
    valid = jnp.ones((batch, num_nodes), bool) if node_valid is None else jnp.asarray(node_valid, bool)
    rows = jnp.arange(batch)
    # Node j is judged by the distribution at its parent; node 0 (parent -1) is never judged.
    parent_nodes = jnp.maximum(parents, 0)

    if rule == "greedy":
        target_argmax = greedy(target_logits)
        passes = tree_tokens == target_argmax[rows[:, None], parent_nodes]
        current, path, count, _ = _descend(parents, valid, _fixed_test(passes), ())
        bonus = target_argmax[rows, current]
        return VerifyResult(path, count, bonus, _emitted_tokens(path, count, bonus, tree_tokens))

    accept_key, bonus_key = jax.random.split(key)
    probs = warp_logits(target_logits, temperature, top_k, top_p)
    if rule == "typical":
        threshold = jnp.minimum(typical_threshold, typical_alpha * jnp.exp(-_entropy(probs)))
        token_probs = probs[rows[:, None], parent_nodes, tree_tokens]
        passes = (token_probs > threshold[rows[:, None], parent_nodes]) & valid
        log_probs = jnp.log(jnp.maximum(token_probs, jnp.finfo(jnp.float32).tiny))
        current, path, count = _longest_passing_path(parents, passes, log_probs)
        bonus = sample(bonus_key, probs[rows, current])
    elif rule == "kseq":
        # rho's bisection over the vocabulary runs only at nodes that can have children (a static tree's
        # internal nodes); every other node has n = 0, rho = 1 and its residual is p.
        internal = (np.unique(tree.parents_array[1:]) if isinstance(tree, TokenTree)
                    else np.arange(num_nodes - 1))
        n_in, q_in = _children_draft(parents, valid, draft_probs, internal)
        rho_in = _kseq_rho(probs[:, internal], q_in, n_in)
        n = jnp.zeros((batch, num_nodes)).at[:, internal].set(n_in)
        rho = jnp.ones((batch, num_nodes)).at[:, internal].set(rho_in)
        q = jnp.zeros_like(probs).at[:, internal].set(q_in)
        node_q = q[rows[:, None], parent_nodes, tree_tokens]
        node_p = probs[rows[:, None], parent_nodes, tree_tokens]
        uniforms = jax.random.uniform(accept_key, (batch, num_nodes))
        passes = uniforms * rho[rows[:, None], parent_nodes] * node_q < node_p
        current, path, count, _ = _descend(parents, valid, _fixed_test(passes), ())
        bonus = sample(bonus_key, _kseq_residual(probs[rows, current], q[rows, current], n[rows, current],
                                                 rho[rows, current]))
    else:
        uniforms = jax.random.uniform(accept_key, (batch, num_nodes))
        test = _rejection_test(probs, tree_tokens, draft_probs, uniforms)
        current, path, count, residual = _descend(parents, valid, test, probs[:, 0])
        bonus = sample(bonus_key, residual)
    return VerifyResult(path, count, bonus, _emitted_tokens(path, count, bonus, tree_tokens))
