"""Pallas kernels against their references and dense attention; prints Markdown tables.

On GPU/TPU: median wall time (ms) of jitted calls after warm-up (`block_until_ready`), and speedups
measured side by side in one run; dense attention is `jax.nn.dot_product_attention` with XLA's implementation
and, where it runs, cuDNN's. On CPU the kernels only run in interpret mode, so the script reports correctness
there instead (max abs error of the kernel against the reference), on small shapes. Gradients of the
block-sparse kernel are checked against the reference's up to --grad_check_max_len tokens.

Shared-prefix attention (Hydragen), run when named in --ops, is timed on every backend, CPU included, since
both sides are XLA: B rows that attend to one P-token prefix plus a suffix of their own, as plain batched tree
attention over each row's [prefix | suffix] cache (the prefix replicated per row, as a batch without prefix
sharing holds it) against shared_prefix_attention (the prefix read once for all rows), both
implementation="xla"; on GPU/TPU the Pallas prefix kernel is timed too. Default shapes are SmolLM2-135M's
attention (H=9, Hkv=3, D=64), in float32 on CPU.

A failure (a kernel that does not lower, a shape out of memory) is printed with its first lines and leaves
"fail" in its cells; the sweep goes on, and the run exits non-zero at the end.

  python -m benchmarks.kernels                                  # default sweep for the backend
  python -m benchmarks.kernels --seq_lens=16384 --densities=0.1 --causal=false
  python -m benchmarks.kernels --ops=shared_prefix --prefix_batches=8,32 --prefix_len=2048 --suffix_len=64
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.eval.timing import median_ms
from pallas_kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    three_state_block_mask,
)
from pallas_kernels.shared_prefix_attention import (
    concat_prefix,
    shared_prefix_attention,
    shared_prefix_attention_reference,
)
from pallas_kernels.tree_attention import tree_attention, tree_attention_reference

# Above this many attention-matrix elements (B*H*Tq*Tk) the dense masked reference is not run: it
# materialises several float32 copies of the matrix.
_MAX_REFERENCE_ELEMENTS = 2**31

OPS = ("block_sparse", "tree", "shared_prefix")
FAILED = "fail"  # the value of a measurement that raised; "-" is one not taken
failures: list[str] = []


def attempt(what: str, fn, *args):
    """fn(*args), or FAILED after printing the error's first lines: one kernel or shape that fails must not
    stop the others."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 (reported, counted, and the exit status says so)
        lines = [line for line in str(error).splitlines() if line.strip()][:6]
        print(f"FAILED {what}: {type(error).__name__}: " + "\n    ".join(lines), flush=True)
        failures.append(what)
        return FAILED


def cell(value, spec: str) -> str:
    if value is None or value is FAILED:
        return "-" if value is None else FAILED
    return format(value, spec)


def ratio(slow, fast) -> str:
    if any(x is None or x is FAILED for x in (slow, fast)):
        return "-"
    return f"{slow / fast:.2f}x"


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def float_list(text):
    return [float(x) for x in text.split(",") if x]


