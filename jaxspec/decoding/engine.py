"""The decode loops: autoregressive and speculative, each one jitted `lax.while_loop` over a batch.

Both start with the same prefill (right-padded prompts, per-row lengths) and the same first token (sampled
from the target at the last prompt position), and emit tokens through the same `emit` step, so a row stops
on any of its stop ids or at `max_new_tokens` identically in both. Rows are independent: each has its own
length, accepted count and stop; finished rows commit nothing while others go on.

`stream=True` (static) hands every round's emitted tokens to the host through `jax.debug.callback`, to the
sink installed with `streaming(sink)`; with stream=False the loop holds no callback at all.

`run_compiled(loop, args, statics)` compiles a loop ahead of time once per (statics, argument shapes) and
keeps the executable, so a caller can report compile time apart from decode time and count compilations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding.drafters import Context
from jaxspec.decoding.sampling import sample, warp_logits
from jaxspec.decoding.trees import TokenTree
from jaxspec.decoding.verify import RULES, verify_tree
from jaxspec.errors import InputError
from jaxspec.models.decode_layout import for_decoding
from jaxspec.models.lm import DecoderLM, head_logits
from jaxspec.state import commit, init_decode_state, share_prefix


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The target distribution (see sampling.warp_logits) and the verification rule; all static."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    rule: str = "greedy"
    typical_threshold: float = 0.09
    typical_alpha: float = 0.3

    def __post_init__(self):
        if self.rule not in RULES:
            raise InputError(f"unknown verification rule {self.rule!r}; allowed: {RULES}")
        if self.temperature < 0:
            raise InputError(f"temperature={self.temperature} must be >= 0")
        if self.rule in ("rejection", "kseq") and self.temperature == 0:
            raise InputError(f"rule={self.rule!r} samples; use temperature > 0 (or rule='greedy' at temperature 0)")

    @property
    def draft_temperature(self) -> float:
        """The temperature drafters draw at: the target's under the rules that read draft distributions
        (rejection, kseq); 0 under greedy and typical, whose candidates are the drafter's top-k, as in Medusa's
        typical acceptance (a sampled candidate there would only add noise to the drafts)."""
        return self.temperature if self.rule in ("rejection", "kseq") else 0.0

    def pick(self, key, logits):
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample(key, warp_logits(logits, self.temperature, self.top_k, self.top_p))


class Output(NamedTuple):
    tokens: jax.Array  # [B, max_new] generated ids (0 past num_tokens)
    num_tokens: jax.Array  # [B]
    target_steps: jax.Array  # [B] target forwards after the prefill while the row was running
    accepted: jax.Array  # [B] tokens committed by those forwards (bonus included)
    drafter_report: dict | None = None  # the drafter's `report` of its final state (drafters that learn)
    features: Features | None = None  # the target's hidden states (autoregressive_loop with record_features)


class Features(NamedTuple):
    """The target's hidden states at every position of prompt and output, float16, as a feature drafter
    trains on them; positions past a row's prompt + output are undefined."""
    final: jax.Array  # [B, S, d] after the final norm
    layers: jax.Array | None  # [B, S, k, d] the residual stream after each recorded layer (None for none)


def _feature_values(out, layers: tuple[int, ...]) -> Features:
    """`Features` of a forward's LMOutput over its T positions: [B, T, d] and [B, T, k, d]."""
    layered = jnp.stack([out.layer_hidden[i] for i in layers], axis=2).astype(jnp.float16) if layers else None
    return Features(out.hidden.astype(jnp.float16), layered)


def _record_features(features: Features, out, layers: tuple[int, ...], positions, rows) -> Features:
    """`features` with the one-token forward `out`'s values written at `positions` [B] where `rows` [B]."""
    index = jnp.where(rows, positions, features.final.shape[1])  # out of range: dropped
    write = lambda buffer, value: jax.vmap(lambda b, i, v: b.at[i].set(v, mode="drop"))(buffer, index, value[:, 0])
    return jax.tree.map(write, features, _feature_values(out, layers))


class Emission(NamedTuple):
    seq: jax.Array  # [B, S] prompt, then emitted tokens
    seq_len: jax.Array  # [B]
    num_out: jax.Array  # [B]
    done: jax.Array  # [B]


