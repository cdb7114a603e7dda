"""DecoderLM: a stack of mixer blocks chosen by a per-layer pattern, a final norm and an LM head.

    model = DecoderLM(cfg.model)
    params = model.init(rng, tokens)["params"]
    logits = model.apply({"params": params}, tokens)                                  # full causal forward
    logits, state = model.apply(v, tokens, state=state, num_new=n)                    # extend (prefill/append)
    logits, state = model.apply(v, tokens, state=state, parents=parents)              # tree verify (pending)
    state = commit(state, path, num_accepted)

`granularity` (MatFormer, global or per layer), `skip_layers` (layer-skip drafting) and `skip_ffn` (FFN-skip
drafting) are static apply-time options; `layer_gate` (traced) drops layers per token (exits, skip-set search).
`return_hidden=True` returns `LMOutput(logits, hidden, layer_hidden)` in place of the logits.

`layout` says how the parameters are stored: "standard" (training, checkpoints, HF/GGUF import) or "decode"
(fused projections, optionally int8; built once from standard ones by `decode_layout.for_decoding`). Both
give the same logits (int8: those of the quantised weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxspec import checks
from jaxspec import config as config_lib
from jaxspec.config import MixerKind
from jaxspec.errors import InputError
from jaxspec.models import layer_scan
from jaxspec.models.attention import Attention
from jaxspec.models.layers import Embed, MatFormerFFN, RMSNorm, VocabProjection, dtype_of, weight_dtype_of
from jaxspec.models.linear_attention import LinearAttention
from jaxspec.models.mamba import Mamba
from jaxspec.models.mixer import Mixer
from jaxspec.models.step import Mode, Step
from jaxspec.ops import heavy_hitter
from jaxspec.state import DecodeState, KVCache, node_depths, stacked_state, tree_ancestor_mask, validate_parents
from jaxspec.state import per_layer as per_layer_state

MIXER_MODULES = {MixerKind.ATTENTION: Attention, MixerKind.LINEAR_ATTENTION: LinearAttention, MixerKind.MAMBA: Mamba}
MIXER_NAMES = {MixerKind.ATTENTION: "attn", MixerKind.LINEAR_ATTENTION: "linear_attn", MixerKind.MAMBA: "mamba"}
LAYOUTS = ("standard", "decode")


class LMOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    hidden: jax.Array  # [B, T, d_model] after the final norm (what Medusa heads read)
    layer_hidden: tuple  # per layer, the residual stream after that layer (exit points for layer skipping)


def has_ffn(model_cfg, kind: MixerKind) -> bool:
    return kind != MixerKind.MAMBA or model_cfg.mamba.ffn


def make_mixer(model_cfg, kind: MixerKind, layer: int, layout: str = "standard") -> Mixer:
    """The mixer module of `layer` (see models/mixer.py); attention takes the layer's sliding window, RoPE base
    and the layout."""
    if kind == MixerKind.ATTENTION:
        return Attention(model_cfg, window=config_lib.layer_window(model_cfg, layer),
                         rope_theta=config_lib.layer_rope_theta(model_cfg, layer), layout=layout,
                         name=MIXER_NAMES[kind])
    return MIXER_MODULES[kind](model_cfg, name=MIXER_NAMES[kind])


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)).

    With `sandwich_norms` (Gemma) the mixer's and the FFN's outputs are normalised again before each add.
    """

    model_cfg: Any
    kind: MixerKind
    layer: int  # index in the stack (FFN widths, windows and RoPE bases may differ per layer)
    layout: str = "standard"

    @nn.compact
    def __call__(self, x, step: Step, cache, granularity, skip_ffn: bool = False):
        """`skip_ffn`: the FFN sub-block is left out (the mixer still runs, so the cache stays complete). The
        FFN's input residual stream is sown as intermediates "ffn_input" (calibration reads it; free otherwise)."""
        cfg = self.model_cfg
        mixer = make_mixer(cfg, self.kind, self.layer, self.layout)
        h, new = mixer(RMSNorm(cfg.rms_eps, name="mixer_norm")(x), step, cache)
        if cfg.sandwich_norms:
            h = RMSNorm(cfg.rms_eps, name="post_mixer_norm")(h)
        x = x + h
        if has_ffn(cfg, self.kind) and not skip_ffn:
            self.sow("intermediates", "ffn_input", x)
            ffn = MatFormerFFN(cfg.d_model, config_lib.ffn_hidden_sizes(cfg, self.layer), dtype_of(cfg),
                               cfg.ffn_activation, layout=self.layout, weight_dtype=weight_dtype_of(cfg), name="ffn")
            h = ffn(RMSNorm(cfg.rms_eps, name="ffn_norm")(x), granularity)
            if cfg.sandwich_norms:
                h = RMSNorm(cfg.rms_eps, name="post_ffn_norm")(h)
            x = x + h
        return x, new


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def make_step(tokens, state: DecodeState | None, parents, num_new, fresh: bool = False) -> Step:
    b, t = tokens.shape
    if state is None:
        if parents is not None or num_new is not None or fresh:
            raise InputError("parents=, num_new= and fresh= need a decode state (state=...)")
        return Step(Mode.FULL, jnp.broadcast_to(jnp.arange(t), (b, t)))
    if t > state.max_len:
        raise InputError(f"{t} new tokens do not fit a decode state of max_len={state.max_len}")
    if state.has_pending:
        raise InputError("the decode state holds an uncommitted tree; commit(state, path, n) it first")
    if fresh and _is_concrete(state.lengths) and np.any(np.asarray(state.lengths) != 0):
        raise InputError(f"fresh=True promises an empty decode state; its lengths are {np.asarray(state.lengths)}")
    if parents is not None:
        if fresh:
            raise InputError("fresh=True is for a prefill (extend), not a tree forward")
        if num_new is not None:
            raise InputError("pass either parents= (tree forward) or num_new= (extend), not both")
        if _is_concrete(parents):
            validate_parents(parents)
        if jnp.shape(parents)[-1] != t:
            raise InputError(f"parents has {jnp.shape(parents)[-1]} nodes but tokens has {t}")
        traced = jnp.asarray(parents)
        checks.expect((traced >= -1) & (traced < jnp.arange(t)), "parents {} is not a tree: every parent must be "
                      "-1 or an earlier node index", traced)
        mask = tree_ancestor_mask(parents, b)
        positions = state.lengths[:, None] + node_depths(mask)
        checks.expect(positions < state.max_len, "tree nodes at positions {} do not fit the decode state's "
                      f"max_len={state.max_len}", positions)
        parents = jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (b, t))
        return Step(Mode.TREE, positions, state.lengths, mask=mask, parents=parents)
    count = jnp.full((b,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    if _is_concrete(count) and (np.any(np.asarray(count) < 0) or np.any(np.asarray(count) > t)):
        raise InputError(f"num_new={np.asarray(count).tolist()} must lie in [0, {t}] (tokens has {t} columns)")
    checks.expect((count >= 0) & (count <= t), f"num_new={{}} must lie in [0, {t}] (tokens has {t} columns)", count)
    checks.expect(state.lengths + count <= state.max_len, "lengths {} + num_new {} exceed the decode state's "
                  f"max_len={state.max_len}", state.lengths, count)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    valid = jnp.arange(t)[None, :] < count[:, None]
    return Step(Mode.EXTEND, state.lengths[:, None] + jnp.arange(t), state.lengths, mask=mask, valid=valid,
                fresh=fresh)


def token_gate(layer_gate, shape: tuple[int, int], n_layers: int, mode: Mode) -> jax.Array:
    """DecoderLM's `layer_gate` as [B, T, n_layers] bool for tokens of `shape` (B, T)."""
    b, t = shape
    gate_shape = jnp.shape(layer_gate)
    if gate_shape not in ((n_layers,), (b, n_layers), (b, t, n_layers)):
        raise InputError(f"layer_gate needs shape ({n_layers},), ({b}, {n_layers}) or ({b}, {t}, {n_layers}); got "
                         f"shape {gate_shape} in a {mode} forward")
    gate = jnp.asarray(layer_gate, bool)
    gate = gate[None, None] if gate.ndim == 1 else gate[:, None] if gate.ndim == 2 else gate
    return jnp.broadcast_to(gate, (b, t, n_layers))


def gate_layer(run, gate, x, cache, step: Step):
    """`run(x, cache) -> (y, new)` (a pure apply of one block) kept where gate [B, T] is True, x elsewhere; a
    block gated off for every token is not run (lax.cond). Its cache then passes through unchanged; in a tree
    forward, which returns the nodes' pending entries rather than the cache, it gives zeros of their shapes
    (entries of gated-off nodes are undefined)."""

    def on(x, cache):
        y, new = run(x, cache)
        return jnp.where(gate[..., None], y, x), new

    if step.mode == Mode.TREE:
        pending = jax.eval_shape(run, x, cache)[1]  # shapes only: nothing runs
        off = lambda x, cache: (x, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pending))
    else:
        off = lambda x, cache: (x, cache)
    return jax.lax.cond(jnp.any(gate), on, off, x, cache)


def context_free_tree_step(parents, batch: int) -> Step:
    """A tree forward with no committed context: each node sees its ancestors only, at position = its depth
    (training a drafter over unrolled draft depths, models/eagle.py). Attention layers only; nothing is cached."""
    mask = tree_ancestor_mask(parents, batch)
    parents = jnp.broadcast_to(jnp.asarray(parents, jnp.int32), mask.shape[:2])
    return Step(Mode.TREE, node_depths(mask), jnp.zeros((batch,), jnp.int32), mask=mask, parents=parents)


class DecoderLM(nn.Module):
    model_cfg: Any  # ml_collections.ConfigDict (frozen on use, so the module is hashable)
    layout: str = "standard"  # one of LAYOUTS (see the module docstring)

    def setup(self):
        cfg = self.model_cfg
        if self.layout not in LAYOUTS:
            raise InputError(f"DecoderLM: layout={self.layout!r} is not one of {LAYOUTS}")
        decode = self.layout == "decode"
        # A tied embedding is the LM head, so the decode layout stores it as the head's weights are stored.
        embed_dtype = weight_dtype_of(cfg) if decode and cfg.tie_embeddings else "float32"
        self.embed = Embed(cfg.vocab_size, cfg.d_model, weight_dtype=embed_dtype, name="embed")
        self.blocks = [Block(cfg, kind, i, self.layout, name=f"layer_{i}")
                       for i, kind in enumerate(config_lib.layer_kinds(cfg))]
        self.final_norm = RMSNorm(cfg.rms_eps, name="final_norm")
        if not cfg.tie_embeddings:
            if decode:
                self.lm_head = VocabProjection(cfg.d_model, cfg.vocab_size, weight_dtype_of(cfg), name="lm_head")
            else:
                self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype_of(cfg), name="lm_head")

    def project(self, hidden):
        """LM head on hidden states that already went through the final norm."""
        if self.model_cfg.tie_embeddings:
            return self.embed.attend(hidden.astype(jnp.float32))
        return self.lm_head(hidden).astype(jnp.float32)

    def exit_logits(self, layer_hidden):
        """Logits from an intermediate residual stream (early exit): final norm, then the LM head."""
        return self.project(self.final_norm(layer_hidden))

    def run_layers(self, x, state, step: Step, gate, per_layer, skip, no_ffn):
        """(x, new entry per layer (None: unchanged, or stacked), new entries stacked per position of the period
        (None: none stacked), residual stream after each layer). With `model.scan_layers` the layers that repeat a
        period run as one scan (models/layer_scan.py), reading and returning the state's stacked entries where it
        holds them for this forward's plan; init and calibration (which reads the sown FFN inputs) run unrolled."""
        cfg = self.model_cfg
        n = cfg.n_layers
        caches = [None] * n if state is None else list(state.layers)
        gates = [None] * n if gate is None else [gate[..., i] for i in range(n)]
        stored = None if self.is_initializing() else self.variables["params"]
        scanned = 0
        new_layers, new_stacked, layer_hidden = [], None, []
        if cfg.get("scan_layers", False) and stored is not None and not self.is_mutable_collection("intermediates"):
            period, groups = layer_scan.model_plan(cfg, per_layer, skip, no_ffn)
            scanned = period * groups
            stacked = layer_scan.stored_stacks(stored, period, groups)
            if stacked is None and layer_scan.stored_plan(stored) is not None:
                # Held only in stacks of another plan (the decode form; skip_layers changes the period): a scan
                # of this plan would copy every layer out of them on every call, so the layers run unrolled,
                # each read in place from its stack.
                scanned = 0
        if scanned:
            if stacked is None:
                stacked = layer_scan.stack_positions([None if i in skip else stored[f"layer_{i}"]
                                                      for i in range(scanned)], period, groups)
            in_stacks = state is not None and state.stack_plan == (period, groups)
            entries = state.stacked if in_stacks else layer_scan.stack_positions(caches[:scanned], period, groups)

            def apply_position(j, layer_params, x, cache, layer_gate):
                if j in skip:  # the same position of every group is skipped (signatures repeat)
                    return x, None
                block = Block(cfg, config_lib.layer_kinds(cfg)[j], j, self.layout, parent=None)
                run = lambda x, cache: block.apply({"params": layer_params}, x, step, cache,
                                                   None if per_layer is None else per_layer[j], j in no_ffn)
                return run(x, cache) if layer_gate is None else gate_layer(run, layer_gate, x, cache, step)

            x, new_stacked, layer_hidden = layer_scan.scan_layers(
                apply_position, stacked, groups, entries, layer_scan.stack_positions(gates[:scanned], period, groups),
                x, in_place=lambda entry: isinstance(entry, KVCache))
            if in_stacks:
                new_layers = [None] * scanned
            else:
                new_layers, new_stacked = layer_scan.unstack_positions(new_stacked, groups), None
        for i in range(scanned, n):
            new = None
            if i not in skip:
                run = self.unrolled_layer(i, stored, step, None if per_layer is None else per_layer[i],
                                          i in no_ffn, gated=gate is not None)
                x, new = run(x, caches[i]) if gate is None else gate_layer(run, gates[i], x, caches[i], step)
            new_layers.append(new)
            layer_hidden.append(x)
        return x, new_layers, new_stacked, layer_hidden

    def unrolled_layer(self, i: int, stored, step: Step, granularity, skip_ffn: bool, gated: bool):
        """run(x, cache) -> (x, new entry) of layer i outside a scan: the bound block where the params hold the
        layer's own entry (or are being made), applied purely under a gate (`gate_layer` may not run it);
        else a block applied purely to the layer read in place from its stack (`layer_scan.stored_layer`)."""
        block = self.blocks[i]
        if stored is None or f"layer_{i}" in stored:
            if not gated:
                return lambda x, cache: block(x, step, cache, granularity, skip_ffn)
            pure, variables = block.clone(parent=None), block.variables
        else:
            if self.is_mutable_collection("intermediates"):
                raise InputError(f"layer_{i} is held only in the params' layer stacks (the decode form of a scanned "
                                 "model), where its sown intermediates cannot be collected; pass the params before "
                                 "for_decoding")
            pure = Block(self.model_cfg, config_lib.layer_kinds(self.model_cfg)[i], i, self.layout, parent=None)
            variables = {"params": layer_scan.stored_layer(stored, i)}
        return lambda x, cache: pure.apply(variables, x, step, cache, granularity, skip_ffn)

    def __call__(self, tokens, *, state: DecodeState | None = None, parents=None, num_new=None,
                 granularity=None, skip_layers=(), return_hidden: bool = False, fresh: bool = False,
                 layer_gate=None, skip_ffn=(), kv_budget=None):
        """fresh=True (with num_new): a prefill into an empty state, using the configured prefill attention.
        skip_ffn (static): layers whose FFN sub-block is left out; their mixers still run (FFN-skip drafting).
        layer_gate: bool, traced, [n_layers] (every token), [B, n_layers] (per row) or [B, T, n_layers] (per
        token): a token's layer-i output is dropped where its gate is False, as `skip_layers` drops it. A layer
        gated off for every token does not run at all (a lax.cond), so one compiled forward serves many gates (a
        skip-set search, an exit schedule) and still saves the skipped layers' compute. Every mode: in an extend,
        a gated-off token's cache entries of that layer are left undefined, so gates must be monotone over a
        row's tokens (once off for a token, a layer stays off for every later token, as with exits that only
        decrease), so that no later token reads them; in a tree forward, a gated-off node's pending entries are
        undefined alike, so a node's descendants must have the layer off too (a gate per layer or per row, as
        self-drafting over the target's cache uses, always is).
        kv_budget (static): (budget, recent): attention layers keep a budgeted heavy-hitter cache (H2O,
        jaxspec.ops.heavy_hitter), started by the fresh prefill; needs a decode state."""
        cfg = self.model_cfg
        per_layer = config_lib.validate_granularity(cfg, granularity)
        skip = config_lib.validate_skip_layers(cfg, skip_layers)
        no_ffn = config_lib.validate_skip_ffn(cfg, skip_ffn)
        if state is not None and len(state.layers) != cfg.n_layers:
            raise InputError(f"decode state has {len(state.layers)} layers; the model has {cfg.n_layers}")
        if kv_budget is not None:
            state = heavy_hitter.budgeted_state(state, kv_budget, fresh)
        step = make_step(tokens, state, parents, num_new, fresh)
        gate = None if layer_gate is None else token_gate(layer_gate, tokens.shape, cfg.n_layers, step.mode)
        x = self.embed(tokens)
        if cfg.embed_scale:  # as transformers: sqrt(d_model) rounded to float32, then to the embedding dtype
            x = x * jnp.asarray(np.float32(cfg.d_model**0.5), x.dtype)
        x = x.astype(dtype_of(cfg))
        given, plan = state, None if state is None else state.stack_plan
        if plan is not None and plan != layer_scan.model_plan(cfg, per_layer, skip, no_ffn):
            state = per_layer_state(state)  # stacked for another plan: this forward reads it per layer
        x, new_layers, new_stacked, layer_hidden = self.run_layers(x, state, step, gate, per_layer, skip, no_ffn)
        hidden = self.final_norm(x)
        logits = self.project(hidden)
        out = LMOutput(logits, hidden, tuple(layer_hidden)) if return_hidden else logits
        if state is None:
            return out
        if step.mode == Mode.TREE:
            return out, given.replace(pending=tuple(new_layers), pending_stacked=new_stacked)
        keep = lambda olds, news: tuple(old if new is None else new for old, new in zip(olds, news, strict=True))
        stacked = None if new_stacked is None else keep(state.stacked, new_stacked)
        new_state = DecodeState(lengths=state.lengths + jnp.sum(step.valid, axis=1, dtype=jnp.int32),
                                layers=keep(state.layers, new_layers), stacked=stacked)
        return out, stacked_state(new_state, plan)  # the form the state came in