def parse_args(argv=None):
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="block_sparse,tree",
                        help="comma list of: " + ", ".join(OPS) + " (shared_prefix only when named)")
    parser.add_argument("--seq_lens", type=int_list, default=[64, 100] if on_cpu else [4096, 8192, 16384],
                        help="block-sparse sequence lengths")
    parser.add_argument("--densities", type=float_list, default=[0.25, 0.5, 1.0] if on_cpu else [0.1, 0.25, 0.5],
                        help="fraction of the allowed (causal or all) tiles kept")
    parser.add_argument("--causal", choices=["true", "false", "both"], default="both")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4 if on_cpu else 16)
    parser.add_argument("--kv_heads", type=int, default=2 if on_cpu else 8)
    parser.add_argument("--head_dim", type=int, default=16 if on_cpu else 128)
    parser.add_argument("--block_q", type=int, default=16 if on_cpu else 128)
    parser.add_argument("--block_k", type=int, default=16 if on_cpu else 64)
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--grad_check_max_len", type=int, default=None if on_cpu else 4096,
                        help="check block-sparse gradients against the reference up to this T (default: all on "
                             "CPU, 4096 elsewhere)")
    parser.add_argument("--cudnn", choices=["auto", "on", "off"], default="auto",
                        help="also time jax.nn.dot_product_attention(implementation='cudnn') (auto: on GPU)")
    parser.add_argument("--timings", choices=["auto", "on", "off"], default="auto",
                        help="auto: time on GPU/TPU, correctness only on CPU (interpret-mode timings mean nothing); "
                             "the shared-prefix XLA paths are timed on CPU too unless off")
    parser.add_argument("--cache_lens", type=int_list, default=[64, 100] if on_cpu else [1024, 4096, 16384],
                        help="tree-attention cache lengths")
    parser.add_argument("--tree_sizes", type=int_list, default=[1, 8] if on_cpu else [1, 16, 64],
                        help="tree-attention node counts K")
    parser.add_argument("--tree_batch", type=int, default=2 if on_cpu else 8)
    parser.add_argument("--tree_heads", type=int, default=4 if on_cpu else 32)
    parser.add_argument("--prefix_batches", type=int_list, default=[8, 32],
                        help="shared-prefix batch sizes B (rows sharing one prefix)")
    parser.add_argument("--prefix_len", type=int, default=2048, help="shared-prefix length P")
    parser.add_argument("--suffix_len", type=int, default=64, help="per-row suffix (committed cache) length")
    parser.add_argument("--prefix_tree_sizes", type=int_list, default=[1],
                        help="shared-prefix node counts K (K > 1: a random tree)")
    parser.add_argument("--prefix_heads", type=int, default=9, help="shared-prefix query heads (SmolLM2-135M: 9)")
    parser.add_argument("--prefix_kv_heads", type=int, default=3, help="shared-prefix KV heads (SmolLM2-135M: 3)")
    parser.add_argument("--prefix_head_dim", type=int, default=64, help="shared-prefix head dim (SmolLM2-135M: 64)")
    parser.add_argument("--prefix_dtype", choices=["float32", "bfloat16"], default="float32" if on_cpu else "bfloat16",
                        help="shared-prefix dtype (default: float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def max_abs_error(a, b):
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in leaves)


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def random_block_mask(rng, heads, t, block_q, block_k, density, causal):
    """Three-state mask keeping `density` of the allowed tiles (diagonal tiles always kept)."""
    nq, nk = -(-t // block_q), -(-t // block_k)
    keep = rng.random((heads, nq, nk)) < density
    qi, kj = np.arange(nq)[:, None], np.arange(nk)[None, :]
    keep |= (kj * block_k <= (qi + 1) * block_q - 1) & ((kj + 1) * block_k - 1 >= qi * block_q)
    mask = three_state_block_mask(jnp.asarray(keep), causal=causal, block_q=block_q, block_k=block_k,
                                q_len=t, k_len=t)
    # Allowed tiles: all, or under causal those with a key at or before the tile's last query.
    allowed = kj * block_k <= np.minimum((qi + 1) * block_q, t) - 1 if causal else np.ones((nq, nk), bool)
    kept = float(np.count_nonzero(np.asarray(mask))) / (heads * allowed.sum())
    return mask, kept


def dense_attention(implementation, causal):
    """jax.nn.dot_product_attention over [B, H, T, D] arrays (it takes [B, T, H, D])."""
    def attend(q, k, v):
        out = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                           v.transpose(0, 2, 1, 3), is_causal=causal,
                                           implementation=implementation)
        return out.transpose(0, 2, 1, 3)

    return jax.jit(attend)


def block_sparse_rows(args, timing, dtype):
    rng = np.random.default_rng(args.seed)
    causal_flags = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    cudnn = {"auto": jax.default_backend() == "gpu", "on": True, "off": False}[args.cudnn]
    headers = headers_block_sparse(args, timing, cudnn)
    rows = []
    for t in args.seq_lens:
        inputs = attempt(f"block_sparse T={t}: inputs", lambda t: tuple(
            jnp.asarray(rng.standard_normal((b, n, t, d)), dtype) for n in (h, hkv, hkv)), t)
        for causal in causal_flags:
            if inputs is FAILED:
                rows += [[t, causal, "-"] + [FAILED] * (len(headers) - 3) for _ in args.densities]
                continue
            rows += block_sparse_densities(args, rng, timing, cudnn, t, causal, *inputs)
    return headers, rows


