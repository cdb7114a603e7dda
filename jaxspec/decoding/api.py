"""`generate`: one call for every decoding method, with the measurements a comparison needs.

    lm = load("smollm2-135m-instruct")            # a zoo name or a workdir
    result = generate(lm.model, lm.params, [lm.tokenizer.encode_prompt("def fib(")], method="lookup",
                      max_new_tokens=64, eos_ids=lm.tokenizer.eos_ids)
    result.tokens, result.mean_accepted, result.tokens_per_s, result.compile_s

Everything that can be wrong with the request is checked here, before any compute. Prompts are padded to
bucketed widths and the decode state to bucketed lengths, and each loop is compiled ahead of time once per
shape (`engine.run_compiled`): `compile_s` and `compilations` say what this call compiled, and `wall_time_s`
is the decode alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxspec import config as config_lib
from jaxspec.decoding import drafters as drafters_lib
from jaxspec.decoding import engine
from jaxspec.decoding.trees import TokenTree, tree_from_spec
from jaxspec.models.heads import MedusaHeads, lm_head_kernel
from jaxspec.models.lm import DecoderLM

METHODS = ("ar", "draft", "medusa", "matformer", "layerskip", "lookup")
# The tree a method drafts when none is asked for: one table for the API, the CLIs and the sweeps.
DEFAULT_TREES = {"draft": "chain:4", "medusa": "medusa_small", "matformer": "chain:4", "layerskip": "chain:3",
                 "lookup": "chain:6"}


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


def default_skip_layers(n_layers: int) -> tuple[int, ...]:
    """The layer-skip self-draft's default: every other layer of the upper two thirds (the first third, which
    builds the features every later layer reads, stays whole), never the last layer."""
    return tuple(range(n_layers // 3, n_layers - 1, 2))


def resolve_tree(tree) -> TokenTree:
    return tree if isinstance(tree, TokenTree) else tree_from_spec(tree)


def make_drafter(method: str, target: DecoderLM, params, *, tree=None, draft_model: DecoderLM | None = None,
                 draft_params=None, heads: MedusaHeads | None = None, heads_params=None, granularity=0,
                 skip_layers=(), lookup_ngram=(1, 3), confidence_threshold=0.0):
    """The drafter for `method` and the params it reads, after checking they fit the target."""
    cfg = target.model_cfg
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; allowed: {METHODS}")
    if method == "ar":
        return None, None
    tree = resolve_tree(tree or DEFAULT_TREES[method])
    if method == "draft":
        if draft_model is None or draft_params is None:
            raise ValueError("method='draft' needs draft_model and draft_params")
        if draft_model.model_cfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"draft model vocab_size={draft_model.model_cfg.vocab_size} differs from the "
                             f"target's vocab_size={cfg.vocab_size}; speculative decoding needs one vocabulary")
        return drafters_lib.ModelDrafter(draft_model, tree, confidence_threshold=confidence_threshold), draft_params
    if method == "matformer":
        config_lib.validate_granularity(cfg, granularity)
        if len(cfg.matformer_fractions) < 2:
            raise ValueError("method='matformer' needs a MatFormer target (model.matformer_fractions with >= 2 "
                             f"granularities); got {tuple(cfg.matformer_fractions)}")
        return drafters_lib.ModelDrafter(target, tree, granularity=granularity,
                                         confidence_threshold=confidence_threshold), params
    if method == "layerskip":
        skip = config_lib.validate_skip_layers(cfg, skip_layers or default_skip_layers(cfg.n_layers))
        if not skip:
            raise ValueError(f"method='layerskip' needs layers to skip; the model has only n_layers={cfg.n_layers}")
        return drafters_lib.ModelDrafter(target, tree, skip_layers=skip,
                                         confidence_threshold=confidence_threshold), params
    if method == "lookup":
        lo, hi = lookup_ngram
        return drafters_lib.PromptLookupDrafter(tree, max_ngram=hi, min_ngram=lo), ()
    if heads is None or heads_params is None:
        raise ValueError("method='medusa' needs heads and heads_params")
    if heads.d_model != cfg.d_model or heads.vocab_size != cfg.vocab_size:
        raise ValueError(f"Medusa heads were built for d_model={heads.d_model}, vocab_size={heads.vocab_size}; the "
                         f"target has d_model={cfg.d_model}, vocab_size={cfg.vocab_size}: heads trained for "
                         "another target")
    dparams = {"heads": heads_params}
    if heads.share_lm_head:
        dparams["lm_head"] = lm_head_kernel(params, cfg)
    return drafters_lib.MedusaDrafter(heads, tree), dparams


def stop_ids(eos_ids) -> tuple[int, ...]:
    """None, one id or several -> a sorted tuple of stop ids (static in the compiled loop)."""
    if eos_ids is None:
        return ()
    ids = (eos_ids,) if isinstance(eos_ids, (int, np.integer)) else tuple(eos_ids)
    if any(not isinstance(i, (int, np.integer)) or i < 0 for i in ids):
        raise ValueError(f"eos_ids={eos_ids!r} must be non-negative token ids")
    return tuple(sorted({int(i) for i in ids}))


def generate(target: DecoderLM, params, prompts: list[list[int]], *, method: str = "ar", max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rule: str | None = None,
             eos_ids=None, seed: int = 0, adaptive: int = 0, prompt_width: int | None = None,
             on_tokens: Callable[[list[list[int]]], None] | None = None, **drafter_kwargs) -> GenerateResult:
    """Decode a batch of token-id prompts with `method`.

    `rule` defaults to greedy at temperature 0 and rejection (lossless sampling) otherwise. `eos_ids`: a stop id
    or several (a row stops after the first it emits). `adaptive` > 0 starts an adaptive draft length there.
    `prompt_width` pads every prompt to that width (one compiled shape for a whole suite); by default widths
    are bucketed. `on_tokens(new)` receives each round's new tokens per row as they are committed (streaming).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    rule = rule or ("greedy" if temperature == 0 else "rejection")
    sampling = engine.Sampling(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), rule=rule)
    eos = stop_ids(eos_ids)
    if any(i >= target.model_cfg.vocab_size for i in eos):
        raise ValueError(f"eos_ids={eos} lie outside the model's vocabulary [0, {target.model_cfg.vocab_size})")
    drafter, dparams = make_drafter(method, target, params, **drafter_kwargs)
    lens = np.asarray([len(p) for p in prompts], np.int32)
    nodes = 1 if drafter is None else drafter.tree.num_nodes
    if not prompts or lens.min() == 0:
        raise ValueError("every prompt needs at least one token")
    width, max_len = engine.plan_shapes(target.model_cfg, lens, max_new_tokens, nodes, prompt_width)
    tokens, lens = engine.pad_prompts(prompts, width=width)
    dynamic = dict(params=params, prompts=tokens, prompt_lens=lens, key=jax.random.key(seed))
    statics = dict(model=target, max_new=max_new_tokens, max_len=max_len, sampling=sampling, eos_ids=eos,
                   stream=on_tokens is not None)
    if drafter is None:
        loop = engine.autoregressive_loop
    else:
        loop = engine.speculative_loop
        dynamic["draft_params"] = dparams
        statics.update(drafter=drafter, adaptive=engine.Adaptive(initial=adaptive))

    def sink(new, counts):
        on_tokens([new[i, :counts[i]].tolist() for i in range(len(prompts))])

    with engine.streaming(sink if on_tokens is not None else None):
        start = time.perf_counter()
        out, compile_s = engine.run_compiled(loop, dynamic, statics)
        out = jax.block_until_ready(out)
        wall = time.perf_counter() - start - compile_s
    toks, num = np.asarray(out.tokens), np.asarray(out.num_tokens)
    return GenerateResult([toks[i, :num[i]].tolist() for i in range(len(prompts))], np.asarray(out.target_steps),
                          np.asarray(out.accepted), wall, method, compile_s=compile_s,
                          compilations=int(compile_s > 0), prompt_width=width, max_len=max_len)


def load(model: str):
    """A zoo model by name (fetched and converted once, then cached) or a jaxspec workdir, as a
    `loading.LoadedLM` (model, params, config, tokenizer)."""
    from jaxspec import zoo
    from jaxspec.decoding import loading

    return loading.load_lm(zoo.model_workdir(model) if model in zoo.ZOO else model)
