"""`generate`: one call for every decoding method, with the measurements a comparison needs.

    lm = load("smollm2-135m-instruct")            # a zoo name or a workdir
    result = generate(lm.model, lm.params, [lm.tokenizer.encode_prompt("def fib(")], method="lookup",
                      tree="chain:4", max_new_tokens=64, eos_ids=lm.tokenizer.eos_ids)
    result.tokens, result.mean_accepted, result.tokens_per_s, result.compile_s

Everything that can be wrong with the request is checked here, before any compute. Prompts are padded to
bucketed widths and the decode state to bucketed lengths, and each loop is compiled ahead of time once per
shape (`engine.run_compiled`): `compile_s` and `compilations` say what this call compiled, and `wall_time_s`
is the decode alone.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from collections.abc import Callable

import jax
import numpy as np

from jaxspec import checks
from jaxspec.decoding import engine, methods
from jaxspec.decoding.method import Method, Target
from jaxspec.errors import InputError
from jaxspec.models.decode_layout import for_decoding, in_decode_form
from jaxspec.models.lm import DecoderLM


@functools.lru_cache(maxsize=8)
def _layout_converter(model: DecoderLM):
    """A jitted `for_decoding` of `model`'s params, and a dict that holds the decode-layout model once traced."""
    made = {}

    def convert(params):
        made["model"], converted = for_decoding(model, params)
        return converted

    return jax.jit(convert), made


_DECODE_FORMS: list = []  # (model, weak references to the source leaves, (decode model, decode params)), newest first
_DECODE_FORMS_KEPT = 2


def decode_form(model: DecoderLM, params) -> tuple[DecoderLM, dict]:
    """`for_decoding(model, params)`, converted once per (model, params) and reused while those params live.

    Why: a decode loop handed standard-layout params converts them inside its compiled program, which re-lays
    every weight on each call (~0.4 s a call on SmolLM2-135M, more than ten decode steps); a scanned model's
    decode-layout params without their layer stacks would be stacked on each call alike. The last
    `_DECODE_FORMS_KEPT` conversions are kept, matched by model and by the identity of every source array."""
    if in_decode_form(model, params):
        return model, params
    leaves = jax.tree.leaves(params)
    _DECODE_FORMS[:] = [entry for entry in _DECODE_FORMS if all(ref() is not None for ref in entry[1])]
    for source_model, refs, converted in _DECODE_FORMS:
        if source_model == model and len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
            return converted
    convert, made = _layout_converter(model)
    params_out = convert(params)
    converted = (made["model"], params_out)
    try:
        refs = [weakref.ref(x) for x in leaves]
    except TypeError:  # a leaf that cannot be weakly referenced (a Python scalar): converted, not kept
        return converted
    _DECODE_FORMS.insert(0, (model, refs, converted))
    del _DECODE_FORMS[_DECODE_FORMS_KEPT:]
    return converted