def emit(em: Emission, tokens, count, *, eos_ids: tuple[int, ...], max_new: int) -> tuple[Emission, jax.Array]:
    """Append up to `count` of tokens [B, K] per row, stopping after a stop id (any of `eos_ids`) and at
    max_new. Returns the new emission and the number actually appended per row."""
    k = tokens.shape[1]
    j = jnp.arange(k)[None, :]
    count = jnp.where(em.done, 0, count)
    live = j < count[:, None]
    is_eos = live & jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros_like(live)
    count = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, count)
    count = jnp.minimum(count, max_new - em.num_out)
    idx = jnp.where(j < count[:, None], em.seq_len[:, None] + j, em.seq.shape[1])  # out of range: dropped
    seq = jax.vmap(lambda s, i, t: s.at[i].set(t, mode="drop"))(em.seq, idx, tokens.astype(em.seq.dtype))
    hit_eos = (is_eos & (j < count[:, None])).any(1)
    num_out = em.num_out + count
    return Emission(seq, em.seq_len + count, num_out, em.done | hit_eos | (num_out >= max_new)), count


# The host side of `stream=True`: the jitted loop calls `_to_sink`, which forwards to the installed sink.
_SINK: list[Callable | None] = [None]


def _to_sink(tokens, counts) -> None:
    if _SINK[0] is not None:
        _SINK[0](np.asarray(tokens), np.asarray(counts))


@contextlib.contextmanager
def streaming(sink: Callable[[np.ndarray, np.ndarray], None] | None):
    """Route the emitted tokens of loops run with stream=True to `sink(tokens [B, K], counts [B])`."""
    previous, _SINK[0] = _SINK[0], sink
    try:
        yield
    finally:
        _SINK[0] = previous


def emit_tokens(em: Emission, tokens, count, *, eos_ids: tuple[int, ...], max_new: int, stream: bool):
    """`emit`, then (stream=True) the appended tokens to the host, in order."""
    em, appended = emit(em, tokens, count, eos_ids=eos_ids, max_new=max_new)
    if stream:
        jax.debug.callback(_to_sink, tokens, appended, ordered=True)
    return em, appended


def _outputs(em: Emission, prompt_lens, max_new: int):
    idx = prompt_lens[:, None] + jnp.arange(max_new)[None, :]
    toks = jnp.take_along_axis(em.seq, jnp.minimum(idx, em.seq.shape[1] - 1), axis=1)
    return jnp.where(jnp.arange(max_new)[None, :] < em.num_out[:, None], toks, 0)


def run_if(pred, forward, state, *args):
    """forward(state, *args) -> (out, state) where `pred` holds; else (zeros of out's shapes, state) without
    running it (a lax.cond: a prefill part that no row needs costs nothing)."""
    shapes = jax.eval_shape(forward, state, *args)[0]
    skip = lambda state, *args: (jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), state)
    return jax.lax.cond(pred, forward, skip, state, *args)


