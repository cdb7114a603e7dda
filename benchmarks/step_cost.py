"""Decode-step cost on a real model: the autoregressive step against the weight-streaming roofline, and the
cost of a K-token tree forward relative to one token, whole and by part (layers, LM head), per weight layout.

  python benchmarks/step_cost.py --model=smollm2-135m-instruct
  python benchmarks/step_cost.py --model=smollm2-135m-instruct --layouts=standard,decode --ks=1,2,4 --rounds=5
  python benchmarks/step_cost.py --model=smollm2-135m-instruct --profile_dir=/tmp/step_trace
  python benchmarks/step_cost.py --model_config=model.json --dtypes=float32,bfloat16 --layouts=decode
  python benchmarks/step_cost.py --layouts=decode --stacks=unrolled,scanned --sections=ar,loops

--model_config names a JSON file holding a model config section (or a whole config with a "model" key, as a
workdir's config.json): the model of that shape with random weights (seed 0), for machines the checkpoint
cannot reach; its prompts are synthetic token ids. --dtypes adds a variant of every layout per compute dtype
(`model.dtype`), its float parameters cast to that dtype (so bfloat16 streams half the bytes); a variant of
another dtype than the model's own is named "<layout> <dtype>".

Layouts (see jaxspec/models/decode_layout.py): "standard" is the parameters as loaded; "decode" the fused
[out, in] layout that the decode loops use (converted once here, outside the timings); "int8" the decode layout
with weight-only int8 projections (`model.weight_dtype="int8"`). `--stacks=unrolled,scanned` adds each one's
scanned stack (`model.scan_layers`): its compile seconds and its step beside the unrolled one's.

1. Bandwidth: a large read (sum), an in-place read+write (donated), and a one-row product with a 512 MB
   matrix (the decode step's own access pattern). The roofline of a step is the bytes of the weights it
   streams over the faster of the two read-only probes.
2. Autoregressive decoding through `engine.autoregressive_loop` (compile excluded), on a prompt of about
   --context - new_tokens/2 tokens, so the mean context is about --context: ms per decode step (the prefill
   subtracted), tokens/s, the share of the roofline, the loop's compile seconds, and how many tokens equal
   the first layout's. Loops given standard parameters convert them to the decode layout once per call
   (in the prefill column); the "decode" and "int8" rows pass converted parameters.
3. The loops as a user calls them (`api.generate`, autoregressive and prompt lookup with a 4-token chain):
   the compile seconds of the first call, tau, tokens/s.
4. Tree forward at --context committed tokens (a chain of K nodes): milliseconds and cost(K)/cost(1) for the
   whole forward, the layers alone (the LM head's output unused, so XLA drops it) and the LM head alone;
   "head: x @ E^T" is the plain matmul the tied head used to be, on the same machine, side by side.
5. Batches (`--sections=batches`, not run by default): the first layout's AR step at each of --batches rows,
   ms per step and tokens/s over the batch: how much batching buys when a CPU product's arithmetic, not its
   weight bytes, grows with the rows.
6. Products (`--sections=products`, not run by default): every weight product of the decode layout alone with K
   input rows, in the form the forward runs it, and its GFLOP/s beside an n x n x n product's (--square_n): the
   products' share of cost(K), and the forward's arithmetic at the machine's matmul rate. Where the CPU kernel
   builds (jaxspec.ops.small_rows_matmul), each group also runs on it, in the same rounds.
7. Prefill (`--sections=prefill`, not run by default): the first layout's prefill and first token for prompts
   of --prefill_lens tokens, at the bucketed prompt width in one forward and in chunks of each --prefill_chunks
   size (chunks that every row's prompt ends before are skipped); padded to twice the bucket, in one forward and
   with the prefill also compiled at the bucket (what `api.generate` does at a fixed prompt_width); and at the
   prompt's own width: what padding costs, and how much of it chunking or a narrower prefill wins back.

Every figure is the minimum (and median) over --rounds round-robin rounds of all the variants of its table,
so they share the machine's load; the load average is printed before and after each table.
"""

from __future__ import annotations

import json
import os
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from jaxspec import config as config_lib
from jaxspec.decoding import api, engine
from jaxspec.models.decode_layout import for_decoding
from jaxspec.models.lm import DecoderLM, build_model, init_params, reconfigured
from jaxspec.state import init_decode_state