@dataclasses.dataclass
class GenerateResult:
    tokens: list[list[int]]  # generated ids per prompt (EOS included when hit)
    target_steps: np.ndarray  # [B] target forwards after the prefill
    accepted: np.ndarray  # [B] tokens committed by those forwards
    wall_time_s: float  # prefill + decode, compilation excluded
    method: str
    compile_s: float = 0.0  # seconds this call spent compiling (0 when the loop was compiled before)
    compilations: int = 0  # loops this call compiled (0 or 1)
    prompt_width: int = 0  # the padded prompt width the loop ran with
    max_len: int = 0  # the decode state's length
    # What a drafter that learns while decoding knew at the end (per-row arrays; see method.Drafter), e.g.
    # SWIFT's searched skip sets; empty for the others.
    drafter_report: dict = dataclasses.field(default_factory=dict)
    # With record_features: the target's hidden states (numpy, float16) at each row's prompt and output
    # positions, prompt first; engine.Features. Positions past len(prompt) + len(tokens) are undefined.
    features: engine.Features | None = None

    @property
    def new_tokens(self) -> np.ndarray:
        return np.asarray([len(t) for t in self.tokens])

    @property
    def mean_accepted(self) -> np.ndarray:
        """tau per row: tokens committed per target forward, bonus included."""
        return self.accepted / np.maximum(self.target_steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return float(self.new_tokens.sum() / max(self.wall_time_s, 1e-9))


def method_spec(method: str | Method, arguments: dict) -> tuple[Method, dict]:
    """(spec, Python objects for its build) of `method` (a registered name or a spec) and keyword arguments:
    the method's fields and objects; anything else is an error naming the method."""
    if isinstance(method, Method):
        fields, objects = methods.split_arguments(method.name, arguments)
        if fields:
            raise InputError(f"method is a ready spec ({method!r}); set {sorted(fields)} on the spec instead")
        return method, objects
    fields, objects = methods.split_arguments(method, arguments)
    return methods.make(method, **fields), objects


def stop_ids(eos_ids) -> tuple[int, ...]:
    """None, one id or several -> a sorted tuple of stop ids (static in the compiled loop)."""
    if eos_ids is None:
        return ()
    ids = (eos_ids,) if isinstance(eos_ids, (int, np.integer)) else tuple(eos_ids)
    if any(not isinstance(i, (int, np.integer)) or i < 0 for i in ids):
        raise InputError(f"eos_ids={eos_ids!r} must be non-negative token ids")
    return tuple(sorted({int(i) for i in ids}))


def _is_sequence(value) -> bool:
    """A list, tuple or array (numpy or jax): what a batch of prompts and each prompt may be."""
    return (not isinstance(value, (str, bytes, dict)) and hasattr(value, "__len__")
            and hasattr(value, "__getitem__"))


def check_prompts(prompts, vocab_size: int) -> None:
    """A batch of prompts is a non-empty list of non-empty token-id lists, every id in [0, vocab_size): a flat
    list (one prompt not wrapped in a batch), a string or an id outside the vocabulary is an error naming it (an
    id out of range would otherwise be clamped by the embedding lookup and decode silently)."""
    if not _is_sequence(prompts) or len(prompts) == 0:
        raise InputError(f"prompts must be a non-empty list of token-id lists (one per row), got "
                         f"{type(prompts).__name__} {repr(prompts)[:60]}; encode text first (tokenizer.encode_prompt)")
    for i, prompt in enumerate(prompts):
        if not _is_sequence(prompt):
            raise InputError(f"prompts[{i}] = {repr(prompt)[:60]} is not a list of token ids; pass a batch "
                             "[[id, ...], ...] (a single prompt p is [p])")
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise InputError(f"prompts[{i}] has shape {ids.shape}; every prompt needs at least one token, as a "
                             "flat list of ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"prompts[{i}] holds {ids.dtype} values; token ids are integers")
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise InputError(f"prompts[{i}][{j}] = {int(ids[j])} lies outside the model's vocabulary [0, "
                             f"{vocab_size})")


def check_lossless(spec: Method, rule: str) -> None:
    """An InputError naming what makes a request lossy: the method (its spec says lossless = False) or the rule
    (typical acceptance accepts tokens the target would not sample)."""
    if not spec.lossless:
        raise InputError(f"method {spec.name!r} is lossy (its output is not the target's) and lossless decoding "
                         "was required (require_lossless / --require_lossless)")
    if rule == "typical":
        raise InputError("rule='typical' is lossy (typical acceptance changes the output distribution) and "
                         "lossless decoding was required (require_lossless / --require_lossless)")


def check_record_features(layers, spec: Method, n_layers: int) -> tuple[int, ...] | None:
    """`record_features` as the loop's static tuple, or an error naming what is wrong with it."""
    if layers is None:
        return None
    if spec.name != "ar":
        raise InputError(f"record_features is for autoregressive decoding (method='ar'), not method={spec.name!r}")
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise InputError(f"record_features={layers!r} must be a sequence of layer indices")
    layers = tuple(layers)
    if (not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < n_layers for i in layers)
            or len(set(layers)) != len(layers)):
        raise InputError(f"record_features={layers} must be distinct layer indices in 0..{n_layers - 1}")
    return tuple(int(i) for i in layers)


def common_prefix_len(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares."""
    first, n = prompts[0], min(map(len, prompts))
    return next((i for i in range(n) if any(p[i] != first[i] for p in prompts)), n)


def generate(target: DecoderLM, params, prompts: list[list[int]], *, method: str | Method = "ar",
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rule: str | None = None, eos_ids=None, seed: int = 0, prompt_width: int | None = None,
             on_tokens: Callable[[list[list[int]]], None] | None = None, target_workdir: str | None = None,
             check_invariants: bool = False, prefill_chunk: int = 0, require_lossless: bool = False,
             shared_prefix: bool = False, record_features=None, **method_arguments) -> GenerateResult:
    """Decode a batch of token-id prompts with `method`: a registered name (`methods.names()`) with its fields
    and objects as keyword arguments (e.g. `tree="chain:4"`, `draft_model=..., draft_params=...`), or a spec.

    `rule` defaults to greedy at temperature 0 and rejection (lossless sampling) otherwise. `eos_ids`: a stop id
    or several (a row stops after the first it emits). `prompt_width` pads every prompt to that width (one
    compiled shape for a whole suite; a batch that fits the next bucket below it, of at least 64, is prefilled
    at that width, `engine.narrowest_prefill`); by default widths are bucketed. `on_tokens(new)` receives each round's
    new tokens per row as they are committed (streaming). `target_workdir` lets trained drafters check that
    they were trained for this target. `check_invariants` (a debug mode, slower) runs the loop under checkify
    with the in-jit preconditions of `jaxspec.checks` on (num_new ranges, traced trees, lengths within the
    cache): a violation raises checks.InvariantError instead of decoding on clamped indices. `prefill_chunk`
    (a power of two, 0 = off) prefills each prompt in chunks of that many tokens (exact: the same output).
    `require_lossless` refuses a lossy request (a method with lossless = False, or the typical rule) before any
    compute, so a comparison that must keep the target's output cannot include one by mistake.
    `shared_prefix`: the prompts' common beginning (samples of one prompt, or requests under one system prompt)
    is prefilled once and its keys/values are held once and attended once for all rows (Hydragen); the output is
    the same as without it. Needs global attention (no sliding windows).
    `record_features` (autoregressive decoding only): a sequence of layer indices, possibly empty; the result
    then holds the target's hidden states at every prompt and output position (`GenerateResult.features`),
    taken from the forwards the decoding runs anyway: what a feature drafter's training set stores.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise InputError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    check_prompts(prompts, target.model_cfg.vocab_size)
    if prefill_chunk < 0 or prefill_chunk & (prefill_chunk - 1):
        raise InputError(f"prefill_chunk={prefill_chunk} must be 0 (off) or a power of two (it divides the "
                         "power-of-two prompt widths)")
    shared = common_prefix_len(prompts) if shared_prefix else 0
    if shared_prefix and not shared:
        raise InputError("shared_prefix=True needs prompts that begin with the same tokens; these share none")
    if shared_prefix and prefill_chunk:
        raise InputError(f"prefill_chunk={prefill_chunk} with shared_prefix=True: the shared prefix is prefilled in "
                         "one forward; use one or the other")
    rule = rule or ("greedy" if temperature == 0 else "rejection")
    sampling = engine.Sampling(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), rule=rule)
    eos = stop_ids(eos_ids)
    if any(i >= target.model_cfg.vocab_size for i in eos):
        raise InputError(f"eos_ids={eos} lie outside the model's vocabulary [0, {target.model_cfg.vocab_size})")
    spec, objects = method_spec(method, method_arguments)
    recorded = check_record_features(record_features, spec, target.model_cfg.n_layers)
    if require_lossless:
        check_lossless(spec, rule)
    drafter, dparams = spec.build(Target(target, params, target_workdir), **objects)
    decoder, decoder_params = decode_form(*spec.decoder(Target(target, params, target_workdir)))
    lens = np.asarray([len(p) for p in prompts], np.int32)
    nodes = 1 if drafter is None else drafter.tree.num_nodes
    width, max_len = engine.plan_shapes(target.model_cfg, lens, max_new_tokens, nodes, prompt_width)
    tokens, lens = engine.pad_prompts(prompts, width=width)
    dynamic = dict(params=decoder_params, prompts=tokens, prompt_lens=lens, key=jax.random.key(seed))
    statics = dict(model=decoder, max_new=max_new_tokens, max_len=max_len, sampling=sampling, eos_ids=eos,
                   stream=on_tokens is not None, prefill_chunk=int(prefill_chunk), shared_prefix=shared)
    if prompt_width is not None and not prefill_chunk and not shared:
        # One width for prompts of many lengths: the loop also compiles its prefill one bucket narrower and runs
        # it when it holds this batch, rather than prefilling every prompt at the fixed width.
        statics["prefill_widths"] = engine.narrower_buckets(width)
    if drafter is None:
        loop = engine.autoregressive_loop
        if recorded is not None:
            statics["record_features"] = recorded
    else:
        loop = engine.speculative_loop
        dynamic["draft_params"] = dparams
        statics.update(drafter=drafter, adaptive=engine.Adaptive(initial=getattr(spec, "adaptive", 0)))

    def sink(new, counts):
        on_tokens([new[i, :counts[i]].tolist() for i in range(len(prompts))])

    with engine.streaming(sink if on_tokens is not None else None):
        start = time.perf_counter()
        if check_invariants:  # traced and compiled on every call: a debug mode, not a timed one
            out, compile_s = checks.run_checked(functools.partial(loop, **statics, checked=True), **dynamic), 0.0
        else:
            out, compile_s = engine.run_compiled(loop, dynamic, statics)
        out = jax.block_until_ready(out)
        wall = time.perf_counter() - start - compile_s
    toks, num = np.asarray(out.tokens), np.asarray(out.num_tokens)
    return GenerateResult([toks[i, :num[i]].tolist() for i in range(len(prompts))], np.asarray(out.target_steps),
                          np.asarray(out.accepted), wall, spec.name, compile_s=compile_s,
                          compilations=int(compile_s > 0), prompt_width=width, max_len=max_len,
                          drafter_report={k: np.asarray(v) for k, v in (out.drafter_report or {}).items()},
                          features=None if out.features is None else jax.tree.map(np.asarray, out.features))


def load(model: str):
    """A zoo model by name (fetched and converted once, then cached) or a jaxspec workdir, as a
    `loading.LoadedLM` (model, params, config, tokenizer, workdir)."""
    from jaxspec.decoding import loading

    return loading.load_lm(model)