def block_sparse_densities(args, rng, timing, cudnn, t, causal, q, k, v):
    """The rows of one (T, causal): one jitted function each, the mask an argument, so densities share a
    compile; the dense attention is timed once (it does not depend on the density)."""
    b, h = q.shape[:2]
    kw = dict(causal=causal, block_q=args.block_q, block_k=args.block_k)

    def loss(attention, q, k, v, m):
        return jnp.sum(attention(q, k, v, m, **kw).astype(jnp.float32))

    kernel = jax.jit(functools.partial(block_sparse_attention, implementation="pallas", **kw))
    reference = jax.jit(functools.partial(block_sparse_attention_reference, **kw))
    pallas = functools.partial(block_sparse_attention, implementation="pallas")
    grads = jax.jit(jax.grad(functools.partial(loss, pallas), argnums=(0, 1, 2)))
    grads_ref = jax.jit(jax.grad(functools.partial(loss, block_sparse_attention_reference), argnums=(0, 1, 2)))
    dense, dense_cudnn = dense_attention("xla", causal), dense_attention("cudnn", causal)
    run_reference = b * h * t * t <= _MAX_REFERENCE_ELEMENTS
    check_grads = run_reference and (args.grad_check_max_len is None or t <= args.grad_check_max_len)

    def ms(fn, *inputs):
        return median_ms(fn, *inputs, warmup=args.warmup, iters=args.iters)

    def error_of(fn, ref, *inputs):
        return max_abs_error(fn(*inputs), ref(*inputs))

    here = f"block_sparse T={t} causal={causal}"
    t_dense = t_cudnn = None
    if timing:
        t_dense = attempt(f"{here}: dense XLA timing", ms, dense, q, k, v)
        t_cudnn = attempt(f"{here}: dense cuDNN timing", ms, dense_cudnn, q, k, v) if cudnn else None
    rows = []
    for density in args.densities:
        where = f"{here} density={density}"
        mask, kept = random_block_mask(rng, h, t, args.block_q, args.block_k, density, causal)
        out = attempt(f"{where}: kernel", lambda *a: jax.block_until_ready(kernel(*a)), q, k, v, mask)
        ok = out is not FAILED
        error = attempt(f"{where}: vs reference", error_of, kernel, reference, q, k, v, mask) \
            if run_reference and ok else None
        grad_error = attempt(f"{where}: gradients vs reference", error_of, grads, grads_ref, q, k, v, mask) \
            if check_grads and ok else None
        row = [t, causal, f"{kept:.2f}", cell(error if ok else FAILED, ".1e"), cell(grad_error, ".1e")]
        if timing:
            t_kernel = attempt(f"{where}: kernel timing", ms, kernel, q, k, v, mask) if ok else FAILED
            t_ref = attempt(f"{where}: reference timing", ms, reference, q, k, v, mask) if run_reference else None
            row += [cell(t_kernel, ".3f"), cell(t_dense, ".3f")] + ([cell(t_cudnn, ".3f")] if cudnn else [])
            row += [cell(t_ref, ".3f"), ratio(t_dense, t_kernel)] + ([ratio(t_cudnn, t_kernel)] if cudnn else [])
            row.append(ratio(t_ref, t_kernel))
            if args.backward:
                row += [cell(attempt(f"{where}: kernel fwd+bwd timing", backward_ms, kernel, q, k, v, mask, args),
                             ".3f"),
                        cell(attempt(f"{where}: dense fwd+bwd timing", backward_ms,
                                     lambda q, k, v, m: dense(q, k, v), q, k, v, mask, args), ".3f")]
        rows.append(row)
    return rows


def headers_block_sparse(args, timing, cudnn):
    headers = ["T", "causal", "kept tiles", "max err vs ref", "max grad err vs ref"]
    if timing:
        headers += ["kernel ms", "dense XLA ms"] + (["dense cuDNN ms"] if cudnn else []) + ["masked ref ms",
                                                                                          "vs dense XLA"]
        headers += (["vs cuDNN"] if cudnn else []) + ["vs ref"]
        if args.backward:
            headers += ["kernel fwd+bwd ms", "dense fwd+bwd ms"]
    return headers


def backward_ms(fn, q, k, v, mask, args):
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32)), argnums=(0, 1, 2)))
    return median_ms(step, q, k, v, warmup=args.warmup, iters=args.iters)


def normal_sampler(rng, dtype):
    """`normal(*shape)`: standard-normal operands in `dtype`, drawn from `rng`."""
    return lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)


