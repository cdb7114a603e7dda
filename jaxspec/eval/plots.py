"""Figures of a sweep's results, drawn off-screen (a bare matplotlib Figure: no display, no pyplot state).

Built in, written when the results hold what they show:
  speedup_vs_tau.png             every evaluated method of every run: speedup over AR against tau
  matformer_loss_vs_params.png   held-out loss of each MatFormer granularity against its parameter count

A sweep declares more in its base config, one line per value of `group` over result columns (see
``tables.result_rows``)::

    config.plots = [dict(x="temperature", y="speedup", group="method"),
                    dict(x="num_heads", y="tau", group="method", title="Medusa heads", file="heads.png")]
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure

from jaxspec.config import ConfigError

SPEEDUP_VS_TAU = "speedup_vs_tau.png"
MATFORMER_LOSS_VS_PARAMS = "matformer_loss_vs_params.png"


def plot_defaults() -> dict:
    return dict(x="", y="", group="", title="", file="", logx=False)


def validate_plot_specs(specs: Sequence) -> list[dict]:
    """The declared plots with defaults filled in; raises ConfigError naming `plots[i].key`."""
    if isinstance(specs, str | Mapping) or not isinstance(specs, Sequence):
        raise ConfigError(f"config.plots={specs!r} is not allowed: a list of dicts with keys "
                          f"{sorted(plot_defaults())}")
    out = []
    for i, spec in enumerate(specs):
        spec = spec.to_dict() if hasattr(spec, "to_dict") else spec
        if not isinstance(spec, Mapping):
            raise ConfigError(f"config.plots[{i}]={spec!r} is not allowed: a dict with keys "
                              f"{sorted(plot_defaults())}")
        unknown = sorted(set(spec) - set(plot_defaults()))
        if unknown:
            raise ConfigError(f"unknown config key plots[{i}].{unknown[0]}; "
                              f"allowed: {sorted(plot_defaults())}")
        full = {**plot_defaults(), **spec}
        for key in ("x", "y"):
            if not isinstance(full[key], str) or not full[key]:
                raise ConfigError(f"config.plots[{i}].{key}={full[key]!r} is not allowed: "
                                  "a result column name")
        for key in ("group", "title", "file"):
            if not isinstance(full[key], str):
                raise ConfigError(f"config.plots[{i}].{key}={full[key]!r} is not allowed: a string")
        if full["file"] and not full["file"].endswith(".png"):
            raise ConfigError(f"config.plots[{i}].file={full['file']!r} is not allowed: "
                              "a name ending in .png")
        out.append(full)
    return out


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    return fig, fig.add_subplot()


def _save(fig: Figure, ax, path: str) -> str:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _ok(rows: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in rows if r.get("status") == "ok"]


def speedup_vs_tau(rows: Sequence[Mapping], path: str) -> str | None:
    """Scatter of speedup against tau, one colour per configured method name; points labelled by run when several."""
    points = [r for r in _ok(rows) if r.get("method") not in (None, "", "ar") and r.get("tau") is not None]
    if not points:
        return None
    fig, ax = _figure()
    several_runs = len({r["run"] for r in points}) > 1
    label = lambda r: r.get("name") or r["method"]  # the configured name tells two runs of one method apart
    for name in dict.fromkeys(map(label, points)):
        mine = [r for r in points if label(r) == name]
        ax.scatter([r["tau"] for r in mine], [r["speedup"] for r in mine], label=name, s=36)
        if several_runs:
            for r in mine:
                ax.annotate(r["run"], (r["tau"], r["speedup"]), fontsize=6, alpha=0.7,
                            xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="autoregressive")
    ax.set_xlabel("tau (tokens committed per target forward)")
    ax.set_ylabel("speedup over autoregressive (wall clock)")
    ax.set_title("Speculative decoding: speedup vs tau")
    return _save(fig, ax, path)


def matformer_loss_vs_params(results: Sequence[Mapping], path: str) -> str | None:
    """Held-out loss against parameters of each MatFormer granularity, one line per run."""
    series = [(r["name"], r["train"]["granularities"]) for r in results
              if r.get("status") == "ok" and (r.get("train") or {}).get("granularities")]
    if not series:
        return None
    fig, ax = _figure()
    for name, points in series:
        xs, ys = [p["params"] for p in points], [p["val_loss"] for p in points]
        ax.plot(xs, ys, marker="o", label=name)
        for p in points:
            ax.annotate(f"{p['fraction']:g}", (p["params"], p["val_loss"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("parameters of the sub-model")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.set_title("MatFormer granularities (label: FFN fraction)")
    return _save(fig, ax, path)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _file_name(spec: Mapping) -> str:
    if spec["file"]:
        return spec["file"]
    stem = f"{spec['y']}_vs_{spec['x']}" + (f"_by_{spec['group']}" if spec["group"] else "")
    return re.sub(r"[^A-Za-z0-9._=-]", "_", stem) + ".png"


def declared_plot(rows: Sequence[Mapping], spec: Mapping, path: str) -> str | None:
    """`y` against `x` (numeric, or categories in order of appearance), one line per `group` value."""
    x, y, group = spec["x"], spec["y"], spec["group"]
    points = [r for r in _ok(rows) if r.get(x) not in (None, "") and _is_number(r.get(y))]
    if not points:
        return None
    numeric = all(_is_number(r[x]) for r in points)
    categories = list(dict.fromkeys(str(r[x]) for r in points))
    position = (lambda v: v) if numeric else (lambda v: categories.index(str(v)))
    fig, ax = _figure()
    for value in dict.fromkeys(r.get(group, "") if group else "" for r in points):
        mine = [r for r in points if not group or r.get(group, "") == value]
        mine.sort(key=lambda r: position(r[x]))
        ax.plot([position(r[x]) for r in mine], [r[y] for r in mine], marker="o",
                label=f"{group}={value}" if group else None)
    if not numeric:
        ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=7)
    if spec["logx"] and numeric:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(spec["title"] or f"{y} vs {x}")
    return _save(fig, ax, path)


def write_plots(results: Sequence[Mapping], rows: Sequence[Mapping], workdir: str, specs: Sequence = ()
                ) -> list[str]:
    """Every built-in plot the results support and every declared one; the paths written."""
    written = [speedup_vs_tau(rows, os.path.join(workdir, SPEEDUP_VS_TAU)),
               matformer_loss_vs_params(results, os.path.join(workdir, MATFORMER_LOSS_VS_PARAMS))]
    for spec in validate_plot_specs(specs):
        written.append(declared_plot(rows, spec, os.path.join(workdir, _file_name(spec))))
    return [p for p in written if p]
