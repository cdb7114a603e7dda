"""Results as tables and files: one row per (run, method), results.csv and results.md, and the Markdown tables
that the launch scripts and benchmarks print."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence

RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"


def _cell(value):
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return value


def result_rows(results: Sequence[Mapping]) -> list[dict]:
    """One row per (run, method), or one per run without an evaluation: overrides, training and decoding
    figures, status and error."""
    rows = []
    for r in results:
        base = {"run": r["name"], "status": r["status"]}
        base.update({k: _cell(v) for k, v in r["overrides"].items()})
        train = r.get("train") or {}
        for key, column in (("num_params", "num_params"), ("loss", "train_loss"),
                            ("tokens_per_s", "train_tokens_per_s"), ("train_seconds", "train_seconds")):
            if key in train:
                base[column] = train[key]
        base.update({k: v for k, v in train.items() if k.startswith("val_")})
        evaluation = r.get("eval") or {}
        if "temperature" in evaluation.get("settings", {}):
            base["temperature"] = evaluation["settings"]["temperature"]
        if r.get("error"):
            base["error"] = r["error"]
        methods = evaluation.get("methods") or [None]
        for m in methods:
            row = dict(base)
            if m is not None:
                row.update(method=m["name"], decode=m["method"], tree=m["tree"], tree_nodes=m["tree_nodes"],
                           tau=m["tau"], tokens_per_s=m["tokens_per_s"], speedup=m["speedup"],
                           identical=m["identical"], lossless=m.get("lossless"))
            rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping]) -> list[str]:
    """Every key of the rows, in a fixed order: identity, overrides, decoding, training, errors."""
    first = ["run", "status"]
    decoding = ["method", "decode", "tree", "tree_nodes", "temperature", "tau", "tokens_per_s", "speedup",
                "identical", "lossless"]
    training = ["num_params", "train_loss", "val_loss", "val_bpb", "train_tokens_per_s", "train_seconds"]
    seen = list(dict.fromkeys(k for row in rows for k in row))
    fixed = set(first + decoding + training + ["error"])
    others = [k for k in seen if k not in fixed and not k.startswith("val_")]
    extra_val = [k for k in seen if k.startswith("val_") and k not in training]
    ordered = first + others + decoding + training + extra_val + ["error"]
    return [k for k in ordered if k in seen]


def write_csv(rows: Sequence[Mapping], path: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)


_FORMATS = {"tau": "{:.2f}", "tokens_per_s": "{:.1f}", "speedup": "{:.2f}x", "train_tokens_per_s": "{:.0f}",
            "train_seconds": "{:.0f}", "num_params": "{:,}"}
_ALIGN = {"run": "---", "status": "---", "category": "---", "method": "---", "tree": "---", "error": "---",
          "identical": ":---:", "lossless": ":---:"}
_HEADERS = {"tokens_per_s": "tokens/s", "identical": "identical to AR", "num_params": "params",
            "train_tokens_per_s": "train tok/s", "train_seconds": "train s"}


def _format(column: str, value, row: Mapping) -> str:
    if value is None or value == "":
        return ""
    if column == "identical":  # only greedy decoding is expected to reproduce the baseline
        return "yes" if value else ("no" if not row.get("temperature") else "- (sampled)")
    if column == "lossless":  # the method's claim, from its spec (typical acceptance, lossy modes: no)
        return "yes" if value else "no"
    if column in _FORMATS and isinstance(value, int | float) and not isinstance(value, bool):
        return _FORMATS[column].format(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of `rows` (default columns: all but the per-stream figures and the decode kind)."""
    if columns is None:
        # Left to the CSV: the decode kind and tree size (the method and tree say them), per-stream figures,
        # and whole sections set by an override (JSON objects).
        hidden = {"decode", "tree_nodes"} | {c for row in rows for c, v in row.items()
                                             if isinstance(v, str) and v.startswith("{")}
        columns = [c for c in _columns(rows) if c not in hidden and not (c.startswith("val_") and
                                                                         c not in ("val_loss", "val_bpb"))]
    lines = ["| " + " | ".join(_HEADERS.get(c, c) for c in columns) + " |",
             "|" + "|".join(_ALIGN.get(c, "---:") for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format(c, row.get(c), row) for c in columns) + " |")
    return "\n".join(lines)


def method_table(rows: Sequence[Mapping]) -> str:
    """The comparison of one run's decoding methods: method, tree, tau, tokens/s, speedup, identical."""
    return markdown_table([r for r in rows if r.get("method")],
                          ["method", "tree", "tau", "tokens_per_s", "speedup", "identical", "lossless"])


def write_tables(rows: Sequence[Mapping], workdir: str) -> tuple[str, str]:
    csv_path, md_path = os.path.join(workdir, RESULTS_CSV), os.path.join(workdir, RESULTS_MD)
    write_csv(rows, csv_path)
    with open(md_path, "w") as fh:
        fh.write(markdown_table(rows) + "\n")
    return csv_path, md_path
