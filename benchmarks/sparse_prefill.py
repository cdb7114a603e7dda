"""Sparse prefill on a real model: XAttention and FlexPrefill block selection against dense attention.

  python -m benchmarks.sparse_prefill
  python -m benchmarks.sparse_prefill --prompt_tokens=1024 --num_prompts=2 --flexprefill_gamma=0.95 \
      --output_json=/tmp/sparse_prefill.json

Prompts: the offline suite's conversations (`jaxspec.eval.suite`) joined into one long text, each prompt
starting at another category, cut to --prompt_tokens tokens. Per prompt and method ("dense", and the
block-sparse prefills "xattention" and "flexprefill", `model.attention.prefill`):

- density: the share of causal (query block, key block) tiles the selection keeps, over layers and heads;
- recall: per query, the share of its dense attention mass that lies in kept tiles, averaged over queries,
  heads and layers. Density and recall are measured on the queries and keys of the dense forward's every
  layer, so they judge the selection alone (in a sparse forward, later layers also see earlier layers' errors);
- query-aware: for FlexPrefill, the share of heads that took the query-aware pattern (the rest: vertical-slash);
- logits: the max and mean abs difference of the last position's logits from dense, and the share of the last
  --last_n positions whose top-1 next token equals dense's, all from the method's own forward;
- time: one forward (every layer, the LM head on the last --last_n positions only) against dense, the minimum
  over --rounds round-robin rounds after an untimed first call (which compiles). On CPU the block-sparse
  attention runs its dense masked reference (`implementation=None` picks "xla"), so there the ratio shows the
  cost of the selection, not a saving; the Pallas kernel skips unkept tiles on GPU and TPU.

--model_config names a JSON model config section instead of --model: that shape with random weights (seed 0)
and synthetic prompts, for a machine without the checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from jaxspec import config as config_lib

FLAGS = flags.FLAGS
METHODS = ("dense", "xattention", "flexprefill")


def suite_prompts(tokenizer, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """`num_prompts` prompts of `prompt_tokens` tokens: the suite's conversations joined, each prompt starting
    at the next category's first conversation (the text wraps around when it runs out)."""
    from jaxspec.eval.suite import CATEGORIES, load_suite

    documents = [p.as_plain_prompt() for p in load_suite()]
    starts = [next(i for i, p in enumerate(load_suite()) if p.category == c) for c in CATEGORIES]
    prompts = []
    for j in range(num_prompts):
        first = starts[j % len(starts)]
        tokens = tokenizer.encode("\n\n".join(documents[first:] + documents[:first]))
        prompts.append((tokens * (1 + prompt_tokens // len(tokens)))[:prompt_tokens])
    return prompts


def synthetic_prompts(num_prompts: int, prompt_tokens: int, vocab_size: int) -> list[list[int]]:
    """Token ids spread over the vocabulary (for a model without a tokenizer), one offset per prompt."""
    return [[int(x) for x in (np.arange(prompt_tokens) * 7919 + 13 + 101 * j) % vocab_size]
            for j in range(num_prompts)]


def method_model(model, method: str, options):
    """`model` with `model.attention.prefill=method` and the selection settings of `options`."""
    from jaxspec.models.lm import build_model

    cfg = ml_collections.ConfigDict(model.model_cfg)
    cfg.attention.update(dict(prefill=method, block_size=options.block_size,
                              xattention_stride=options.xattention_stride,
                              xattention_threshold=options.xattention_threshold,
                              flexprefill_gamma=options.flexprefill_gamma, flexprefill_tau=options.flexprefill_tau))
    return build_model(cfg)


@contextlib.contextmanager
def recording_attention(captured: list):
    """While active (at trace time), every full-sequence attention call of the models appends its (q, k)."""
    from jaxspec.models import attention

    original = attention.causal_attention

    def recording(q, k, v, **kwargs):
        captured.append((q, k))
        return original(q, k, v, **kwargs)

    attention.causal_attention = recording
    try:
        yield
    finally:
        attention.causal_attention = original


def dense_queries_and_keys(model, params, tokens):
    """Per attention layer, the (q [1, H, T, D], k [1, Hkv, T, D]) the dense forward of `tokens` attends with."""

    @jax.jit
    def forward(params, tokens):
        captured = []
        with recording_attention(captured):
            model.apply({"params": params}, tokens)  # its logits are unused: XLA drops the LM head
        return captured

    return forward(params, jnp.asarray([tokens], jnp.int32))


def tail_logits_forward(model, last_n: int):
    """Jitted (params, tokens [1, T]) -> logits [last_n, V] of the last positions (the LM head on those only)."""

    def tail(module, tokens):
        return module.project(module(tokens, return_hidden=True).hidden[:, -last_n:])

    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens, method=tail)[0])


@functools.partial(jax.jit, static_argnames=("block_size",))
def kept_share(q, k, keep, *, block_size: int, scale: float):
    """(density, recall) of a keep mask [1, H, n, n] on the dense causal attention of q and k (see the module
    docstring): kept causal tiles over causal tiles, and the mean per-query attention mass in kept tiles."""
    b, h, t, d = q.shape
    n = keep.shape[-1]
    kh = jnp.repeat(k.astype(jnp.float32), h // k.shape[1], axis=1)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), kh) * scale
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    per_block = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, n * block_size - t)))
    per_block = per_block.reshape(b, h, t, n, block_size).sum(-1)  # [B, H, T, n]: mass per key block
    row_keep = keep[:, :, jnp.arange(t) // block_size, :]  # [B, H, T, n]: the tiles of each query's row
    recall = jnp.mean(jnp.sum(per_block * row_keep, axis=-1))
    density = jnp.sum(keep & jnp.tril(jnp.ones((n, n), bool))) / (b * h * n * (n + 1) / 2)
    return density, recall


def selection(method: str, options, scale: float):
    """(q, k) -> (keep [B, H, n, n], share of query-aware heads or None): the selection `method` runs."""
    from pallas_kernels.flexprefill import flexprefill_selection
    from pallas_kernels.xattention import xattention_block_mask

    if method == "xattention":
        return jax.jit(lambda q, k: (xattention_block_mask(q, k, block_size=options.block_size,
                                                           stride=options.xattention_stride,
                                                           threshold=options.xattention_threshold), None))

    def flexprefill(q, k):
        chosen = flexprefill_selection(q, k, block_size=options.block_size, gamma=options.flexprefill_gamma,
                                       tau=options.flexprefill_tau, scale=scale)
        return chosen.keep, jnp.mean(chosen.query_aware)

    return jax.jit(flexprefill)


def selection_figures(layers, method: str, options, scale: float) -> dict:
    """Density, recall and (FlexPrefill) the query-aware share of `method`, averaged over `layers` of (q, k)."""
    if method == "dense":
        return {"density": 1.0, "recall": 1.0, "query_aware": None}
    select = selection(method, options, scale)
    density, recall, query_aware = [], [], []
    for q, k in layers:
        keep, aware = select(q, k)
        d, r = kept_share(q, k, keep, block_size=options.block_size, scale=scale)
        density.append(float(d))
        recall.append(float(r))
        query_aware.append(None if aware is None else float(aware))
    return {"density": float(np.mean(density)), "recall": float(np.mean(recall)),
            "query_aware": None if query_aware[0] is None else float(np.mean(query_aware))}


def round_robin(fns: dict, rounds: int) -> dict:
    """{name: min ms} of zero-argument callables timed in turn every round (each called once before, untimed)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: min(t) for name, t in times.items()}


def prompt_rows(models: dict, params, tokens: list[int], options, scale: float) -> list[dict]:
    """One row per method for one prompt (see the module docstring for the columns)."""
    layers = dense_queries_and_keys(models["dense"], params, tokens)
    batch = jnp.asarray([tokens], jnp.int32)
    forwards = {m: tail_logits_forward(model, options.last_n) for m, model in models.items()}
    logits = {m: np.asarray(fn(params, batch)) for m, fn in forwards.items()}  # the first call compiles
    times = round_robin({m: functools.partial(fn, params, batch) for m, fn in forwards.items()}, options.rounds)
    rows = []
    for method in models:
        error = np.abs(logits[method][-1] - logits["dense"][-1])
        agree = np.mean(logits[method].argmax(-1) == logits["dense"].argmax(-1))
        rows.append({"tokens": len(tokens), "method": method,
                     **selection_figures(layers, method, options, scale),
                     "last_max_err": float(error.max()), "last_mean_err": float(error.mean()),
                     "top1_agree": float(agree), "ms": times[method], "vs_dense": times[method] / times["dense"]})
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    """Per method, the mean of every figure over the prompts."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        mean = {key: (None if mine[0][key] is None else float(np.mean([r[key] for r in mine])))
                for key in mine[0] if key not in ("prompt", "tokens", "method")}
        out.append({"prompt": "mean", "tokens": mine[0]["tokens"], "method": method, **mean})
    return out