def chunked_prefill(model: DecoderLM, params, prompts, prompt_lens, state, chunk: int):
    """The prompt forward in chunks of `chunk` tokens (Sarathi-style chunked prefill; exact): a fresh prefill of
    the first chunk, then a scan of extends, each row taking the part of the chunk its prompt still has (a chunk
    no row reaches is skipped).
    Returns (LMOutput over all P positions, state), as one fresh prefill of the whole prompt does."""
    b, p = prompts.shape
    if chunk <= 0 or chunk >= p:
        return model.apply({"params": params}, prompts, state=state, num_new=prompt_lens, return_hidden=True,
                           fresh=True)
    if p % chunk:
        raise InputError(f"prefill_chunk={chunk} must divide the padded prompt width {p}")
    in_chunk = lambda c: jnp.clip(prompt_lens - c * chunk, 0, chunk).astype(jnp.int32)
    first, state = model.apply({"params": params}, prompts[:, :chunk], state=state, num_new=in_chunk(0),
                               return_hidden=True, fresh=True)

    def extend(state, c):
        tokens = jax.lax.dynamic_slice_in_dim(prompts, c * chunk, chunk, axis=1)
        return model.apply({"params": params}, tokens, state=state, num_new=in_chunk(c), return_hidden=True)

    # A chunk that is padding in every row is skipped, not run with nothing to add: a prompt padded to its
    # power-of-two bucket (160 tokens to 256) then costs the chunks it fills, not the bucket's width. Its
    # positions get zeros (padding is read nowhere).
    def step(state, c):
        out, state = run_if(jnp.any(in_chunk(c) > 0), extend, state, c)
        return state, out

    state, rest = jax.lax.scan(step, state, jnp.arange(1, p // chunk))
    # rest: [chunks - 1, B, chunk, ...] -> [B, (chunks - 1) * chunk, ...] after the first chunk's positions
    join = lambda head, tail: jnp.concatenate(
        [head, jnp.moveaxis(tail, 0, 1).reshape(b, -1, *head.shape[2:])], axis=1)
    return jax.tree.map(join, first, rest), state


def _prefill_shared(model: DecoderLM, params, prompts, prompt_lens, max_len: int, shared: int):
    """The prefill of prompts whose first `shared` tokens are the same in every row (Hydragen): those tokens are
    prefilled once and their keys/values held once for all rows (`state.share_prefix`); each row's remainder is
    then an extend into its own suffix (skipped when no row has one: samples of one prompt). Returns (LMOutput
    over all prompt positions, state), as `chunked_prefill` does."""
    b, p = prompts.shape
    state = init_decode_state(model.model_cfg, 1, shared)
    head, state = model.apply({"params": params}, prompts[:1, :shared], state=state,
                              num_new=jnp.full((1,), shared, jnp.int32), return_hidden=True, fresh=True)
    state = share_prefix(state, b, max_len - shared)
    head = jax.tree.map(lambda x: jnp.broadcast_to(x, (b, *x.shape[1:])), head)
    if shared == p:
        return head, state
    rest = jnp.maximum(prompt_lens - shared, 0).astype(jnp.int32)
    extend = lambda state: model.apply({"params": params}, prompts[:, shared:], state=state, num_new=rest,
                                       return_hidden=True)
    tail, state = run_if(jnp.any(rest > 0), extend, state)
    return jax.tree.map(lambda a, z: jnp.concatenate([a, z], axis=1), head, tail), state


def narrowest_prefill(model: DecoderLM, params, prompts, prompt_lens, state, widths: tuple[int, ...] = ()):
    """The prompt forward at the narrowest of `widths` and the padded width P that holds every row's prompt (a
    lax.switch over one fresh prefill per width). A caller that pads prompts of many lengths to one width, so
    that they share one compiled loop, would otherwise prefill each at that width: on a 2-core CPU SmolLM2's
    prefill of 160 tokens takes half to two thirds as long at width 160 as at 256. Returns (LMOutput over all P
    positions, the positions past the width run zeros, state), as one prefill at P does."""
    b, p = prompts.shape
    widths = sorted({int(w) for w in widths if 0 < w < p}) + [p]

    def at(width):
        def prefill(state):
            out, state = model.apply({"params": params}, prompts[:, :width], state=state, num_new=prompt_lens,
                                     return_hidden=True, fresh=True)
            pad = lambda x: jnp.pad(x, [(0, 0), (0, p - width)] + [(0, 0)] * (x.ndim - 2))
            return jax.tree.map(pad, out), state
        return prefill

    if len(widths) == 1:
        return at(p)(state)
    narrowest = jnp.searchsorted(jnp.asarray(widths), jnp.max(prompt_lens))  # the first width >= every prompt
    return jax.lax.switch(narrowest, [at(w) for w in widths], state)


def _prefill(model: DecoderLM, params, prompts, prompt_lens, max_len, sampling: Sampling, key, eos_ids, max_new,
             extra_slots: int, stream: bool, prefill_chunk: int = 0, shared_prefix: int = 0,
             prefill_widths: tuple[int, ...] = ()):
    b, p = prompts.shape
    if shared_prefix:
        out, state = _prefill_shared(model, params, prompts, prompt_lens, max_len, shared_prefix)
    else:
        state = init_decode_state(model.model_cfg, b, max_len)
        if prefill_chunk:
            out, state = chunked_prefill(model, params, prompts, prompt_lens, state, prefill_chunk)
        else:
            out, state = narrowest_prefill(model, params, prompts, prompt_lens, state, prefill_widths)
    rows = jnp.arange(b)
    last = jnp.maximum(prompt_lens - 1, 0)
    # Only the last prompt position goes through the LM head here (at a 256-wide prompt the whole head is a
    # third of SmolLM2's prefill); the forward's own logits cost nothing unless a caller reads `out.logits`.
    first = sampling.pick(key, head_logits(model, params, out.hidden[rows, last]))
    seq = jnp.zeros((b, p + max_new + extra_slots), jnp.int32).at[:, :p].set(prompts)
    em = Emission(seq, prompt_lens.astype(jnp.int32), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
    em, _ = emit_tokens(em, first[:, None], jnp.ones((b,), jnp.int32), eos_ids=eos_ids, max_new=max_new,
                        stream=stream)
    return state, first, out.hidden[rows, last], em, out  # unused outputs cost nothing under jit


def carried_weights(params):
    """What a loop carries of `params` so that its body reads them through `read_weights`: the params
    themselves if they hold int8 weights, else None (the body reads the params it closes over).

    XLA hoists loop-invariant work out of a while_loop, and dequantising int8 weights is loop-invariant: it
    would run once before the loop, and every step would stream the float32 copies, four times the bytes.
    Carried through an optimization barrier each iteration, the weights are no longer provably invariant, and
    their conversion fuses into each product inside the loop."""
    return params if any(leaf.dtype == jnp.int8 for leaf in jax.tree.leaves(params)) else None


def read_weights(params, carried):
    """(params for this iteration, the carry for the next): see `carried_weights`."""
    if carried is None:
        return params, None
    carried = jax.lax.optimization_barrier(carried)
    return carried, carried


@functools.partial(jax.jit, static_argnames=("model", "max_new", "max_len", "sampling", "eos_ids", "stream",
                                             "checked", "prefill_chunk", "shared_prefix", "record_features",
                                             "prefill_widths"))
def autoregressive_loop(model: DecoderLM, params, prompts, prompt_lens, key, *, max_new: int, max_len: int,
                        sampling: Sampling, eos_ids: tuple[int, ...] = (), stream: bool = False,
                        checked: bool = False, prefill_chunk: int = 0, shared_prefix: int = 0,
                        record_features: tuple[int, ...] | None = None,
                        prefill_widths: tuple[int, ...] = ()) -> Output:
    """One token per target forward: the baseline every speculative method must reproduce.

    `checked`: traced with jaxspec.checks enabled (run it through checks.run_checked); a static argument so
    that checked and unchecked programs never share a trace. `prefill_chunk` > 0: the prompt is prefilled in
    chunks of that many tokens (`chunked_prefill`; same output). `shared_prefix` > 0: every row's prompt starts
    with the same that many tokens (samples of one prompt, or one system prompt), prefilled once and attended as
    one shared prefix (`_prefill_shared`, `state.SharedPrefixCache`; same output). `prefill_widths` (without
    either): narrower prompt widths at which the prefill is also compiled; it runs at the narrowest that holds
    every row's prompt (`narrowest_prefill`; same output).

    `record_features` (layer indices, possibly none): the output also holds `Features`, the target's hidden
    states at every prompt and output position (the residual streams after those layers too), taken from the
    prefill and the steps that compute them anyway: what a feature drafter's training set stores. Each row then
    runs one forward more, over its last token, so that this position has its state as well."""
    model, params = for_decoding(model, params)  # once per call, outside the while_loop (a no-op if done before)
    key, k0 = jax.random.split(key)
    state, token, _, em, out = _prefill(model, params, prompts, prompt_lens, max_len, sampling, k0, eos_ids,
                                        max_new, 1, stream, prefill_chunk, shared_prefix, prefill_widths)
    b, p = prompts.shape
    steps = jnp.zeros((b,), jnp.int32)
    record = record_features is not None
    features = None
    if record:
        width = em.seq.shape[1]
        features = jax.tree.map(lambda x: jnp.zeros((b, width, *x.shape[2:]), x.dtype).at[:, :p].set(x),
                                _feature_values(out, record_features))
    fed = jnp.zeros((b,), bool) if record else None  # the row's last token has had its forward

    def body(carry):
        state, token, em, steps, key, carried, features, fed = carry
        weights, carried = read_weights(params, carried)
        key, k = jax.random.split(key)
        running = ~em.done
        feeding = ~fed if record else running
        out, state = model.apply({"params": weights}, token[:, None], state=state,
                                 num_new=feeding.astype(jnp.int32), return_hidden=record)
        if record:  # the token fed sits at seq_len - 1; a row done before this step has fed its last token now
            features = _record_features(features, out, record_features, em.seq_len - 1, feeding)
            fed, out = fed | em.done, out.logits
        token = sampling.pick(k, out[:, 0])
        em, _ = emit_tokens(em, token[:, None], jnp.ones((b,), jnp.int32), eos_ids=eos_ids, max_new=max_new,
                            stream=stream)
        return state, token, em, steps + running, key, carried, features, fed

    carry = (state, token, em, steps, key, carried_weights(params), features, fed)
    unfinished = (lambda c: ~jnp.all(c[7])) if record else (lambda c: ~jnp.all(c[2].done))
    _, _, em, steps, _, _, features, _ = jax.lax.while_loop(unfinished, body, carry)
    return Output(_outputs(em, prompt_lens, max_new), em.num_out, steps, steps, features=features)


def drafter_features(drafter, out):
    """What a feature drafter reads of a target forward's LMOutput: the final hidden states [B, T, d], or with
    `feature_layers` (EAGLE-3) the residual streams after those layers, concatenated [B, T, d * layers]."""
    layers = tuple(getattr(drafter, "feature_layers", ()))
    if not layers:
        return out.hidden
    return jnp.concatenate([out.layer_hidden[i] for i in layers], axis=-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Adaptive:
    """Draft-length schedule for chains: +grow when every draft was accepted, -shrink otherwise."""

    initial: int = 0  # 0: off (always the full tree)
    grow: int = 2
    shrink: int = 1


@functools.partial(jax.jit, static_argnames=("model", "drafter", "max_new", "max_len", "sampling", "eos_ids",
                                             "adaptive", "stream", "checked", "prefill_chunk", "shared_prefix",
                                             "prefill_widths"))
def speculative_loop(model: DecoderLM, params, drafter, draft_params, prompts, prompt_lens, key, *, max_new: int,
                     max_len: int, sampling: Sampling, eos_ids: tuple[int, ...] = (), adaptive: Adaptive = Adaptive(),
                     stream: bool = False, checked: bool = False, prefill_chunk: int = 0,
                     shared_prefix: int = 0, prefill_widths: tuple[int, ...] = ()) -> Output:
    """Draft a tree, verify it with one target forward, commit the accepted path; repeat per row. `checked`,
    `prefill_chunk`, `shared_prefix` and `prefill_widths`: as in autoregressive_loop (the drafter keeps its own
    state as usual)."""
    tree: TokenTree = drafter.tree
    if sampling.rule == "kseq" and getattr(drafter, "without_replacement", False):
        raise InputError("rule='kseq' (SpecTr) needs siblings drawn independently; this drafter draws them "
                         "without replacement (method 'rsd'): use rule='rejection' with it")
    k = tree.num_nodes
    model, params = for_decoding(model, params)  # once per call, outside the while_loop (a no-op if done before)
    b = prompts.shape[0]
    rows = jnp.arange(b)
    key, k0 = jax.random.split(key)
    state, root, hidden, em, prompt_out = _prefill(model, params, prompts, prompt_lens, max_len, sampling, k0,
                                                   eos_ids, max_new, k, stream, prefill_chunk, shared_prefix,
                                                   prefill_widths)
    # Optional hook: a drafter with `reads_features` (a feature drafter, EAGLE) gets the target's final hidden
    # states, or with `feature_layers` (EAGLE-3) those layers' residual streams concatenated: at every prompt
    # position (init) and at the accepted path's nodes (update), keyword `features`.
    reads_features = getattr(drafter, "reads_features", False)
    features = {"features": drafter_features(drafter, prompt_out)} if reads_features else {}
    dstate = drafter.init(draft_params, prompts, prompt_lens, max_len, root, **features)
    # Optional hook: a drafter with `feedback_top_k` > 0 sees the target's top-k next tokens at every prompt
    # token and, each round, at every tree node (`observe(dstate, tokens, top_k_next, valid)`).
    feedback_k = getattr(drafter, "feedback_top_k", 0)
    if feedback_k:
        in_prompt = jnp.arange(prompts.shape[1])[None, :] < prompt_lens[:, None]
        dstate = drafter.observe(dstate, prompts, jax.lax.top_k(prompt_out.logits, feedback_k)[1], in_prompt)
    # Optional hook: a drafter with `reads_target_state` drafts over the target's own cache (self-drafting that
    # keeps no cache of its own) and gets, each round, keywords `target_state` (the committed tokens up to the
    # root's parent: the root is not in it) and `target_params` (the decode-layout params this loop runs).
    reads_target_state = getattr(drafter, "reads_target_state", False)
    depths = jnp.asarray(tree.depths)
    draft_len = jnp.full((b,), adaptive.initial or tree.max_depth, jnp.int32)
    zeros = jnp.zeros((b,), jnp.int32)

    def body(carry):
        state, dstate, root, hidden, em, steps, accepted, draft_len, key, (carried, draft_carried) = carry
        target_params, carried = read_weights(params, carried)
        drafter_params, draft_carried = read_weights(draft_params, draft_carried)
        key, kd, kv = jax.random.split(key, 3)
        ctx = Context(root, em.seq, em.seq_len, hidden, kd, sampling.draft_temperature)
        target = {"target_state": state, "target_params": target_params} if reads_target_state else {}
        prop = drafter.propose(drafter_params, dstate, ctx, **target)
        valid = prop.node_valid
        if adaptive.initial:
            in_budget = depths[None, :] <= draft_len[:, None]
            valid = in_budget if valid is None else valid & in_budget
        running = ~em.done

        shape = tree if prop.parents is None else prop.parents  # a dynamic tree: per row, traced

        def verify(logits, node_valid):
            return verify_tree(logits, prop.tokens, shape, rule=sampling.rule, key=kv,
                               temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                               draft_probs=prop.draft_probs, node_valid=node_valid,
                               typical_threshold=sampling.typical_threshold, typical_alpha=sampling.typical_alpha)

        def whole_tree(state):
            parents = tree.parents_array if prop.parents is None else prop.parents
            out, pending = model.apply({"params": target_params}, prop.tokens, state=state, parents=parents,
                                       return_hidden=True)
            res = verify(out.logits, valid)
            return (commit(pending, res.path, jnp.where(running, res.num_accepted, 0)), res, out.hidden, out.logits,
                    drafter_features(drafter, out))

        def root_only(state):
            # No row has a draft: the round is an autoregressive step (a one-token extend of the root), and
            # verifying the root alone gives the tokens (and, sampling, the draw) the whole tree would.
            out, state = model.apply({"params": target_params}, prop.tokens[:, :1], state=state,
                                     num_new=running.astype(jnp.int32), return_hidden=True)
            logits = jnp.broadcast_to(out.logits, (b, k, out.logits.shape[-1]))
            res = verify(logits, jnp.zeros((b, k), bool))
            spread = lambda x: jnp.broadcast_to(x, (b, k, x.shape[-1]))
            return state, res, spread(out.hidden), logits, spread(drafter_features(drafter, out))

        if valid is None:  # every node is a draft
            state, res, node_hidden, node_logits, node_features = whole_tree(state)
        else:
            any_draft = jnp.any(valid[:, 1:] & running[:, None])
            state, res, node_hidden, node_logits, node_features = jax.lax.cond(any_draft, whole_tree, root_only,
                                                                               state)
        n = jnp.where(running, res.num_accepted, 0)
        last = jnp.take_along_axis(res.path, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        hidden = jnp.where(running[:, None], node_hidden[rows, last], hidden)
        em, _ = emit_tokens(em, res.accepted_tokens, n, eos_ids=eos_ids, max_new=max_new, stream=stream)
        features = {"features": node_features[rows[:, None], res.path]} if reads_features else {}
        dstate = drafter.update(prop.state, res.accepted_tokens, n, **features)
        if feedback_k:
            scored = running[:, None] if prop.node_valid is None else prop.node_valid & running[:, None]
            dstate = drafter.observe(dstate, prop.tokens, jax.lax.top_k(node_logits, feedback_k)[1], scored)
        if adaptive.initial:
            full = res.num_accepted - 1 >= draft_len
            grown = jnp.where(full, draft_len + adaptive.grow, draft_len - adaptive.shrink)
            draft_len = jnp.where(running, jnp.clip(grown, 1, tree.max_depth), draft_len)
        return (state, dstate, res.bonus, hidden, em, steps + running, accepted + n, draft_len, key,
                (carried, draft_carried))

    weights = (carried_weights(params), carried_weights(draft_params))
    carry = (state, dstate, root, hidden, em, zeros, zeros, draft_len, key, weights)
    carry = jax.lax.while_loop(lambda c: ~jnp.all(c[4].done), body, carry)
    em, steps, accepted = carry[4], carry[5], carry[6]
    report = drafter.report(carry[1]) if hasattr(drafter, "report") else None
    return Output(_outputs(em, prompt_lens, max_new), em.num_out, steps, accepted, report)


def bucket_width(width: int, minimum: int = 16) -> int:
    """Prompt widths are padded to powers of two (at least `minimum`), so prompts of many lengths share a
    handful of compiled shapes."""
    return max(minimum, 1 << max(int(width) - 1, 0).bit_length())


def narrower_buckets(width: int, count: int = 1, minimum: int = 64) -> tuple[int, ...]:
    """The `count` largest bucket widths below `width` (none under `minimum`): where a loop whose prompts are
    padded to one fixed width (many lengths, one compiled program) also compiles its prefill
    (`narrowest_prefill`). One by default: each costs a prefill's compile (~1.2 s for SmolLM2's scanned stack)."""
    widths, w = [], bucket_width(minimum, minimum)
    while w < width:
        widths.append(w)
        w = bucket_width(w + 1, minimum)
    return tuple(widths[-count:]) if count else ()


def bucket_len(length: int, multiple: int = 64) -> int:
    """Decode-state lengths are rounded up to a multiple of 64: few shapes, little unused cache."""
    return -(-int(length) // multiple) * multiple


def pad_prompts(prompts: list[list[int]], pad_id: int = 0, width: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to [B, width] int32 (default: the longest prompt) and return per-row lengths."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    width = longest if width is None else width
    if width < longest:
        raise InputError(f"prompt_width={width} is shorter than the longest prompt ({longest} tokens)")
    out = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out, np.asarray([len(p) for p in prompts], np.int32)


def required_max_len(prompt_width: int, max_new: int, tree_nodes: int) -> int:
    return prompt_width + max_new + tree_nodes + 1


def check_fits(model_cfg, prompt_lens, max_new: int, tree_nodes: int) -> int:
    """The decode state's length: prompt + new tokens + one tree must fit the configured context."""
    need = required_max_len(int(np.max(prompt_lens)), max_new, tree_nodes)
    if need > model_cfg.max_len:
        raise InputError(f"prompt of {int(np.max(prompt_lens))} tokens + max_new_tokens={max_new} + a tree of "
                         f"{tree_nodes} nodes needs a context of {need}, longer than model.max_len="
                         f"{model_cfg.max_len}")
    return need


def plan_shapes(model_cfg, prompt_lens, max_new: int, tree_nodes: int, prompt_width: int | None = None
                ) -> tuple[int, int]:
    """(prompt width, decode-state length) for a request: bucketed, unless the buckets would overflow the
    model's context while the exact sizes fit. `prompt_width` fixes the width (e.g. one for a whole suite)."""
    longest = int(np.max(prompt_lens))
    check_fits(model_cfg, prompt_lens, max_new, tree_nodes)
    if prompt_width is not None and prompt_width < longest:
        raise InputError(f"prompt_width={prompt_width} is shorter than the longest prompt ({longest} tokens)")
    width = prompt_width or bucket_width(longest)
    if required_max_len(width, max_new, tree_nodes) > model_cfg.max_len:
        width = prompt_width or longest
    check_fits(model_cfg, [width], max_new, tree_nodes)
    return width, min(bucket_len(required_max_len(width, max_new, tree_nodes)), model_cfg.max_len)


# ------------------------------------------------------------------------------------- ahead-of-time compiles

_EXECUTABLES: dict = {}
_MAX_EXECUTABLES = 64


def clear_compiled() -> None:
    """Drop the loops compiled by `run_compiled` (with jax.clear_caches(), what a long-lived process calls to
    release compiled programs: each holds memory mappings, and XLA:CPU fails once a process has more than the
    kernel allows, vm.max_map_count)."""
    _EXECUTABLES.clear()


def _signature(dynamic: dict) -> tuple:
    leaves, treedef = jax.tree.flatten(dynamic)
    return treedef, tuple((np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x),
                           getattr(x, "sharding", None)) for x in leaves)


def run_compiled(loop, dynamic: dict, statics: dict) -> tuple[Output, float]:
    """Run jitted `loop(**dynamic, **statics)` through an executable compiled once per (statics, shapes of the
    dynamic arguments). Returns (output, seconds spent compiling in this call: 0.0 when it was cached)."""
    key = (loop, tuple(sorted(statics.items())), _signature(dynamic))
    compile_s = 0.0
    executable = _EXECUTABLES.get(key)
    if executable is None:
        start = time.perf_counter()
        executable = loop.lower(**dynamic, **statics).compile()
        compile_s = time.perf_counter() - start
        if len(_EXECUTABLES) >= _MAX_EXECUTABLES:
            _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
        _EXECUTABLES[key] = executable
    return executable(**dynamic), compile_s