@dataclasses.dataclass(frozen=True)
class ChangedModel:
    """Base of a stand-in for a DecoderLM whose every apply is changed the same way: the model a lossy decoding
    mode decodes with. It serves wherever a loop only applies the module (`model_cfg`, `layout`, `clone` here;
    each subclass defines `apply`), and hashes by value, so it can be a static argument of a compiled loop."""

    model: DecoderLM

    @property
    def model_cfg(self):
        return self.model.model_cfg

    @property
    def layout(self) -> str:
        return self.model.layout

    def clone(self, **fields):
        """The same change over `model.clone(**fields)` (e.g. the decode layout the loops convert to)."""
        return dataclasses.replace(self, model=self.model.clone(**fields))


@dataclasses.dataclass(frozen=True)
class WithOptions(ChangedModel):
    """A DecoderLM applied with the same static options on every call (e.g. `skip_layers=(3, 5)`)."""

    options: tuple[tuple[str, Any], ...] = ()  # ((apply keyword, value), ...), values hashable

    @classmethod
    def of(cls, model: DecoderLM, **options) -> WithOptions:
        return cls(model, tuple(sorted(options.items())))

    def apply(self, variables, tokens, **kwargs):
        clash = sorted(set(kwargs) & {name for name, _ in self.options})
        if clash:
            raise InputError(f"{clash} are fixed by this model's options {dict(self.options)}; do not pass them")
        return self.model.apply(variables, tokens, **dict(self.options), **kwargs)