FLAGS = flags.FLAGS

PROMPT_TEXT = (
    "Speculative decoding drafts several tokens cheaply and lets the target model check them all in one "
    "forward pass; every accepted token saves one pass over the weights. On a CPU a pass is limited by how "
    "fast the weights stream from memory, so checking a few tokens should cost about as much as producing "
    "one. Write a short essay about memory bandwidth, caches and why small batches are slow on processors "
    "designed for throughput, with examples from matrix multiplication, attention over a key-value cache, "
    "and the final projection onto a large vocabulary. Then explain how the layout of a weight matrix in "
    "memory changes what a compiler can do with it, and list three experiments that would measure it."
)


def random_lm(path: str, seed: int = 0):
    """What the tables need of a loaded model (model, params, config.model), of the shape a JSON config file
    gives and with random weights; it has no tokenizer (prompts are synthetic)."""
    with open(path) as fh:
        section = json.load(fh)
    cfg = config_lib.model_defaults()  # keys the file leaves out keep their defaults
    cfg.update(section.get("model", section))
    model = build_model(cfg)
    params = jax.jit(lambda key: init_params(model, key))(jax.random.key(seed))
    return types.SimpleNamespace(model=model, params=params, config=ml_collections.ConfigDict({"model": cfg}),
                                 tokenizer=None)


