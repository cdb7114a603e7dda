"""jaxspec against Hugging Face transformers on the same weights: greedy decoding, side by side, one process.

  python benchmarks/vs_transformers.py --sizes=20m,100m --max_new_tokens=64 --num_prompts=3
  python benchmarks/vs_transformers.py --model=smollm2-135m-instruct --per_category=2 --max_new_tokens=64
  python benchmarks/vs_transformers.py --model=gemma3-270m --per_category=2 --max_new_tokens=64

Random mode (--sizes). For each size a random (seeded) Llama target and a draft model are built in transformers,
saved as safetensors and imported into jaxspec with `load_hf_checkpoint`, so both libraries hold exactly the same
float32 weights. The draft is the target's first `draft_layers` layers with the target's embedding, final norm and
LM head (the same draft in both libraries). With plain random weights the upper layers move the argmax so much
that the draft almost never agrees (tau ~ 1: no speculative method can win), so by default the residual writes
of the target's upper layers are scaled by --upper_layer_scale=0.1, which makes the draft agree on about half
(20m) to most (100m) positions; the report prints the measured agreement. The scale leaves the compute per token
unchanged. Prompts are held-out standard-library source files as UTF-8 bytes (ids 0..255 of a 259-id byte
vocabulary), so prompt lookup has real text to match. No EOS: every run makes max_new_tokens tokens.

  autoregressive         method="ar"                | generate(do_sample=False), KV cache
  draft, matched         method="draft", chain:K    | assistant_model, K candidates, constant, no confidence stop
  draft, defaults        method="draft", chain:4    | assistant_model with transformers' defaults
  prompt lookup          method="lookup", chain:L   | prompt_lookup_num_tokens=L, max_matching_ngram_size=N

Real-model mode (--model=NAME, a zoo name). jaxspec loads the model with `api.load(NAME)` (the zoo's GGUF,
converted once and cached); transformers loads the same GGUF file with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)` and its tokenizer likewise, so
both dequantise the file to the same float32 weights (the report prints the largest logit difference on the
first prompt). Prompts are the offline suite (`load_suite(per_category=N)`), rendered through the model's chat
template when it has one and as `SuitePrompt.as_plain_prompt()` otherwise (a base model); the report says
whether both tokenizers give the same ids, and jaxspec's ids are fed to both libraries. Both stop at the model's
EOS ids (transformers also crops an accepted speculative block at an EOS, as jaxspec does).

  autoregressive         method="ar"                | generate(do_sample=False)
  prompt lookup          method="lookup", chain:L   | prompt_lookup_num_tokens=L, max_matching_ngram_size=N
  layer skip / early     method="layerskip", chain:K, | assistant_early_exit=E, K candidates, constant,
  exit                   skip_layers=range(E, n)      | no confidence stop

The early-exit draft is the same in both: transformers' EarlyExitCandidateGenerator drafts with the target
itself while its config says num_hidden_layers=E, so the forward runs layers [0, E), then the final norm and
the LM head -- jaxspec's layer-skip drafter with layers E.. skipped. Two differences of plumbing, not of the
draft: (1) in transformers 5 the assistant's num_assistant_tokens, num_assistant_tokens_schedule and
assistant_confidence_threshold are read from the assistant model's generation config -- under early exit the
target's own -- and generate()'s arguments of those names are ignored, so the benchmark sets them on the
target's generation config (assistant_confidence_threshold=0, since the default 0.4 would end drafts early);
(2) transformers' draft keeps its own KV cache of the first E layers, jaxspec's drafter its own state too.

Every call is batch 1 (transformers' assisted generation takes one row). Both sides are warmed up (jaxspec
compiles, transformers' first call) before timing; jaxspec's time is `GenerateResult.wall_time_s`, which excludes
compilation, and the seconds it spent compiling (prompt widths are bucketed, so a suite compiles each method a
few times) are reported apart. Each timed round runs every (library, method) on every prompt, interleaved, so
load changes hit both alike; the figure per prompt is the best of `repeats` rounds (for transformers also the
best over the --torch_threads settings: on a loaded machine torch's thread pool with all cores can be far slower
than one thread) and tokens/s is all new tokens over the sum of those per-prompt times. jaxspec runs with XLA's
default CPU thread pool. tau counts target forwards after the prefill: jaxspec counts them itself; for
transformers a hook on the target's last decoder layer counts them (an early-exit draft never reaches that
layer). Greedy outputs are compared token by token; a divergence is reported with the number of tokens that
matched before it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

from jaxspec import cli, zoo
from jaxspec import config as config_lib
from jaxspec.decoding import api, methods
from jaxspec.eval.suite import SuitePrompt, load_suite
from jaxspec.interop.hf import load_hf_checkpoint
from jaxspec.models.lm import build_model, reconfigured
from jaxspec.training.data import heldout_prompts
from jaxspec.training.tokenizer import ByteTokenizer

VOCAB = ByteTokenizer.vocab_size
JAXSPEC_DEFAULT_DRAFT_TREE = methods.get("draft").default_tree  # what method="draft" drafts when no tree is given
# Assisted generation with exactly K candidates per round: what jaxspec's chain:K drafts.
MATCHED_ASSISTANT = dict(num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)


@dataclasses.dataclass(frozen=True)
class Size:
    """A Llama-style target and how many of its first layers form the draft model."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    draft_layers: int


