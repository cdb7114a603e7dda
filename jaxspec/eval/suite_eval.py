"""Decode the offline prompt suite with a model and every configured method; write tables and plots.

    config = configs.quickstart.get_config()         # model, suite, decode settings, methods
    report = evaluate_suite(config, workdir)          # results.json, results.md, results.csv, *.png

Each prompt is rendered through the checkpoint's chat template (its plain "User: ... Assistant:" form for
a tokenizer without one) and decoded by autoregressive decoding and by every method on the same prompts,
one compiled loop per method (see `compare.compare_methods`). Rows come per category and over all prompts:
tau, tokens/s, speedup over autoregressive decoding, and whether the output is identical to it.

`decode.scan_layers` runs the target's repeated layers as one scan (`model.scan_layers`, models/layer_scan.py):
the same tokens, each loop compiled ~2.5-4x faster, each step about as fast (docs/benchmarks.md, "Scanned
layers").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import ml_collections

from jaxspec.config import ConfigError, check_keys
from jaxspec.decoding import api, methods
from jaxspec.eval import compare, plots, tables
from jaxspec.eval.suite import CATEGORIES, load_suite
from jaxspec.models.lm import reconfigured

RESULTS_JSON = "results.json"
SPEEDUP_BY_CATEGORY = "speedup_by_category.png"


def suite_eval_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        target="smollm2-135m-instruct",  # a zoo name or a workdir
        suite=dict(categories=(), per_category=3),  # () = all categories
        decode=dict(max_new_tokens=64, temperature=0.0, stop_at_eos=True, batch_size=1, repeats=1, seed=0,
                    scan_layers=False),  # scan_layers: see the module docstring
        methods={},  # name -> {method: a registered name, and that method's fields (jaxspec/decoding/methods/)}
    ))


def method_specs(config) -> dict:
    """name -> the validated spec of each configured method (errors name config.methods.<name>)."""
    specs = {}
    for name, entry in config.methods.items():
        fields = dict(entry)
        method = fields.pop("method", None)
        if method is None or method == "ar":
            raise ConfigError(f"config.methods.{name}.method={method!r} is not allowed: one of "
                              f"{[m for m in methods.names() if m != 'ar']} (autoregressive decoding always runs)")
        try:
            specs[name] = methods.make(method, **fields)
        except ValueError as err:
            raise ConfigError(f"config.methods.{name}: {err}") from err
    return specs


def validate(config) -> None:
    template = suite_eval_defaults()
    check_keys({k: v for k, v in config.items() if k != "methods"}, template, "config")  # methods: below
    method_specs(config)
    unknown = [c for c in config.suite.categories if c not in CATEGORIES]
    if unknown:
        raise ConfigError(f"config.suite.categories={tuple(config.suite.categories)} is not allowed: names from "
                          f"{CATEGORIES} (empty = all)")
    d = config.decode
    for key in ("max_new_tokens", "batch_size", "repeats"):
        if not isinstance(d[key], int) or d[key] <= 0:
            raise ConfigError(f"config.decode.{key}={d[key]!r} is not allowed: a positive integer")
    if not isinstance(d.scan_layers, bool):
        raise ConfigError(f"config.decode.scan_layers={d.scan_layers!r} is not allowed: True or False")


def encode_suite(tokenizer, prompts) -> list[list[int]]:
    if tokenizer.chat_template is not None:
        return [tokenizer.encode_chat(list(p.messages), add_generation_prompt=True) for p in prompts]
    return [tokenizer.encode_prompt(p.as_plain_prompt()) for p in prompts]


def evaluate_suite(config, workdir: str, on_method: Callable[[str], None] | None = None) -> dict:
    """Run the suite evaluation of `config` and write its results into `workdir`; returns the report."""
    validate(config)
    start = time.perf_counter()
    target = api.load(config.target)
    load_s = time.perf_counter() - start
    prompts = load_suite(tuple(config.suite.categories) or None, config.suite.per_category)
    tokens = encode_suite(target.tokenizer, prompts)
    specs = method_specs(config)
    d = config.decode
    model = reconfigured(target.model, scan_layers=True) if d.scan_layers else target.model
    results = compare.compare_methods(
        model, target.params, tokens, specs, target_workdir=target.workdir,
        max_new_tokens=d.max_new_tokens, temperature=d.temperature,
        eos_ids=target.tokenizer.eos_ids if d.stop_at_eos else None, seed=d.seed, repeats=d.repeats,
        batch_size=d.batch_size, categories=[p.category for p in prompts], on_method=on_method)
    rows = [dict(r.row(), run=r.category, status="ok",
                 tree=specs[r.name].tree_spec if r.name in specs else "") for r in results]
    report = dict(model=config.target, workdir=target.workdir, prompts=len(prompts),
                  prompt_tokens=sum(map(len, tokens)), load_seconds=load_s,
                  seconds=time.perf_counter() - start, settings=config.to_dict(), rows=rows)
    write_report(report, workdir)
    return report


def write_report(report: dict, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RESULTS_JSON), "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    rows = report["rows"]
    columns = ["category", "name", "method", "tree", "tau", "tokens_per_s", "speedup", "identical", "lossless",
               "compile_s"]
    tables.write_csv([{c: r.get(c) for c in columns} for r in rows], os.path.join(workdir, tables.RESULTS_CSV))
    with open(os.path.join(workdir, tables.RESULTS_MD), "w") as fh:
        fh.write(table(rows) + "\n")
    plots.speedup_vs_tau([r for r in rows if r["category"] != "all"], os.path.join(workdir, plots.SPEEDUP_VS_TAU))
    spec = dict(plots.plot_defaults(), x="category", y="speedup", group="name",
                title=f"{report['model']}: speedup over autoregressive decoding by category")
    plots.declared_plot([r for r in rows if r["category"] != "all"], spec,
                        os.path.join(workdir, SPEEDUP_BY_CATEGORY))


def table(rows) -> str:
    """Markdown: one row per (category, method), the "all" rows last."""
    ordered = [r for r in rows if r["category"] != "all"] + [r for r in rows if r["category"] == "all"]
    return tables.markdown_table(ordered, ["category", "name", "tree", "tau", "tokens_per_s", "speedup",
                                           "identical", "lossless"])