def head_logits(model, params, hidden) -> jax.Array:
    """The LM head on hidden states that went through the final norm (`DecoderLM.project`), for a DecoderLM or a
    ChangedModel (whose changes never touch the head): a caller that needs a few positions' logits projects
    only those rather than the forward's every position."""
    base = model.model if isinstance(model, ChangedModel) else model
    return base.apply({"params": params}, hidden, method="project")


def build_model(model_cfg) -> DecoderLM:
    """Validate the model config and build the module (config frozen so the module hashes)."""
    config_lib.validate_model_config(model_cfg)
    return DecoderLM(ml_collections.FrozenConfigDict(model_cfg))


def reconfigured(model: DecoderLM, **model_keys) -> DecoderLM:
    """`model` (same layout, same parameters) with top-level model-config keys changed and validated, e.g.
    `reconfigured(model, scan_layers=True)`."""
    cfg = ml_collections.ConfigDict(model.model_cfg.to_dict())  # a mutable copy of a frozen or plain config
    unknown = sorted(set(model_keys) - set(cfg))
    if unknown:
        raise InputError(f"reconfigured: {unknown} are not model config keys{config_lib.nearest_keys(unknown[0], cfg)}")
    for key, value in model_keys.items():
        try:
            cfg[key] = value
        except TypeError as e:  # ConfigDict keeps each key's type: say which key, not only the type clash
            raise config_lib.ConfigError(f"model.{key}={value!r}: {e}") from None
    config_lib.validate_model_config(cfg)
    return model.clone(model_cfg=ml_collections.FrozenConfigDict(cfg))


def init_params(model: DecoderLM, rng, seq_len: int = 8):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