SIZES = {
    "tiny": Size(d_model=64, n_layers=2, n_heads=4, d_ff=128, draft_layers=1),
    "20m": Size(d_model=512, n_layers=6, n_heads=8, d_ff=1408, draft_layers=1),
    "100m": Size(d_model=768, n_layers=12, n_heads=12, d_ff=2560, draft_layers=2),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    sizes: tuple[str, ...] = ("20m", "100m")
    max_new_tokens: int = 64
    num_prompts: int = 3
    prompt_len: int = 256
    repeats: int = 2
    draft_tokens: int = 4  # random mode: the matched draft pair; real mode: the early-exit pair
    lookup_tokens: int = 8
    lookup_max_ngram: int = 3
    torch_threads: tuple[int, ...] = ()  # transformers runs under each; per prompt the fastest counts (empty: cores, 1)
    upper_layer_scale: float = 0.1  # 1.0: plain random weights (the draft then almost never agrees)
    seed: int = 0
    model: str = ""  # a zoo name: benchmark that real model instead of the random sizes
    per_category: int = 2  # real mode: suite prompts per category
    early_exit: int | None = None  # real mode: layers of the early-exit draft (None: 3/4 of the target's)
    scan_layers: bool = False  # jaxspec's target runs its repeated layers as one scan (model.scan_layers)

    def __post_init__(self):
        if self.model:
            if self.model not in zoo.ZOO:
                raise ValueError(f"model={self.model!r} is not a zoo model; allowed: {sorted(zoo.ZOO)}")
        else:
            unknown = [s for s in self.sizes if s not in SIZES]
            if unknown or not self.sizes:
                raise ValueError(f"sizes={list(self.sizes)}: unknown or none; allowed: {sorted(SIZES)}")
        for key in ("max_new_tokens", "num_prompts", "prompt_len", "repeats", "draft_tokens", "lookup_tokens",
                    "lookup_max_ngram", "per_category"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.early_exit is not None and self.early_exit < 1:
            raise ValueError(f"early_exit={self.early_exit} must be >= 1 (layers the draft keeps)")
        if any(t < 1 for t in self.torch_threads):
            raise ValueError(f"torch_threads={list(self.torch_threads)}: every thread count must be >= 1")
        if self.upper_layer_scale <= 0:
            raise ValueError(f"upper_layer_scale={self.upper_layer_scale} must be > 0")


# -------------------------------------------------------------------------------------------------- models


@dataclasses.dataclass
class Models:
    hf_target: transformers.PreTrainedModel
    target: object  # jaxspec DecoderLM
    target_params: dict
    target_size: int  # parameters
    hf_draft: transformers.PreTrainedModel | None = None  # random mode: a separate draft model
    draft: object = None
    draft_params: dict | None = None
    draft_size: int = 0


def on_stack(models: Models, scan_layers: bool) -> Models:
    """`models` with jaxspec's target on the scanned layer stack when `scan_layers` (same params, same tokens)."""
    return dataclasses.replace(models, target=reconfigured(models.target, scan_layers=True)) if scan_layers else models


def llama_config(size: Size, n_layers: int) -> transformers.LlamaConfig:
    # No special ids: generation runs the full max_new_tokens in both libraries.
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=size.d_model, intermediate_size=size.d_ff, num_hidden_layers=n_layers,
        num_attention_heads=size.n_heads, num_key_value_heads=size.n_heads, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_hf_pair(size: Size, seed: int, upper_layer_scale: float):
    """(target, draft) transformers models; the draft holds the target's first layers, embedding, norm, head.

    `upper_layer_scale` < 1 shrinks the residual writes (o_proj, down_proj) of the target's layers above the
    draft's, which makes the target closer to its own first layers and the draft's guesses better.
    """
    torch.manual_seed(seed)
    target = transformers.LlamaForCausalLM(llama_config(size, size.n_layers)).eval()
    if upper_layer_scale != 1.0:
        with torch.no_grad():
            for layer in target.model.layers[size.draft_layers:]:
                layer.self_attn.o_proj.weight.mul_(upper_layer_scale)
                layer.mlp.down_proj.weight.mul_(upper_layer_scale)
    draft = transformers.LlamaForCausalLM(llama_config(size, size.draft_layers)).eval()
    kept = {name: w for name, w in target.state_dict().items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < size.draft_layers}
    draft.load_state_dict(kept, strict=True)
    return target, draft


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(size: Size, seed: int, upper_layer_scale: float, workdir: str) -> Models:
    """The transformers pair, saved and imported into jaxspec: the same float32 weights on both sides."""
    hf_target, hf_draft = build_hf_pair(size, seed, upper_layer_scale)
    imported = []
    for name, model in (("target", hf_target), ("draft", hf_draft)):
        path = os.path.join(workdir, name)
        model.save_pretrained(path)
        model_cfg, params = load_hf_checkpoint(path, dtype="float32")
        imported.append((build_model(model_cfg), params))
    (target, target_params), (draft, draft_params) = imported
    return Models(hf_target, target, target_params, num_params(hf_target), hf_draft, draft, draft_params,
                  num_params(hf_draft))


def load_transformers_gguf(gguf_path: str):
    """(model, tokenizer) transformers builds from a GGUF file, dequantised to float32."""
    directory, name = os.path.split(os.path.abspath(gguf_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model.eval(), tokenizer


def early_exit_logits(model: transformers.PreTrainedModel, ids: torch.Tensor, layers: int) -> torch.Tensor:
    """Logits of the first `layers` layers, the final norm and the LM head, computed the way transformers'
    EarlyExitCandidateGenerator drafts: the base model's config says num_hidden_layers=`layers` meanwhile."""
    base = getattr(model, model.base_model_prefix)
    full = base.config.num_hidden_layers
    base.config.num_hidden_layers = layers
    try:
        return model(ids).logits
    finally:
        base.config.num_hidden_layers = full


def draft_agreement(target: torch.nn.Module, draft_logits: Callable[[torch.Tensor], torch.Tensor],
                    prompts: list[list[int]]) -> float:
    """How often the draft's top token equals the target's, teacher-forced over every prompt position."""
    same = total = 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long)
            agree = target(ids).logits.argmax(-1) == draft_logits(ids).argmax(-1)
            same, total = same + int(agree.sum()), total + agree.numel()
    return same / total


@dataclasses.dataclass(frozen=True)
class LogitGap:
    """The two libraries' logits on one prompt, teacher-forced: do they hold the same weights?"""

    max_abs: float  # largest |jaxspec - transformers| logit
    top1_agreement: float  # positions whose argmax is the same


def logit_gap(models: Models, prompt: list[int]) -> LogitGap:
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        theirs = models.hf_target(ids).logits[0].float().numpy()
    ours = np.asarray(jax.jit(models.target.apply)({"params": models.target_params}, jnp.asarray([prompt]))[0])
    return LogitGap(float(np.abs(ours - theirs).max()), float((ours.argmax(-1) == theirs.argmax(-1)).mean()))


def read_bandwidth(num_bytes: int, repeats: int = 3) -> float:
    """Bytes/s of a jitted XLA sum over `num_bytes` (all cores, best of `repeats`): the cost of streaming the
    weights once, which bounds a batch-1 forward from below."""
    data = jnp.ones((num_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(data).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


# -------------------------------------------------------------------------------------------------- prompts


def stdlib_prompts(num: int, length: int) -> list[list[int]]:
    """`num` byte-id prompts of `length` bytes: the first chunks of held-out standard-library files."""
    tokenizer = ByteTokenizer()
    texts = heldout_prompts(config_lib.data_defaults(), num, length)
    return [tokenizer.encode(t)[:length] for t in texts]


def jaxspec_prompt_ids(prompt: SuitePrompt, tokenizer, chat: bool) -> list[int]:
    """A suite prompt as jaxspec's tokenizer encodes it: through the chat template, or as plain text."""
    if chat:
        return tokenizer.encode_chat(list(prompt.messages))
    return tokenizer.encode_prompt(prompt.as_plain_prompt())


def transformers_prompt_ids(prompt: SuitePrompt, tokenizer, chat: bool) -> list[int]:
    """The same prompt as transformers' tokenizer encodes it (apply_chat_template / tokenizer(text))."""
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("jaxspec's tokenizer has a chat template but transformers' tokenizer of the same GGUF "
                             "has none: the libraries read the file differently")
        return list(tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(prompt.as_plain_prompt())["input_ids"])


# -------------------------------------------------------------------------------------------------- runners


@dataclasses.dataclass
class Run:
    tokens: list[int]
    seconds: float
    forwards: int  # target forwards after the prefill
    committed: int  # tokens those forwards produced (all but the prefill's token)
    threads: int | None = None  # torch threads of a transformers run
    compile_s: float = 0.0  # jaxspec: seconds this call spent compiling (not in `seconds`)
    compilations: int = 0


Runner = Callable[[list[int]], Run]


def jaxspec_runner(models: Models, max_new: int, eos_ids: tuple[int, ...], **kwargs) -> Runner:
    def run(prompt: list[int]) -> Run:
        out = api.generate(models.target, models.target_params, [prompt], max_new_tokens=max_new,
                           eos_ids=eos_ids or None, **kwargs)
        return Run(out.tokens[0], out.wall_time_s, int(out.target_steps[0]), int(out.accepted[0]),
                   compile_s=out.compile_s, compilations=out.compilations)

    return run


class ForwardCounter:
    """Counts a torch module's forward calls (a hook costs about a microsecond per call)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def target_forward_counter(model: transformers.PreTrainedModel) -> ForwardCounter:
    """Counts the target's full forwards: its last decoder layer runs once in each, and never in an early-exit
    draft (which is the target's own module run with fewer layers)."""
    return ForwardCounter(model.get_decoder().layers[-1])


# What a transformers runner asks of generate(), beyond the greedy defaults.
@dataclasses.dataclass(frozen=True)
class HFCall:
    kwargs: dict = dataclasses.field(default_factory=dict)  # generate() keyword arguments
    # Assisted generation: which model drafts ("draft": the separate draft model, passed as assistant_model;
    # "target": the target itself, under assistant_early_exit) and the generation-config fields transformers
    # reads from that model rather than from generate()'s arguments.
    assistant: str = ""
    assistant_settings: dict | None = None


def transformers_runner(models: Models, counter: ForwardCounter, max_new: int, call: HFCall,
                        eos_ids: tuple[int, ...], pad_id: int | None) -> Runner:
    model = models.hf_target
    kwargs = dict(call.kwargs)
    if eos_ids:
        kwargs.update(eos_token_id=list(eos_ids), pad_token_id=pad_id)
    if call.assistant == "draft":
        kwargs["assistant_model"] = models.hf_draft
    assistant = {"draft": models.hf_draft, "target": model}.get(call.assistant)

    def run(prompt: list[int]) -> Run:
        if call.assistant_settings is not None:  # runners share the assistant object: set its fields every call
            assistant.generation_config.update(**call.assistant_settings)
        ids = torch.tensor([prompt], dtype=torch.long)
        counter.calls = 0
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False, **kwargs)
            seconds = time.perf_counter() - start
        tokens = out[0, len(prompt):].tolist()
        return Run(tokens, seconds, counter.calls - 1, len(tokens) - 1)

    return run


# One row of the table: a jaxspec runner against a transformers runner.
@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    jaxspec: str
    transformers: str
    speculative: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run: runner name -> `api.generate` keyword arguments (jaxspec) or HFCall (transformers), and the
    pairs, which name runners, so a runner shared by two pairs is timed once."""

    jaxspec: dict[str, dict]
    transformers: dict[str, HFCall]
    pairs: list[Pair]


def random_plan(models: Models, s: Settings) -> Plan:
    """Random mode: autoregressive, the draft model (matched and each library's defaults), prompt lookup."""
    k, lk, ng = s.draft_tokens, s.lookup_tokens, s.lookup_max_ngram
    draft = dict(method="draft", draft_model=models.draft, draft_params=models.draft_params)
    jx = {
        "ar": dict(method="ar"),
        f"draft chain:{k}": dict(tree=f"chain:{k}", **draft),
        f"draft {JAXSPEC_DEFAULT_DRAFT_TREE}": dict(tree=JAXSPEC_DEFAULT_DRAFT_TREE, **draft),
        f"lookup chain:{lk}": dict(method="lookup", tree=f"chain:{lk}", min_ngram=1, max_ngram=ng),
    }
    defaults = transformers.GenerationConfig._get_default_generation_params()
    d = {key: defaults[key] for key in
         ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")}
    hf = {
        "greedy": HFCall(),
        f"assisted {k}": HFCall(assistant="draft", assistant_settings=dict(num_assistant_tokens=k,
                                                                            **MATCHED_ASSISTANT)),
        "assisted defaults": HFCall(assistant="draft", assistant_settings=d),
        f"lookup {lk}": HFCall(dict(prompt_lookup_num_tokens=lk, max_matching_ngram_size=ng)),
    }
    pairs = [
        Pair("autoregressive", "ar", "greedy", False),
        Pair(f"draft model, {k} drafts (matched)", f"draft chain:{k}", f"assisted {k}", True),
        Pair(f"draft model, defaults: jaxspec {JAXSPEC_DEFAULT_DRAFT_TREE} vs transformers "
             f"{d['num_assistant_tokens']} {d['num_assistant_tokens_schedule']}, confidence stop "
             f"{d['assistant_confidence_threshold']}", f"draft {JAXSPEC_DEFAULT_DRAFT_TREE}", "assisted defaults",
             True),
        Pair(f"prompt lookup, {lk} drafts, n-gram <= {ng}", f"lookup chain:{lk}", f"lookup {lk}", True),
    ]
    return Plan(jx, hf, pairs)


def resolve_early_exit(early_exit: int | None, n_layers: int) -> int:
    """Layers the early-exit draft keeps: `early_exit`, or 3/4 of the target's; it must leave some to skip.

    Models not trained for early exit (SmolLM2, Gemma 3) agree with their own halfway exit on under a tenth of
    the tokens, so by default the draft keeps more; the report prints the measured agreement."""
    layers = 3 * n_layers // 4 if early_exit is None else early_exit
    if not 1 <= layers < n_layers:
        raise ValueError(f"early_exit={layers} must lie in [1, {n_layers - 1}]: the draft keeps the first layers "
                         f"of a {n_layers}-layer target and skips the rest")
    return layers


def zoo_plan(s: Settings, n_layers: int, early_exit: int) -> Plan:
    """Real mode: autoregressive, prompt lookup, and the target's first `early_exit` layers as its own draft."""
    k, lk, ng, e = s.draft_tokens, s.lookup_tokens, s.lookup_max_ngram, early_exit
    jx = {
        "ar": dict(method="ar"),
        f"lookup chain:{lk}": dict(method="lookup", tree=f"chain:{lk}", min_ngram=1, max_ngram=ng),
        f"layerskip chain:{k}": dict(method="layerskip", tree=f"chain:{k}", skip_layers=tuple(range(e, n_layers))),
    }
    hf = {
        "greedy": HFCall(),
        f"lookup {lk}": HFCall(dict(prompt_lookup_num_tokens=lk, max_matching_ngram_size=ng)),
        f"early exit {e}, {k}": HFCall(dict(assistant_early_exit=e), assistant="target",
                                       assistant_settings=dict(num_assistant_tokens=k, **MATCHED_ASSISTANT)),
    }
    pairs = [
        Pair("autoregressive", "ar", "greedy", False),
        Pair(f"prompt lookup, {lk} drafts, n-gram <= {ng}", f"lookup chain:{lk}", f"lookup {lk}", True),
        Pair(f"early exit at layer {e} of {n_layers}, {k} drafts (layer skip {e}..{n_layers - 1})",
             f"layerskip chain:{k}", f"early exit {e}, {k}", True),
    ]
    return Plan(jx, hf, pairs)


@dataclasses.dataclass
class Subject:
    """One benchmarked target: both libraries' models, the prompts both decode, and what each pair runs."""

    label: str  # the table's model column
    models: Models
    prompts: list[list[int]]  # token ids, the same for both libraries
    plan: Plan
    draft_agreement: float  # teacher-forced top-1 agreement of the draft and the target
    eos_ids: tuple[int, ...] = ()  # stop ids in both libraries (none: every run makes max_new_tokens)
    pad_id: int | None = None
    notes: tuple[str, ...] = ()  # report lines about this subject's weights and prompts


def make_runners(subject: Subject, counter: ForwardCounter, max_new: int) -> tuple[dict, dict]:
    """(jaxspec runners, transformers runners) of the subject's plan, each stopping at its EOS ids."""
    m, plan, eos = subject.models, subject.plan, subject.eos_ids
    jx = {name: jaxspec_runner(m, max_new, eos, **kwargs) for name, kwargs in plan.jaxspec.items()}
    hf = {name: transformers_runner(m, counter, max_new, call, eos, subject.pad_id)
          for name, call in plan.transformers.items()}
    return jx, hf


# -------------------------------------------------------------------------------------------------- timing


def with_threads(runner: Runner, threads: int) -> Runner:
    """`runner` under `threads` torch threads. On a loaded machine torch's thread pool can be many times slower
    with all cores than with one, so transformers is timed under each setting and keeps its fastest."""
    def run(prompt: list[int]) -> Run:
        torch.set_num_threads(threads)
        return dataclasses.replace(runner(prompt), threads=threads)

    return run


Key = tuple[str, str, int | None]  # (library, runner name, torch threads; None for jaxspec)


def time_runners(runners: dict[Key, Runner], prompts: list[list[int]], repeats: int, log=lambda _: None
                 ) -> tuple[dict[Key, list[Run]], dict[Key, tuple[float, int]]]:
    """Per-prompt best Run of every runner over `repeats` interleaved rounds (a runner must repeat exactly), and
    per runner the seconds spent compiling and the compilations, summed over every call."""
    best: dict[Key, list[Run | None]] = {key: [None] * len(prompts) for key in runners}
    compiled = dict.fromkeys(runners, (0.0, 0))
    for round_ in range(repeats):
        for i, prompt in enumerate(prompts):
            log(f"  round {round_ + 1}/{repeats}, prompt {i + 1}/{len(prompts)} ({len(prompt)} tokens)")
            for key, runner in runners.items():
                run = runner(prompt)
                seconds, count = compiled[key]
                compiled[key] = (seconds + run.compile_s, count + run.compilations)
                prev = best[key][i]
                if prev is not None and prev.tokens != run.tokens:
                    raise RuntimeError(f"{key} gave different tokens on two calls with prompt {i}")
                if prev is None or run.seconds < prev.seconds:
                    best[key][i] = run
    return best, compiled


def fastest_over_threads(best: dict[Key, list[Run]]) -> tuple[dict[tuple[str, str], list[Run]], list[str]]:
    """(library, name) -> per prompt the fastest run over thread settings; and where settings' tokens differ."""
    merged: dict[tuple[str, str], list[Run]] = {}
    differ = []
    for (library, name, _), runs in best.items():
        if (library, name) not in merged:
            merged[library, name] = list(runs)
            continue
        for i, run in enumerate(runs):
            if run.tokens != merged[library, name][i].tokens:
                differ.append(f"{name} prompt {i}")
            if run.seconds < merged[library, name][i].seconds:
                merged[library, name][i] = run
    return merged, differ


def matched_prefix(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


@dataclasses.dataclass
class Side:
    tokens_per_s: float
    tau: float  # tokens per target forward after the prefill
    speedup_over_ar: float


@dataclasses.dataclass
class Row:
    size: str  # the model: a random size or a zoo name
    params: str
    pair: str
    speculative: bool
    jaxspec: Side
    transformers: Side
    ratio: float  # jaxspec tokens/s over transformers tokens/s
    identical: int  # prompts with the same tokens in both libraries
    num_prompts: int
    matched: list[int]  # per prompt: tokens equal before the first difference
    lengths: list[int]  # per prompt: the longer of the two outputs
    same_as_own_ar: tuple[bool, bool]  # (jaxspec, transformers) speculative output == own autoregressive


def side(runs: list[Run], ar_runs: list[Run]) -> Side:
    tokens = sum(len(r.tokens) for r in runs)
    seconds = sum(r.seconds for r in runs)
    ar_seconds = sum(r.seconds for r in ar_runs)
    tau = sum(r.committed for r in runs) / max(sum(r.forwards for r in runs), 1)
    return Side(tokens / seconds, tau, ar_seconds / seconds)


def params_label(models: Models) -> str:
    label = f"{models.target_size / 1e6:.1f}M"
    return label if models.hf_draft is None else f"{label} (draft {models.draft_size / 1e6:.1f}M)"


def summarize(label: str, models: Models, pairs: list[Pair], best) -> list[Row]:
    jx_ar, hf_ar = best[("jaxspec", "ar")], best[("transformers", "greedy")]
    rows = []
    for p in pairs:
        jx, hf = best[("jaxspec", p.jaxspec)], best[("transformers", p.transformers)]
        a, b = side(jx, jx_ar), side(hf, hf_ar)
        rows.append(Row(label, params_label(models), p.name, p.speculative, a, b, a.tokens_per_s / b.tokens_per_s,
                        sum(x.tokens == y.tokens for x, y in zip(jx, hf)), len(jx),
                        [matched_prefix(x.tokens, y.tokens) for x, y in zip(jx, hf)],
                        [max(len(x.tokens), len(y.tokens)) for x, y in zip(jx, hf)],
                        (all(x.tokens == y.tokens for x, y in zip(jx, jx_ar)),
                         all(x.tokens == y.tokens for x, y in zip(hf, hf_ar)))))
    return rows


# -------------------------------------------------------------------------------------------------- subjects


def random_subjects(s: Settings, root: str, log: Callable[[str], None]) -> Iterator[Subject]:
    """Random mode: one subject per size, built when its turn comes (so one size's models are held at a time)."""
    prompts = stdlib_prompts(s.num_prompts, s.prompt_len)
    for size_name in s.sizes:
        log(f"[{size_name}] building and importing the models")
        models = on_stack(build_models(SIZES[size_name], s.seed, s.upper_layer_scale, os.path.join(root, size_name)),
                          s.scan_layers)
        agreement = draft_agreement(models.hf_target, lambda ids, m=models: m.hf_draft(ids).logits, prompts)
        yield Subject(size_name, models, prompts, random_plan(models, s), agreement, notes=(
            f"{s.num_prompts} prompts x {s.prompt_len} bytes (first chunks of held-out standard-library files)",
            f"random seeded weights (seed {s.seed}); draft = the target's first layers; "
            f"upper_layer_scale={s.upper_layer_scale}"))


def gguf_subject(label: str, gguf_path: str, lm, s: Settings, log: Callable[[str], None] = print) -> Subject:
    """Real mode: `lm` (jaxspec's `api.load` of the model) against transformers' load of the same GGUF file."""
    log(f"[{label}] loading {os.path.basename(gguf_path)} into transformers")
    hf_target, hf_tokenizer = load_transformers_gguf(gguf_path)
    n_layers = lm.model.model_cfg.n_layers
    if hf_target.config.num_hidden_layers != n_layers:
        raise ValueError(f"{gguf_path}: transformers reads {hf_target.config.num_hidden_layers} layers, jaxspec "
                         f"{n_layers}")
    early_exit = resolve_early_exit(s.early_exit, n_layers)
    suite = load_suite(per_category=s.per_category)
    chat = bool(lm.tokenizer.chat_template)
    prompts = [jaxspec_prompt_ids(p, lm.tokenizer, chat) for p in suite]
    same_ids = sum(a == transformers_prompt_ids(p, hf_tokenizer, chat) for a, p in zip(prompts, suite))
    models = on_stack(Models(hf_target, lm.model, lm.params, num_params(hf_target)), s.scan_layers)
    log(f"[{label}] checking the weights and the early-exit draft")
    gap = logit_gap(models, prompts[0])
    agreement = draft_agreement(hf_target, lambda ids: early_exit_logits(hf_target, ids, early_exit), prompts)
    lengths = [len(p) for p in prompts]
    rendered = "through the model's chat template" if chat else "as plain text (User: ... Assistant:), no template"
    prompt_note = (f"{len(suite)} prompts of the offline suite ({s.per_category} per category), rendered {rendered}, "
                   f"{min(lengths)}-{max(lengths)} tokens; token ids identical in jaxspec's and transformers' "
                   f"tokenizers: {same_ids}/{len(suite)} (jaxspec's ids go to both libraries)")
    weights_note = (f"weights: {os.path.basename(gguf_path)} ({os.path.getsize(gguf_path) / 1e6:.0f} MB), "
                    "dequantised to float32 by each library; on the first prompt, teacher-forced: max |logit "
                    f"difference| {gap.max_abs:.1e}, same top-1 at {gap.top1_agreement:.1%} of positions")
    return Subject(label, models, prompts, zoo_plan(s, n_layers, early_exit), agreement, tuple(lm.tokenizer.eos_ids),
                   lm.tokenizer.pad_id, (prompt_note, weights_note))


def zoo_subjects(s: Settings, log: Callable[[str], None]) -> Iterator[Subject]:
    log(f"[{s.model}] loading (fetched and converted once, then cached)")
    yield gguf_subject(s.model, zoo.fetch_gguf(s.model), api.load(s.model), s, log)


# -------------------------------------------------------------------------------------------------- driver


@dataclasses.dataclass
class Result:
    rows: list[Row]
    torch_threads: tuple[int, ...]  # settings transformers was timed under
    thread_wins: dict[str, dict[int, int]]  # model -> torch threads -> transformers runs (prompts) it was fastest
    thread_differences: list[str]  # transformers runs whose tokens differ between thread settings
    draft_agreement: dict[str, float]  # model -> teacher-forced top-1 agreement of draft and target
    weight_bytes: dict[str, int]  # model -> float32 bytes of the target's weights (read once per forward)
    bandwidth: dict[str, float]  # model -> read bandwidth over that many bytes, bytes/s
    compiled: dict[str, dict[str, tuple[float, int]]]  # model -> jaxspec runner -> (compile seconds, compilations)
    notes: dict[str, tuple[str, ...]]  # model -> what its weights and prompts are
    eos_ids: dict[str, tuple[int, ...]]  # model -> the stop ids both libraries used
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def run_subjects(s: Settings, subjects: Iterable[Subject], log: Callable[[str], None] = print) -> Result:
    """Warm up and time every pair of every subject; the rows of the table and the facts needed to read them."""
    transformers.logging.set_verbosity_error()  # before `subjects`, a generator, loads anything
    transformers.utils.logging.disable_progress_bar()
    load_before = os.getloadavg()
    candidates = s.torch_threads or tuple(dict.fromkeys((os.cpu_count() or 1, 1)))
    rows, wins, differ, agreement, weight_bytes, bandwidth, compiled, notes, eos = [], {}, [], {}, {}, {}, {}, {}, {}
    for subject in subjects:
        label, models, prompts = subject.label, subject.models, subject.prompts
        agreement[label], notes[label], eos[label] = subject.draft_agreement, subject.notes, subject.eos_ids
        weight_bytes[label] = 4 * models.target_size
        bandwidth[label] = read_bandwidth(weight_bytes[label])
        counter = target_forward_counter(models.hf_target)
        jx, hf = make_runners(subject, counter, s.max_new_tokens)
        runners = {("jaxspec", k, None): r for k, r in jx.items()}
        runners.update({("transformers", k, t): with_threads(r, t) for k, r in hf.items() for t in candidates})
        log(f"[{label}] warm-up (jaxspec compiles each method; transformers' first calls)")
        warm = {key: runner(prompts[0]) for key, runner in runners.items()}
        log(f"[{label}] timing {len(runners)} runners x {len(prompts)} prompts x {s.repeats} rounds")
        timed, timed_compiles = time_runners(runners, prompts, s.repeats, log)
        compiled[label] = {key[1]: (warm[key].compile_s + sec, warm[key].compilations + n)
                           for key, (sec, n) in timed_compiles.items() if key[0] == "jaxspec"}
        best, subject_differ = fastest_over_threads(timed)
        differ += [f"{label} {d}" for d in subject_differ]
        threads = [r.threads for (library, _), runs in best.items() if library == "transformers" for r in runs]
        wins[label] = {t: threads.count(t) for t in candidates}
        rows += summarize(label, models, subject.plan.pairs, best)
    return Result(rows, candidates, wins, differ, agreement, weight_bytes, bandwidth, compiled, notes, eos,
                  load_before, os.getloadavg())


def benchmark(s: Settings, workdir: str | None = None, log: Callable[[str], None] = print) -> Result:
    """Build, import, warm up and time every pair: the zoo model `s.model`, else every random size in `s`."""
    if s.model:
        return run_subjects(s, zoo_subjects(s, log), log)
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        return run_subjects(s, random_subjects(s, root, log), log)


def same_tokens(row: Row) -> str:
    if row.identical == row.num_prompts:
        return f"{row.identical}/{row.num_prompts}"
    diverged = [f"{m}/{n}" for m, n in zip(row.matched, row.lengths) if m < n]
    return f"{row.identical}/{row.num_prompts} (matched before divergence: {', '.join(diverged)})"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| model | method (jaxspec vs transformers) | jaxspec tok/s | transformers tok/s | jaxspec / "
             "transformers | tau jaxspec | tau transformers | speedup over own AR: jaxspec | "
             "transformers | same tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.size}, {r.params} | {r.pair} | {r.jaxspec.tokens_per_s:.1f} | "
                     f"{r.transformers.tokens_per_s:.1f} | {r.ratio:.2f}x | {r.jaxspec.tau:.2f} | "
                     f"{r.transformers.tau:.2f} | {r.jaxspec.speedup_over_ar:.2f}x | "
                     f"{r.transformers.speedup_over_ar:.2f}x | {same_tokens(r)} |")
    for size in dict.fromkeys(r.size for r in rows):
        spec = [r for r in rows if r.size == size and r.speculative]
        jx = max(spec, key=lambda r: r.jaxspec.tokens_per_s)
        hf = max(spec, key=lambda r: r.transformers.tokens_per_s)
        lines.append(f"| {size}, {jx.params} | best speculative of each: jaxspec {jx.pair.split(',')[0]} vs "
                     f"transformers {hf.pair.split(',')[0]} | {jx.jaxspec.tokens_per_s:.1f} | "
                     f"{hf.transformers.tokens_per_s:.1f} | "
                     f"{jx.jaxspec.tokens_per_s / hf.transformers.tokens_per_s:.2f}x | {jx.jaxspec.tau:.2f} | "
                     f"{hf.transformers.tau:.2f} | {jx.jaxspec.speedup_over_ar:.2f}x | "
                     f"{hf.transformers.speedup_over_ar:.2f}x | |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(s: Settings, result: Result, command: str) -> str:
    """The Markdown section: command, device, load, versions, table, and the facts needed to read it."""
    load = lambda x: ", ".join(f"{v:.2f}" for v in x)
    wins = "; ".join(f"{size}: " + ", ".join(f"{t} thread(s) in {n}" for t, n in w.items())
                     for size, w in result.thread_wins.items())
    never_same = [f"{r.size} {r.pair}" for r in result.rows if r.speculative and not all(r.same_as_own_ar)]
    compiles = "; ".join(f"{model}: " + ", ".join(f"{name} {sec:.1f} s ({n} shapes)" for name, (sec, n) in c.items())
                         for model, c in result.compiled.items())
    return "\n".join([
        f"command: `{command}`",
        "",
        f"- device: {cpu_name()}, {os.cpu_count()} cores, jax backend {jax.devices()[0].platform}; float32",
        f"- load average (1, 5, 15 min) before: {load(result.load_before)}, after: {load(result.load_after)}",
        f"- versions: jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__},"
        f" Python {platform.python_version()}",
        f"- transformers timed under torch threads {list(result.torch_threads)}, the fastest per prompt kept; "
        f"fastest (runs): {wins}; tokens differing between thread settings: "
        + (", ".join(result.thread_differences) or "none"),
        f"- {s.max_new_tokens} new tokens at most per prompt, batch 1, greedy; best of {s.repeats} interleaved "
        "rounds per prompt, tokens/s = all new tokens / sum of per-prompt times",
        *[f"- {model}: {note}" for model, lines in result.notes.items() for note in lines],
        *[f"- {model}: " + (f"both libraries stop at EOS ids {list(ids)}" if ids else
                            "no EOS ids: every run makes max_new_tokens tokens")
          for model, ids in result.eos_ids.items()],
        "- draft (draft model or early exit) / target top-1 agreement, teacher-forced on the prompts: "
        + ", ".join(f"{size} {a:.0%}" for size, a in result.draft_agreement.items()),
        f"- jaxspec's target layer stack: {'scanned (model.scan_layers)' if s.scan_layers else 'unrolled'}; "
        f"compile seconds (not in tokens/s; prompt widths are bucketed): {compiles}",
        "- batch-1 ceiling from memory traffic (each target forward reads every weight once; the embedding is "
        "counted too): " + "; ".join(
            f"{size} {b / 1e6:.1f} MB at {result.bandwidth[size] / 1e9:.1f} GB/s (XLA read, all cores) -> at most "
            f"{result.bandwidth[size] / b:.0f} target forwards/s" for size, b in result.weight_bytes.items()),
        "- speculative outputs equal to their own library's autoregressive output: "
        + ("all" if not never_same else "not for " + ", ".join(never_same)),
        "",
        markdown_table(result.rows),
    ])


# -------------------------------------------------------------------------------------------------- flags

_SIZES = flags.DEFINE_list("sizes", list(Settings.sizes), f"random-model sizes, of {sorted(SIZES)}")
_MODEL = flags.DEFINE_string("model", "", f"a zoo model, of {sorted(zoo.ZOO)}, benchmarked in place of --sizes")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", Settings.max_new_tokens, "new tokens per prompt")
_PROMPTS = flags.DEFINE_integer("num_prompts", Settings.num_prompts, "random mode: prompts (each timed alone)")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", Settings.prompt_len, "random mode: prompt length in bytes")
_PER_CATEGORY = flags.DEFINE_integer("per_category", Settings.per_category, "--model: suite prompts per category")
_REPEATS = flags.DEFINE_integer("repeats", Settings.repeats, "timed rounds; the best per prompt is kept")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", Settings.draft_tokens,
                                     "draft tokens per round of the matched draft-model / early-exit pair")
_EARLY_EXIT = flags.DEFINE_integer("early_exit", None, "--model: layers the early-exit draft keeps (default: 3/4)")
_LOOKUP_TOKENS = flags.DEFINE_integer("lookup_tokens", Settings.lookup_tokens, "prompt-lookup draft tokens")
_LOOKUP_NGRAM = flags.DEFINE_integer("lookup_max_ngram", Settings.lookup_max_ngram, "longest n-gram matched")
_THREADS = flags.DEFINE_list("torch_threads", [], "torch thread counts to try (default: all cores, and 1)")
_UPPER = flags.DEFINE_float("upper_layer_scale", Settings.upper_layer_scale,
                            "random mode: scale of the residual writes of the target's layers above the draft's")
_SEED = flags.DEFINE_integer("seed", Settings.seed, "random mode: weight seed")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", Settings.scan_layers, "jaxspec's target runs its repeated layers "
                                 "as one scan (model.scan_layers, the quickstart's default; same tokens)")


def main(argv):
    del argv
    if _MODEL.value and _SIZES.present:
        raise app.UsageError("pass --model (a zoo model) or --sizes (random models), not both")
    cli.quiet_libraries()
    settings = Settings(sizes=tuple(_SIZES.value), max_new_tokens=_MAX_NEW.value, num_prompts=_PROMPTS.value,
                        prompt_len=_PROMPT_LEN.value, repeats=_REPEATS.value, draft_tokens=_DRAFT_TOKENS.value,
                        lookup_tokens=_LOOKUP_TOKENS.value, lookup_max_ngram=_LOOKUP_NGRAM.value,
                        torch_threads=tuple(int(t) for t in _THREADS.value), upper_layer_scale=_UPPER.value,
                        seed=_SEED.value, model=_MODEL.value, per_category=_PER_CATEGORY.value,
                        early_exit=_EARLY_EXIT.value, scan_layers=_SCAN_LAYERS.value)
    result = benchmark(settings)
    print()
    print(report(settings, result, "python " + " ".join(sys.argv)))


if __name__ == "__main__":
    app.run(main)