def markdown(rows: list[dict]) -> str:
    from jaxspec.eval import tables

    shown = [{"prompt": r["prompt"], "tokens": r["tokens"], "method": r["method"], "density": r["density"],
              "recall": r["recall"], "query-aware": "" if r["query_aware"] is None else f"{r['query_aware']:.2f}",
              "last-logit max err": f"{r['last_max_err']:.3g}", "last-logit mean err": f"{r['last_mean_err']:.3g}",
              "top-1 agree": f"{r['top1_agree']:.3f}", "ms": f"{r['ms']:.0f}", "time vs dense": f"{r['vs_dense']:.2f}x"}
             for r in rows]
    return tables.markdown_table(shown, list(shown[0]))


def run(lm, prompts: list[list[int]], options) -> list[dict]:
    """Every prompt's rows and the per-method means; prints the table as it goes."""
    scale = lm.model.model_cfg.query_scale or config_lib.head_dim(lm.model.model_cfg) ** -0.5
    models = {m: lm.model if m == "dense" else method_model(lm.model, m, options) for m in METHODS}
    rows = []
    for j, tokens in enumerate(prompts):
        rows += [{"prompt": j, **row} for row in prompt_rows(models, lm.params, tokens, options, scale)]
        print(f"prompt {j} ({len(tokens)} tokens) done; load average "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    rows += mean_rows(rows)
    print("\n" + markdown(rows) + "\n", flush=True)
    return rows


def random_lm(path: str):
    """A model of the shape a JSON model config file gives, with random weights (seed 0) and no tokenizer."""
    from jaxspec.models.lm import build_model, init_params

    with open(path) as fh:
        section = json.load(fh)
    cfg = config_lib.model_defaults()
    cfg.update(section.get("model", section))
    model = build_model(cfg)
    return types.SimpleNamespace(model=model, params=jax.jit(lambda key: init_params(model, key))(jax.random.key(0)),
                                 tokenizer=None)


def options_from_flags():
    keys = ("block_size", "xattention_stride", "xattention_threshold", "flexprefill_gamma", "flexprefill_tau",
            "last_n", "rounds")
    return types.SimpleNamespace(**{key: FLAGS[key].value for key in keys})


def define_flags() -> None:
    """The script's flags, defined only when it runs (tests import its functions without them)."""
    defaults = config_lib.model_defaults().attention
    flags.DEFINE_string("model", "smollm2-135m-instruct", "a zoo name or a workdir")
    flags.DEFINE_string("model_config", None, "a JSON model config: that shape, random weights (instead of --model)")
    flags.DEFINE_integer("num_prompts", 3, "prompts, each starting at another suite category")
    flags.DEFINE_integer("prompt_tokens", 2048, "tokens per prompt")
    flags.DEFINE_integer("block_size", defaults.block_size, "tile size of the block-sparse attention")
    flags.DEFINE_integer("xattention_stride", defaults.xattention_stride, "XAttention's antidiagonal stride")
    flags.DEFINE_float("xattention_threshold", defaults.xattention_threshold, "XAttention's kept score share")
    flags.DEFINE_float("flexprefill_gamma", defaults.flexprefill_gamma, "FlexPrefill's kept attention share")
    flags.DEFINE_float("flexprefill_tau", defaults.flexprefill_tau, "FlexPrefill's query-aware divergence bound")
    flags.DEFINE_integer("last_n", 64, "positions at the end of each prompt whose top-1 token is compared")
    flags.DEFINE_integer("rounds", 2, "timed round-robin rounds")
    flags.DEFINE_string("output_json", None, "write the options and rows here")


def main(argv) -> None:
    del argv
    from jaxspec import cli
    from jaxspec.decoding import api

    cli.quiet_libraries()
    start = time.perf_counter()
    options = options_from_flags()
    with cli.user_errors():
        if FLAGS.model_config:
            lm = random_lm(FLAGS.model_config)
            prompts = synthetic_prompts(FLAGS.num_prompts, FLAGS.prompt_tokens, lm.model.model_cfg.vocab_size)
        else:
            lm = api.load(FLAGS.model)
            prompts = suite_prompts(lm.tokenizer, FLAGS.num_prompts, FLAGS.prompt_tokens)
        print(f"{FLAGS.model_config or FLAGS.model}: {len(prompts)} prompts of {FLAGS.prompt_tokens} tokens, "
              f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; options "
              f"{vars(options)}", flush=True)
        rows = run(lm, prompts, options)
    print(f"wall time {(time.perf_counter() - start) / 60:.1f} min")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as fh:
            json.dump({"model": FLAGS.model_config or FLAGS.model, "backend": jax.default_backend(),
                       "prompt_tokens": FLAGS.prompt_tokens, "options": vars(options), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