def synthetic_prompt(length: int, vocab_size: int) -> list[int]:
    """Token ids spread over the vocabulary (for a model without a tokenizer)."""
    return [int(x) for x in (np.arange(length) * 7919 + 13) % vocab_size]


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def round_robin(fns: dict, rounds: int) -> dict:
    """{name: (min ms, median ms)} of zero-argument callables, timed in turn every round (after one warm call)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: (min(t), float(np.median(t))) for name, t in times.items()}


def param_bytes(params, per_element: int | None = None) -> int:
    """Bytes of `params`, or their element count times `per_element` where given (1: the parameter count)."""
    return int(sum(x.size * (per_element or x.dtype.itemsize) for x in jax.tree.leaves(params)))


def streamed_bytes(params, per_element: int | None = None) -> int:
    """Bytes a one-token step reads: every parameter except the embedding rows it does not look up (an untied
    embedding is only gathered; a tied one is also the LM head). A scanned stack's decode params hold each layer
    once, in its stack. per_element=1 counts parameters instead."""
    total = param_bytes(params, per_element)
    if "lm_head" in params:
        total -= param_bytes(params["embed"], per_element)
    return total


# ------------------------------------------------------------------------------------------------ bandwidth


def bandwidth_table(size_mb: int, rounds: int) -> float:
    n = size_mb * 2**20 // 4
    data = jnp.ones((n,), jnp.float32)
    matrix = jnp.ones((n // 576, 576), jnp.float32)
    vector = jnp.ones((576,), jnp.float32)
    read = jax.jit(jnp.sum)
    bump = jax.jit(lambda x: x * 1.0000001, donate_argnums=0)
    state = {"x": jnp.ones((n,), jnp.float32)}

    def in_place():
        state["x"] = bump(state["x"])
        return state["x"]

    gemv = jax.jit(lambda w, x: w @ x)
    times = round_robin({"read": lambda: read(data), "read+write": in_place,
                         "one-row product": lambda: gemv(matrix, vector)}, rounds)
    moved = {"read": 4 * n, "read+write": 8 * n, "one-row product": matrix.size * 4}
    print(f"\n## Memory bandwidth ({size_mb} MB arrays; {load_average()})\n")
    print("| probe | bytes moved | min ms | median ms | GB/s (min) |")
    print("|---|---:|---:|---:|---:|")
    gbs = {}
    for name, (lo, med) in times.items():
        gbs[name] = moved[name] / lo / 1e6
        print(f"| {name} | {moved[name] / 2**20:.0f} MB | {lo:.2f} | {med:.2f} | {gbs[name]:.1f} |")
    best = max(gbs["read"], gbs["one-row product"])  # a step only reads its weights
    print(f"\nRoofline bandwidth: {best:.1f} GB/s (the faster of the two read-only probes).")
    return best


# ------------------------------------------------------------------------------------------------ variants


def cast_floats(params, dtype: str):
    """Every floating parameter as `dtype` (integer ones, int8 kernels, unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def with_scanned_stacks(variants: dict, stacks) -> dict:
    """`variants` for each of `stacks`: "unrolled" keeps each as it is, "scanned" adds "<name> scanned", the
    same model and params with `model.scan_layers` on (models/layer_scan.py); decode-layout params get the layer
    stacks once here (`for_decoding`), as a caller converts once for many decode calls."""
    unknown = sorted(set(stacks) - {"unrolled", "scanned"})
    if unknown or not stacks:
        raise ValueError(f"--stacks: {unknown or stacks} is not a list of unrolled, scanned")
    out = {}
    for name, (model, params) in variants.items():
        if "unrolled" in stacks:
            out[name] = (model, params)
        if "scanned" in stacks:
            scanned = reconfigured(model, scan_layers=True)
            out[f"{name} scanned"] = for_decoding(scanned, params) if model.layout == "decode" else (scanned, params)
    return out


def layout_variants(lm, layouts, dtypes=()) -> dict:
    """{name: (model, params)} per compute dtype (default: the model's own) and layout; decode-layout params are
    converted here, once, and kept. A dtype other than the model's own casts the float parameters to it first
    and names its variants "<layout> <dtype>".

    Only "standard" in the model's own dtype needs nothing newer than the loops and `api.load`, so
    `--layouts=standard` also measures an older checkout (PYTHONPATH=<its root>) for before/after figures.
    """
    for layout in layouts:
        if layout not in ("standard", "decode", "int8"):
            raise ValueError(f"--layouts: {layout!r} is not one of standard, decode, int8")
    own = lm.config.model.get("dtype", "float32")
    out = {}
    for dtype in dtypes or [own]:
        suffix = "" if dtype == own else f" {dtype}"
        cfg = ml_collections.ConfigDict(lm.config.model)
        cfg.dtype = dtype
        model, params = (lm.model, lm.params) if dtype == own else (build_model(cfg), cast_floats(lm.params, dtype))
        for layout in layouts:
            if layout == "standard":
                out[layout + suffix] = (model, params)
                continue
            layout_cfg = ml_collections.ConfigDict(cfg)
            layout_cfg.weight_dtype = "int8" if layout == "int8" else "float32"
            layout_model = build_model(layout_cfg)
            convert = jax.jit(lambda p, m=layout_model: for_decoding(m, p)[1])
            start = time.perf_counter()
            converted = jax.block_until_ready(convert(params))
            print(f"{layout + suffix}: converted once in {time.perf_counter() - start:.2f} s (compile included)")
            out[layout + suffix] = (layout_model.clone(layout="decode"), converted)
    return out


# ------------------------------------------------------------------------------------------------ AR decode


def ar_call(model, params, prompts: list[list[int]], new: int, count: int, prefill_chunk: int = 0,
            width: int | None = None, prefill_widths: tuple[int, ...] = ()):
    """(call, state length): a zero-argument call of the AR loop over `prompts`, shapes planned for `new` tokens
    (the prompt width bucketed unless `width` is given), making `count` tokens and returning (output, compile
    seconds or 0 once compiled). No stop ids: every call makes all its tokens."""
    width, max_len = engine.plan_shapes(model.model_cfg, [len(p) for p in prompts], new, len(prompts), width)
    tokens, lens = engine.pad_prompts(prompts, width=width)
    dynamic = dict(params=params, prompts=tokens, prompt_lens=lens, key=jax.random.key(0))
    statics = dict(model=model, max_new=count, max_len=max_len, sampling=engine.Sampling(), eos_ids=(), stream=False,
                   prefill_chunk=prefill_chunk, prefill_widths=prefill_widths)
    return (lambda: engine.run_compiled(engine.autoregressive_loop, dynamic, statics)), max_len


def ar_table(variants: dict, prompt: list[int], new: int, roofline_gbs: float | None, rounds: int,
             profile_dir: str | None = None) -> None:
    """Each layout's loop runs twice per round: with --new_tokens and with one token (the prefill and the first
    token alone); their difference over new_tokens - 1 is the decode step. No stop ids: every call makes all
    its tokens."""
    runs, compile_s, outputs = {}, {}, {}
    for name, (model, params) in variants.items():
        for count in (new, 1):
            call, max_len = ar_call(model, params, [prompt], new, count)
            out, seconds = call()
            if count == new:
                compile_s[name], outputs[name] = seconds, out
            runs[(name, count)] = lambda c=call: c()[0]
    times = round_robin(runs, rounds)
    reference = np.asarray(next(iter(outputs.values())).tokens)[0]
    print(f"\n## Autoregressive decoding: prompt {len(prompt)} tokens, {new} new, state length {max_len} "
          f"({load_average()})\n")
    print("| layout | streamed MB | loop compile s | prefill + 1 token ms | ms/token | tok/s | roofline tok/s | "
          "of roofline | tokens vs first row |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in variants:
        full, first = times[(name, new)], times[(name, 1)]
        step = [(a - b) / (new - 1) for a, b in zip(full, first)]  # (from minima, from medians)
        mb = streamed_bytes(variants[name][1]) / 2**20
        roof = roofline_gbs * 1e9 / (mb * 2**20) if roofline_gbs else None  # None: bandwidth not measured
        got = np.asarray(outputs[name].tokens)[0]
        same = int(np.argmin(np.append(got == reference, False)))
        print(f"| {name} | {mb:.0f} | {compile_s[name]:.1f} | {first[0]:.0f} | {step[0]:.2f} ({step[1]:.2f}) | "
              f"{1e3 / step[0]:.1f} | {'-' if roof is None else f'{roof:.1f}'} | "
              f"{'-' if roof is None else f'{1e3 / step[0] / roof:.0%}'} | "
              f"{'same' if same == len(got) else f'first {same} same'} |")
    print("\nms/token: (min of full run - min of prefill run) / (new tokens - 1), (the same from medians).")
    if profile_dir:
        name = next(iter(variants))
        with jax.profiler.trace(profile_dir):
            jax.block_until_ready(runs[(name, new)]())
        print(f"\nprofiler trace of one '{name}' call written to {profile_dir}")


# ------------------------------------------------------------------------------------------------ prefill


def prefill_table(variants: dict, prompt: list[int], lengths: list[int], chunks: list[int], rounds: int) -> None:
    """The first variant's prefill and first token (an AR call making one token) for prompts of each length: at
    the bucketed width in one forward and in chunks of each size (chunks past every row's prompt are skipped);
    padded to twice the bucket, as prompts of many lengths padded to one width are, with the prefill also
    compiled one bucket narrower (`engine.narrowest_prefill`, what `api.generate` does at a fixed prompt_width);
    and at the prompt's own width (no padding: what a prefill of these tokens must cost at least)."""
    name, (model, params) = next(iter(variants.items()))
    setups = {}
    for length in lengths:
        tokens = (prompt * (length // len(prompt) + 1))[:length]
        width = engine.bucket_width(length)
        setups[(length, f"width {width}, one forward")] = (tokens, 0, None, ())
        for chunk in chunks:
            if 0 < chunk < width:
                setups[(length, f"width {width}, chunks of {chunk}")] = (tokens, chunk, None, ())
        wide = 2 * width
        if wide + 2 <= model.model_cfg.max_len:
            setups[(length, f"width {wide}, one forward")] = (tokens, 0, wide, ())
            setups[(length, f"width {wide}, prefill also at {width}")] = (tokens, 0, wide, (width,))
        setups[(length, f"width {length} (no padding), one forward")] = (tokens, 0, length, ())
    runs, outputs = {}, {}
    for key, (tokens, chunk, width, widths) in setups.items():
        call, _ = ar_call(model, params, [tokens], 1, 1, prefill_chunk=chunk, width=width, prefill_widths=widths)
        outputs[key] = np.asarray(call()[0].tokens)[0, :1]
        runs[key] = lambda c=call: c()[0]
    times = round_robin(runs, rounds)
    print(f"\n## Prefill and first token ({name}) by prompt length, width and chunking ({load_average()})\n")
    print("| prompt tokens | prefill | ms (min) | ms (median) | vs one forward at the bucket | first token as there |")
    print("|---:|---|---:|---:|---:|:---:|")
    for length in lengths:
        keys = [key for key in setups if key[0] == length]
        base_ms, base_token = times[keys[0]][0], outputs[keys[0]]
        for key in keys:
            best, median = times[key]
            same = "yes" if np.array_equal(outputs[key], base_token) else "no"
            print(f"| {length} | {key[1]} | {best:.0f} | {median:.0f} | {best / base_ms:.2f}x | {same} |")


# ------------------------------------------------------------------------------------------------ batches


def batch_table(variants: dict, prompt: list[int], new: int, batches: list[int], rounds: int) -> None:
    """The first variant's AR step with B copies of the prompt (batched decoding, as a self-distillation set is
    made): ms per step and tokens/s over the batch, from a full run minus a one-token run as in `ar_table`."""
    name, (model, params) = next(iter(variants.items()))
    calls = {(b, count): ar_call(model, params, [prompt] * b, new, count)[0] for b in batches for count in (new, 1)}
    runs = {key: lambda c=call: c()[0] for key, call in calls.items()}
    times = round_robin(runs, rounds)
    params_count = streamed_bytes(params, per_element=1)
    print(f"\n## Batched autoregressive decoding ({name}): prompt {len(prompt)} tokens, {new} new "
          f"({load_average()})\n")
    print("| batch | ms/step | tokens/s | vs batch " + str(batches[0]) + " | weight GFLOP/s |")
    print("|---:|---:|---:|---:|---:|")
    base = None
    for b in batches:
        step = (times[(b, new)][0] - times[(b, 1)][0]) / (new - 1)
        rate = b * 1e3 / step
        base = base or rate
        print(f"| {b} | {step:.2f} | {rate:.1f} | {rate / base:.2f}x | {2 * params_count * b / step / 1e6:.1f} |")
    print("\nweight GFLOP/s: 2 x streamed parameters x batch per step (the products' arithmetic, attention left out).")


# ------------------------------------------------------------------------------------------------ loops


def loops_table(variants: dict, prompt: list[int], new: int, rounds: int) -> None:
    """The loops as a user calls them (`api.generate`): compile seconds on the first call, then tok/s and tau."""
    methods = {"ar": dict(method="ar"), "lookup chain:4": dict(method="lookup", tree="chain:4")}
    first, runs = {}, {}
    for name, (model, params) in variants.items():
        for label, kwargs in methods.items():
            call = lambda m=model, p=params, kw=kwargs: api.generate(m, p, [prompt], max_new_tokens=new, **kw)
            first[(name, label)] = call()
            runs[(name, label)] = call
    walls = {key: [] for key in runs}
    for _ in range(rounds):
        for key, call in runs.items():
            walls[key].append(call().wall_time_s)
    print(f"\n## Decode loops through api.generate: prompt {len(prompt)} tokens, {new} new ({load_average()})\n")
    print("| layout | method | compile s (first call) | tau | tok/s (best) | tok/s (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, label), result in first.items():
        tokens = int(result.new_tokens.sum())
        best, median = min(walls[(name, label)]), float(np.median(walls[(name, label)]))
        print(f"| {name} | {label} | {result.compile_s:.1f} | {float(result.mean_accepted.mean()):.2f} | "
              f"{tokens / best:.1f} | {tokens / median:.1f} |")


# ------------------------------------------------------------------------------------------------ products


def square_product_gflops(n: int, rounds: int) -> float:
    """The machine's arithmetic rate for XLA's products: an n x n x n float32 matmul, GFLOP/s of the fastest call."""
    a = jnp.ones((n, n), jnp.float32) / n
    product = jax.jit(lambda x, y: x @ y)
    lo, _ = round_robin({"square": lambda: product(a, a)}, rounds)["square"]
    return 2 * n**3 / lo / 1e6


def decode_products(params) -> dict:
    """{(name, shape): [weights]} of the 2-D weights a decode-layout forward multiplies by, grouped by module and
    shape in forward order: the layers' [out, in] kernels (float32 or int8) and the [V, d] embedding as the tied
    LM head."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if leaf.ndim != 2:
            continue
        keys = [getattr(p, "key", str(p)) for p in path]
        if keys[0] == "embed" and "lm_head" in params:
            continue  # an untied embedding is only gathered
        name = "LM head [V, d]" if keys[0] == "embed" else keys[-2]
        out.setdefault((name, tuple(leaf.shape)), []).append(leaf)
    return out


def chained_products(k: int, d_in: int, form: str = "xla"):
    """A jitted call of every weight of a group, one after another as in the forward, on K input rows x [K, d_in]:
    each product's input depends on the one before (through a mean of its output), so they run in order over
    distinct weights, streamed as the forward streams them, with one dispatch for the group. x is an argument
    with distinct rows: XLA would compute a product of identical (broadcast) rows once.

    form "xla": XLA's product over the stored [out, in] weights (`einsum("ri,oi->ro")`, the one-row step's form);
    "kernel": jaxspec.ops.small_rows_matmul, which `layers.matmul_t` runs for 2-16 rows."""
    from jaxspec.ops.small_rows_matmul import small_rows_matmul

    if form == "kernel":
        product = small_rows_matmul
    else:
        product = lambda x, w: jnp.einsum("ri,oi->ro", x, w.astype(jnp.float32))  # noqa: E731

    def run(x, weights):
        outs = []
        for w in weights:
            y = product(x, w)
            x = x + 1e-9 * jnp.mean(y)
            outs.append(y)
        return outs

    return jax.jit(run)


def products_table(variants: dict, ks: list[int], rounds: int, square_n: int) -> None:
    """The weight products of the decode layout alone, each group (e.g. the 30 layers' gate/up) in one call on
    K input rows, as XLA's products and (where it builds) on the CPU kernel, against the machine's arithmetic
    rate: whether a K-row forward is bound by the bytes it streams or by how fast the products do small-K
    arithmetic."""
    if "decode" not in variants:
        print("\n(products: needs --layouts to include decode)")
        return
    from jaxspec.ops import small_rows_matmul as kernel_lib

    products = decode_products(variants["decode"][1])
    forms = ("xla", "kernel") if kernel_lib.available() else ("xla",)
    fns = {}
    for (name, shape), weights in products.items():
        d_in = shape[1]
        for k in ks:
            x = jax.random.normal(jax.random.key(k), (k, d_in), jnp.float32) / d_in**0.5
            for form in forms:
                chain = chained_products(k, d_in, form)
                fns[(name, shape, k, form)] = lambda f=chain, x=x, w=weights: f(x, w)
    times = round_robin(fns, rounds)
    rate = square_product_gflops(square_n, rounds)
    print(f"\n## Weight products of the decode layout, K rows each ({load_average()})\n")
    print(f"Arithmetic rate of a {square_n}^3 float32 product: {rate:.1f} GFLOP/s.\n")
    print("| product | shape | per forward | " + " | ".join(f"K={k} ms" for k in ks) + " | " +
          " | ".join(f"K={k} GFLOP/s" for k in ks) + " | K=1 GB/s |")
    print("|---|---|---:|" + "---:|" * (2 * len(ks) + 1))
    step = {(k, form): 0.0 for k in ks for form in forms}
    flops = {k: 0.0 for k in ks}
    for (name, shape), weights in products.items():
        count = len(weights)
        for k in ks:
            flops[k] += count * 2 * k * shape[0] * shape[1]
        for form in forms:
            ms = [times[(name, shape, k, form)][0] for k in ks]
            rates = [2 * count * k * shape[0] * shape[1] / (t * 1e6) for k, t in zip(ks, ms)]
            for k, t in zip(ks, ms):
                step[(k, form)] += t
            gbs = param_bytes(weights) / (ms[0] * 1e6)
            label = name if form == "xla" else f"{name}, CPU kernel"
            print(f"| {label} | {shape[0]} x {shape[1]} | {count} | " + " | ".join(f"{t:.2f}" for t in ms) +
                  " | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {gbs:.1f} |")
    kernel_cols = " | products on the CPU kernel, ms | / K=1 (XLA's K=1)" if "kernel" in forms else ""
    print(f"\n| K | products of a forward, ms | / K=1{kernel_cols} | arithmetic at the square rate, ms | GFLOP |")
    print("|---:|---:|---:|" + ("---:|---:|" if "kernel" in forms else "") + "---:|---:|")
    first = step[(ks[0], "xla")]
    for k in ks:
        kernel = (f" | {step[(k, 'kernel')]:.2f} | {step[(k, 'kernel')] / first:.2f}" if "kernel" in forms else "")
        print(f"| {k} | {step[(k, 'xla')]:.2f} | {step[(k, 'xla')] / first:.2f}{kernel} | "
              f"{flops[k] / rate / 1e6:.2f} | {flops[k] / 1e9:.2f} |")
    print("\nms: the minimum over rounds of one call running every weight of the group in turn (distinct weights, "
          "streamed from memory as in a forward); the arithmetic column is the forward's multiply-adds at the "
          "square product's rate. 'CPU kernel' rows run jaxspec.ops.small_rows_matmul (what "
          "layers.matmul_t runs for 2-16 rows) on the same [out, in] weights, side by side with XLA's products in "
          "the same rounds.")


# ------------------------------------------------------------------------------------------------ K curve


def prefilled_state(model: DecoderLM, params, context: int, max_len: int):
    tokens = (jnp.arange(context, dtype=jnp.int32) * 7919 % model.model_cfg.vocab_size)[None]
    fill = jax.jit(lambda p, t: model.apply({"params": p}, t, state=init_decode_state(model.model_cfg, 1, max_len),
                                            num_new=jnp.full((1,), context, jnp.int32), fresh=True)[1])
    return fill(params, tokens)


def curve_table(variants: dict, ks: list[int], context: int, rounds: int,
                parts=("whole", "layers", "head")) -> None:
    max_len = engine.bucket_len(context + max(ks) + 1)
    fns = {}
    for name, (model, params) in variants.items():
        state = prefilled_state(model, params, context, max_len)
        d = model.model_cfg.d_model
        for k in ks:
            parents = np.arange(k) - 1
            tokens = jnp.full((1, k), 42, jnp.int32)
            hidden = jnp.ones((1, k, d), jnp.float32) / d**0.5
            whole = jax.jit(lambda p, t, s, m=model, pa=parents: m.apply({"params": p}, t, state=s, parents=pa)[0])
            layers = jax.jit(lambda p, t, s, m=model, pa=parents: m.apply(
                {"params": p}, t, state=s, parents=pa, return_hidden=True)[0].hidden)
            head = jax.jit(lambda p, h, m=model: m.apply({"params": p}, h, method=DecoderLM.project))
            part_fns = {"whole": lambda f=whole, p=params, t=tokens, s=state: f(p, t, s),
                        "layers": lambda f=layers, p=params, t=tokens, s=state: f(p, t, s),
                        "head": lambda f=head, p=params, h=hidden: f(p, h)}
            for part in parts:
                fns[(name, part, k)] = part_fns[part]
    if "head" in parts and "standard" in variants and variants["standard"][0].model_cfg.tie_embeddings:
        embedding = variants["standard"][1]["embed"]["embedding"]
        plain = jax.jit(lambda e, h: h @ e.T)
        for k in ks:
            rows = jnp.ones((k, embedding.shape[1]), jnp.float32)
            fns[("standard", "head: x @ E^T", k)] = lambda h=rows: plain(embedding, h)
    start = time.perf_counter()
    for fn in fns.values():  # compile (and warm) everything before the first timed round
        jax.block_until_ready(fn())
    print(f"\n(compiled {len(fns)} forwards in {time.perf_counter() - start:.0f} s)")
    times = round_robin(fns, rounds)
    print(f"\n## Tree forward over K chain nodes at context {context} (state length {max_len}; {load_average()})\n")
    print("| layout | part | " + " | ".join(f"K={k} ms" for k in ks) + " | " +
          " | ".join(f"K={k}/K={ks[0]}" for k in ks[1:]) + " |")
    print("|---|---|" + "---:|" * (2 * len(ks) - 1))
    parts = sorted({(n, p) for n, p, _ in times}, key=lambda np_: (list(variants).index(np_[0]), np_[1]))
    for name, part in parts:
        lo = [times[(name, part, k)][0] for k in ks]
        med = [times[(name, part, k)][1] for k in ks]
        cells = [f"{a:.2f} ({b:.2f})" for a, b in zip(lo, med)]
        ratios = [f"{x / lo[0]:.2f}" for x in lo[1:]]
        print(f"| {name} | {part} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print("\nms: min (median) over rounds; ratios from the minima.")


def define_flags() -> None:
    """The script's flags, defined only when it runs as a program, so that importing it (the smoke test, beside
    other benchmark scripts that define flags of the same names) defines none."""
    flags.DEFINE_string("model", "smollm2-135m-instruct", "zoo model name or workdir")
    flags.DEFINE_string("model_config", None, "JSON file of a model config section (or a whole config): that "
                        "model with random weights instead of --model, synthetic prompts")
    flags.DEFINE_list("dtypes", [], "compute dtypes (model.dtype) to compare, float parameters cast to each "
                      "(default: the model's own)")
    flags.DEFINE_list("curve_parts", ["whole", "layers", "head"], "parts of the tree forward to time")
    flags.DEFINE_list("layouts", ["standard", "decode", "int8"], "weight layouts to compare")
    flags.DEFINE_list("stacks", ["unrolled"], "layer stacks to compare: unrolled, scanned (model.scan_layers)")
    flags.DEFINE_list("ks", ["1", "2", "4", "7", "11"], "tree sizes K (a chain of K nodes)")
    flags.DEFINE_integer("context", 192, "committed tokens before the tree forward / mean AR context")
    flags.DEFINE_integer("new_tokens", 64, "tokens per autoregressive call")
    flags.DEFINE_integer("rounds", 10, "round-robin rounds per table")
    flags.DEFINE_integer("bandwidth_mb", 512, "array size of the bandwidth probes")
    flags.DEFINE_list("sections", ["bandwidth", "ar", "loops", "curve"],
                      "tables to run (also: batches, products, prefill)")
    flags.DEFINE_list("prefill_lens", ["96", "160", "224"], "prompt lengths of the prefill table")
    flags.DEFINE_list("prefill_chunks", ["32", "64", "128"], "chunk sizes of the prefill table (powers of two)")
    flags.DEFINE_list("batches", ["1", "8", "16", "32", "64"], "batch sizes of the batches table")
    flags.DEFINE_integer("square_n", 2048, "side of the square product that measures the arithmetic rate")
    flags.DEFINE_string("profile_dir", None, "also write a jax.profiler trace of one AR call here")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = sorted(set(FLAGS.sections) - {"bandwidth", "ar", "batches", "loops", "products", "curve", "prefill"})
    if unknown:  # checked before anything is loaded or run
        raise ValueError(f"--sections: unknown table(s) {unknown}; allowed: bandwidth, ar, batches, loops, products, "
                         "curve, prefill")
    unknown = sorted(set(FLAGS.curve_parts) - {"whole", "layers", "head"})
    if unknown:
        raise ValueError(f"--curve_parts: unknown part(s) {unknown}; allowed: whole, layers, head")
    if FLAGS.model_config:
        lm, what = random_lm(FLAGS.model_config), f"random weights of the shape in {FLAGS.model_config}"
    else:
        lm, what = api.load(FLAGS.model), FLAGS.model
    print(f"# step_cost: {what} on {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), "
          f"{lm.model.model_cfg.dtype}, jax {jax.__version__}, {load_average()}")
    ks = [int(k) for k in FLAGS.ks]
    roofline = bandwidth_table(FLAGS.bandwidth_mb, FLAGS.rounds) if "bandwidth" in FLAGS.sections else None
    variants = with_scanned_stacks(layout_variants(lm, FLAGS.layouts, FLAGS.dtypes), FLAGS.stacks)
    for name, (_, params) in variants.items():
        print(f"{name}: {param_bytes(params) / 2**20:.0f} MB of parameters, {streamed_bytes(params) / 2**20:.0f} MB "
              "streamed per step")
    prompt_len = max(1, FLAGS.context - FLAGS.new_tokens // 2)
    if lm.tokenizer is None:
        prompt = synthetic_prompt(prompt_len, lm.model.model_cfg.vocab_size)
    else:
        prompt = lm.tokenizer.encode_prompt(PROMPT_TEXT * 4)[:prompt_len]
    if "ar" in FLAGS.sections:
        ar_table(variants, prompt, FLAGS.new_tokens, roofline, max(3, FLAGS.rounds // 2), FLAGS.profile_dir)
    if "prefill" in FLAGS.sections:
        prefill_table(variants, prompt, [int(n) for n in FLAGS.prefill_lens], [int(c) for c in FLAGS.prefill_chunks],
                      max(3, FLAGS.rounds // 2))
    if "batches" in FLAGS.sections:
        batch_table(variants, prompt, FLAGS.new_tokens, [int(b) for b in FLAGS.batches], max(3, FLAGS.rounds // 2))
    if "loops" in FLAGS.sections:
        loops_table(variants, prompt, FLAGS.new_tokens, max(3, FLAGS.rounds // 2))
    if "products" in FLAGS.sections:
        products_table(variants, ks, FLAGS.rounds, FLAGS.square_n)
    if "curve" in FLAGS.sections:
        curve_table(variants, ks, FLAGS.context, FLAGS.rounds, FLAGS.curve_parts)


if __name__ == "__main__":
    define_flags()
    app.run(main)
