"""Side-by-side comparison of decoding methods on the same prompts, in one process.

Every prompt is padded to one width, so each method compiles once for the whole prompt set (compile time is
reported apart from decode time). Prompts run in batches of `batch_size` (1: one request at a time, as
Spec-Bench measures); the speedup is the method's tokens/s over autoregressive decoding's on the same prompts,
in the same process (for identical output: the autoregressive wall time over the method's). At temperature 0 the
autoregressive output is also the reference for the identical-output check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jaxspec.decoding import api, engine
from jaxspec.decoding import methods as registry
from jaxspec.decoding.method import Method
from jaxspec.errors import InputError
from jaxspec.eval.quality import agreement_with


@dataclasses.dataclass
class MethodResult:
    name: str
    method: str
    tau: float  # mean tokens committed per target forward
    tokens_per_s: float
    speedup: float  # tokens/s over autoregressive decoding's on the same prompts (lossless, greedy: its wall time
    # over this method's; a lossy mode's output may end sooner or later, so wall time alone would misstate it)
    identical: bool  # same tokens as the autoregressive baseline on every prompt
    agreement: float  # mean share of the baseline's tokens matched before the first difference (1: identical)
    lossless: bool  # the method's claim (its spec): output distribution equals the target's
    new_tokens: int
    wall_time_s: float
    compile_s: float = 0.0
    category: str = "all"

    def row(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _PromptRun:
    tokens: list[int]
    target_steps: int
    accepted: int
    wall_time_s: float  # the batch's wall time, shared out by the batch's new tokens


def _run_batches(model, params, prompts, kwargs, batch_size, width, repeats, options) -> tuple[list[_PromptRun], float]:
    runs, compile_s = [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        best = None
        for _ in range(repeats):
            out = api.generate(model, params, batch, prompt_width=width, **options, **kwargs)
            compile_s += out.compile_s
            best = out if best is None or out.wall_time_s < best.wall_time_s else best
        total = max(int(best.new_tokens.sum()), 1)
        for i, toks in enumerate(best.tokens):
            runs.append(_PromptRun(toks, int(best.target_steps[i]), int(best.accepted[i]),
                                   best.wall_time_s * len(toks) / total))
    return runs, compile_s


def _summarise(name, method, lossless, runs, baseline, compile_s, category) -> MethodResult:
    new = sum(len(r.tokens) for r in runs)
    wall = sum(r.wall_time_s for r in runs)
    base_rate = sum(len(r.tokens) for r in baseline) / max(sum(r.wall_time_s for r in baseline), 1e-9)
    return MethodResult(name=name, method=method,
                        tau=sum(r.accepted for r in runs) / max(sum(r.target_steps for r in runs), 1),
                        tokens_per_s=new / max(wall, 1e-9), speedup=new / max(wall, 1e-9) / max(base_rate, 1e-9),
                        identical=all(r.tokens == b.tokens for r, b in zip(runs, baseline, strict=True)),
                        agreement=sum(agreement_with(r.tokens, b.tokens) for r, b in zip(runs, baseline))
                        / max(len(runs), 1),
                        lossless=lossless,
                        new_tokens=new, wall_time_s=wall, compile_s=compile_s, category=category)


def compare_methods(model, params, prompts: list[list[int]], methods: dict[str, Method], *, max_new_tokens: int,
                    temperature: float = 0.0, eos_ids=None, seed: int = 0, repeats: int = 1,
                    batch_size: int | None = None, categories: Sequence[str] | None = None,
                    target_workdir: str | None = None, on_method: Callable[[str], None] | None = None
                    ) -> list[MethodResult]:
    """Run autoregressive decoding ("ar") and every method of `methods` (name -> spec) on `prompts` and
    measure them. `target_workdir` lets trained drafters check they were trained for this target.

    Returns one result per method over all prompts ("all"), then, when `categories` (one per prompt) is
    given, one per (method, category). Wall time per batch is the best of `repeats` calls.
    """
    if categories is not None and len(categories) != len(prompts):
        raise InputError(f"categories has {len(categories)} entries for {len(prompts)} prompts")
    batch_size = batch_size or len(prompts)
    every = {"ar": registry.make("ar"), **methods}
    nodes = max(spec.num_nodes for spec in every.values())
    width, _ = engine.plan_shapes(model.model_cfg, [max(len(p) for p in prompts)], max_new_tokens, nodes)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=eos_ids, seed=seed,
                   target_workdir=target_workdir)
    measured = {}
    for name, spec in every.items():
        if on_method is not None:
            on_method(name)
        measured[name] = (spec.name,) + _run_batches(model, params, prompts, dict(method=spec), batch_size, width,
                                                     repeats, options)
    baseline = measured["ar"][1]
    groups = [("all", list(range(len(prompts))))]
    if categories is not None:
        groups += [(c, [i for i, pc in enumerate(categories) if pc == c]) for c in dict.fromkeys(categories)]
    results = []
    for category, index in groups:
        for name, (method, runs, compile_s) in measured.items():
            results.append(_summarise(name, method, every[name].lossless, [runs[i] for i in index],
                                      [baseline[i] for i in index], compile_s if category == "all" else 0.0,
                                      category))
    return results


def markdown_table(results: list[MethodResult]) -> str:
    """One row per result; with a lossy method among them, also each one's agreement with AR."""
    by_category = len({r.category for r in results}) > 1
    lossy = not all(r.lossless for r in results)
    head = "| category " if by_category else ""
    lines = [head + "| method | tau | tokens/s | speedup | identical to AR | lossless |" + (" agreement |" if lossy
                                                                                     else ""),
             ("|---" if by_category else "") + "|---|---:|---:|---:|:---:|:---:|" + ("---:|" if lossy else "")]
    for r in results:
        cell = f"| {r.category} " if by_category else ""
        lines.append(f"{cell}| {r.name} | {r.tau:.2f} | {r.tokens_per_s:.1f} | {r.speedup:.2f}x | "
                     f"{'yes' if r.identical else 'no'} | {'yes' if r.lossless else 'no'} |"
                     + (f" {r.agreement:.3f} |" if lossy else ""))
    return "\n".join(lines)