def random_tree_mask(rng, k):
    """[K, K] ancestor mask of a random tree (node i's parent drawn from -1 .. i-1)."""
    parents = [-1] + [int(rng.integers(-1, i)) for i in range(1, k)]
    mask = np.eye(k, dtype=bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return jnp.asarray(mask)


def tree_rows(args, timing, dtype):
    rng = np.random.default_rng(args.seed + 1)
    b, h, hkv, d = args.tree_batch, args.tree_heads, args.kv_heads, args.head_dim
    kernel = jax.jit(functools.partial(tree_attention, implementation="pallas"))
    reference = jax.jit(tree_attention_reference)
    streaming = jax.jit(functools.partial(tree_attention, implementation="xla"))

    def ms(fn, *inputs):
        return median_ms(fn, *inputs, warmup=args.warmup, iters=args.iters)

    def error_of(*inputs):
        return max_abs_error(kernel(*inputs), reference(*inputs))

    normal = normal_sampler(rng, dtype)
    rows = []
    for cache_len in args.cache_lens:
        for k in args.tree_sizes:
            where = f"tree L={cache_len} K={k}"
            q, k_tree, v_tree = normal(b, h, k, d), normal(b, hkv, k, d), normal(b, hkv, k, d)
            k_cache, v_cache = normal(b, hkv, cache_len, d), normal(b, hkv, cache_len, d)
            lengths = jnp.asarray(rng.integers(cache_len // 2, cache_len + 1, size=b), jnp.int32)
            inputs = (q, k_cache, v_cache, lengths, k_tree, v_tree, random_tree_mask(rng, k))
            error = attempt(f"{where}: kernel vs reference", error_of, *inputs)
            row = [cache_len, k, cell(error, ".1e")]
            if timing:
                t_kernel = attempt(f"{where}: kernel timing", ms, kernel, *inputs) if error is not FAILED else FAILED
                t_ref = attempt(f"{where}: reference timing", ms, reference, *inputs)
                t_xla = attempt(f"{where}: 'xla' timing", ms, streaming, *inputs)
                row += [cell(t_kernel, ".3f"), cell(t_ref, ".3f"), cell(t_xla, ".3f"), ratio(t_ref, t_kernel),
                        ratio(t_xla, t_kernel)]
            rows.append(row)
    headers = ["L", "K", "max err vs ref"]
    if timing:
        headers += ["kernel ms", "XLA ref ms", "'xla' impl ms", "vs ref", "vs 'xla' impl"]
    return headers, rows


def shared_prefix_rows(args, timing, kernel_timing):
    """One row per (B, K): replicated-prefix tree attention against shared_prefix_attention, both "xla" (timed
    when `timing`), and the Pallas prefix kernel (checked always, interpret mode on CPU; timed when
    `kernel_timing`). Errors are against the replicated side; KV MB is what each side reads of keys and values."""
    rng = np.random.default_rng(args.seed + 2)
    h, hkv, d = args.prefix_heads, args.prefix_kv_heads, args.prefix_head_dim
    size, suffix = args.prefix_len, args.suffix_len
    dtype = jnp.dtype(args.prefix_dtype)
    replicated = jax.jit(functools.partial(tree_attention, implementation="xla"))
    shared = jax.jit(functools.partial(shared_prefix_attention, implementation="xla"))
    kernel = jax.jit(functools.partial(shared_prefix_attention, implementation="pallas"))
    reference = jax.jit(shared_prefix_attention_reference)

    def ms(fn, *inputs):
        return median_ms(fn, *inputs, warmup=args.warmup, iters=args.iters)

    def error_of(fn, inputs, want):
        return max_abs_error(fn(*inputs), want)

    normal = normal_sampler(rng, dtype)
    rows = []
    for b in args.prefix_batches:
        for k in args.prefix_tree_sizes:
            where = f"shared_prefix B={b} K={k}"
            q, k_tree, v_tree = normal(b, h, k, d), normal(b, hkv, k, d), normal(b, hkv, k, d)
            k_prefix, v_prefix = normal(hkv, size, d), normal(hkv, size, d)
            k_cache, v_cache = normal(b, hkv, suffix, d), normal(b, hkv, suffix, d)
            prefix_len, lengths = jnp.int32(size), jnp.full((b,), suffix, jnp.int32)
            tree_mask = random_tree_mask(rng, k)
            inputs = (q, k_prefix, v_prefix, prefix_len, k_cache, v_cache, lengths, k_tree, v_tree, tree_mask)
            # What a batch without prefix sharing holds: each row's own copy of the prefix in front of its suffix.
            k_cat, v_cat, lengths_cat = jax.jit(concat_prefix)(k_prefix, v_prefix, prefix_len, k_cache, v_cache,
                                                               lengths)
            plain = (q, k_cat, v_cat, lengths_cat, k_tree, v_tree, tree_mask)
            want = attempt(f"{where}: replicated", replicated, *plain)
            errors = [None] * 3 if want is FAILED else [
                attempt(f"{where}: {name} vs replicated", error_of, fn, inputs, want)
                for name, fn in (("reference", reference), ("'xla'", shared), ("kernel", kernel))]
            itemsize = jnp.dtype(dtype).itemsize
            mb_replicated = 2 * b * hkv * (size + suffix) * d * itemsize / 2**20
            mb_shared = 2 * hkv * (size + b * suffix) * d * itemsize / 2**20
            row = [b, size, suffix, k] + [cell(e, ".1e") for e in errors]
            row += [f"{mb_replicated:.3g}", f"{mb_shared:.3g}"]
            if timing:
                t_replicated = attempt(f"{where}: replicated timing", ms, replicated, *plain)
                t_shared = attempt(f"{where}: 'xla' timing", ms, shared, *inputs)
                row += [cell(t_replicated, ".3f"), cell(t_shared, ".3f"), ratio(t_replicated, t_shared)]
                if kernel_timing:
                    t_kernel = attempt(f"{where}: kernel timing", ms, kernel, *inputs) \
                        if errors[2] is not FAILED else FAILED
                    row += [cell(t_kernel, ".3f"), ratio(t_replicated, t_kernel)]
            rows.append(row)
    headers = ["B", "P", "suffix", "K", "ref err", "'xla' err", "kernel err", "replicated KV MB", "shared KV MB"]
    if timing:
        headers += ["replicated ms", "shared 'xla' ms", "replicated / shared"]
        if kernel_timing:
            headers += ["kernel ms", "replicated / kernel"]
    return headers, rows


def main():
    args = parse_args()
    device = jax.devices()[0]
    timing = {"auto": jax.default_backend() != "cpu", "on": True, "off": False}[args.timings]
    dtype = jnp.bfloat16 if timing else jnp.float32
    ops = [op for op in args.ops.split(",") if op]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"--ops: unknown op(s) {unknown}; allowed: {', '.join(OPS)}")
    mode = "timings (median ms)" if timing else "interpret-mode correctness only (no timings on CPU)"
    if not timing and "shared_prefix" in ops and args.timings != "off":
        mode += "; the shared-prefix XLA paths are timed"
    print(f"Device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{jnp.dtype(dtype).name}; {mode}\n")
    if "block_sparse" in ops:
        table = markdown_table(*block_sparse_rows(args, timing, dtype))
        print(f"\n### Block-sparse attention (B={args.batch}, H={args.heads}, Hkv={args.kv_heads}, "
              f"D={args.head_dim}, block {args.block_q}x{args.block_k}; dense = jax.nn.dot_product_attention)\n")
        print(table + "\n", flush=True)
    if "tree" in ops:
        table = markdown_table(*tree_rows(args, timing, dtype))
        print(f"\n### Tree attention (B={args.tree_batch}, H={args.tree_heads}, Hkv={args.kv_heads}, "
              f"D={args.head_dim}, lengths uniform in [L/2, L], random trees; 'xla' impl = "
              f"tree_attention(implementation='xla'))\n")
        print(table + "\n", flush=True)
    if "shared_prefix" in ops:
        prefix_timing = args.timings != "off"
        table = markdown_table(*shared_prefix_rows(args, prefix_timing, timing))
        print(f"\n### Shared-prefix attention (Hydragen) (H={args.prefix_heads}, Hkv={args.prefix_kv_heads}, "
              f"D={args.prefix_head_dim}, {args.prefix_dtype}; replicated = tree_attention(implementation='xla') "
              f"over each row's [prefix | suffix] cache; shared = shared_prefix_attention(implementation='xla'); "
              f"errors: max abs vs replicated)\n")
        print(table + "\n", flush=True)
    if failures:
        print(f"{len(failures)} measurement(s) failed: " + "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
