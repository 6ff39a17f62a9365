"""Two comparison plots: quantization methods side by side per model (PTQ vs QAT, whitepaper Tables 4-6),
and the gap between the simulated model and the integer model it converts to, on every int8 engine the run
evaluated (Jacob §3: training simulates exactly the arithmetic of integer inference, so the gap should be ~0).

Bars are means over seeds with 95% Student-t intervals when n > 1 (:func:`qat.analysis.stats.t_interval`).
Simulated-only runs (no integer model) appear in the method comparison as their own, marked method
(``"<method> (simulated only)"``, the simulated model's accuracy) and never in the simulated-vs-integer gap.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from qat.analysis.engines import bits_label, engine_rows, host_target_line
from qat.analysis.plots import METRIC_LABELS, SIMULATED_SUFFIX, model_label, new_figure, save_figure
from qat.analysis.records import simulated_column, simulated_mask
from qat.analysis.stats import t_interval


def _metric_unit(df: pd.DataFrame) -> str:
    names = df["metric_name"].dropna().unique().tolist() if "metric_name" in df.columns else []
    return f"{METRIC_LABELS.get(names[0], 'accuracy') if len(names) == 1 else 'accuracy'} (%)"


def method_table(df: pd.DataFrame, value: str = "metric") -> pd.DataFrame:
    """Mean, CI half-width and n of ``value`` per (model, bits) group and method; float runs form their own
    group per model (bits ``float``). Columns: ``group``, ``method``, ``mean``, ``ci95``, ``n``. A simulated-only
    run counts as method ``"<method> (simulated only)"`` with its simulated accuracy (``metric_sim``)."""
    if df.empty or any(c not in df.columns for c in (value, "method")):
        return pd.DataFrame(columns=["group", "method", "mean", "ci95", "n"])
    with_arch = "model.arch" in df.columns and df["model.arch"].nunique() > 1
    simulated = simulated_mask(df)
    sim_value = simulated_column(value)
    values = pd.to_numeric(df[value], errors="coerce").where(~simulated)
    if sim_value is not None and sim_value in df.columns:
        values = values.where(~simulated, pd.to_numeric(df[sim_value], errors="coerce"))
    data = df.assign(
        group=df.apply(lambda r: f"{model_label(r, with_arch=with_arch)} "
                                 f"{'float' if r['method'] == 'float' else bits_label(r)}", axis=1),
        method=df["method"].astype(str).where(~simulated, df["method"].astype(str) + SIMULATED_SUFFIX),
        _value=values,
    )
    rows = []
    for (group, method), part in data.groupby(["group", "method"], sort=True):
        mean, _, half, n = t_interval(part["_value"].to_numpy())
        if n:
            rows.append({"group": group, "method": method, "mean": mean, "ci95": half, "n": n})
    return pd.DataFrame(rows, columns=["group", "method", "mean", "ci95", "n"])


def has_method_comparison(df: pd.DataFrame) -> bool:
    """True when some model and bit setting ran with two or more quantization methods (not float)."""
    table = method_table(df)
    quantized = table[table["method"] != "float"]
    return bool((quantized.groupby("group")["method"].nunique() >= 2).any())


def plot_methods(df: pd.DataFrame, path: str | os.PathLike[str], value: str = "metric") -> list[Path]:
    """Grouped bars: one group per (model, bits), one bar per method (float included for reference)."""
    table = method_table(df, value)
    if table.empty:
        raise ValueError(f"no run with a finite {value!r} and a method to plot")
    groups = list(dict.fromkeys(table["group"]))
    methods = sorted(table["method"].unique(), key=lambda m: (m != "float", m))
    width = 0.8 / len(methods)
    fig, (ax,) = new_figure(max(6.0, 1.1 * len(groups) * max(1, len(methods) / 2)), 4.6)
    for i, method in enumerate(methods):
        part = table[table["method"] == method].set_index("group").reindex(groups)
        xs = np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width
        err = part["ci95"].fillna(0.0).to_numpy(dtype=float)
        ax.bar(xs, part["mean"].to_numpy(dtype=float), width * 0.95, yerr=err, capsize=3, label=method,
               color=f"C{i % 10}")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel(f"{_metric_unit(df)}, mean ± 95% CI")
    ax.set_title("Quantization methods per model (PTQ vs QAT)")
    low = float(np.nanmin(table["mean"] - table["ci95"].fillna(0)))
    high = float(np.nanmax(table["mean"])) + 5.0
    # accuracy and mAP are percentages: intervals of few seeds (t = 12.7 at n = 2) are cut at 100
    ax.set_ylim(max(0.0, low - 5.0), min(100.0, max(high, float(np.nanmax(table["mean"] + table["ci95"].fillna(0))))))
    ax.grid(True, axis="y", alpha=0.4)
    ax.legend(title="method", fontsize=9, title_fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


GAP_COLUMNS = ("config", "configuration", "engine", "primary", "mean", "ci95", "n")


def gap_table(df: pd.DataFrame) -> pd.DataFrame:
    """Integer minus simulated accuracy (points) per configuration of quantized runs and int8 engine with status
    ok (:func:`qat.analysis.engines.engine_rows`); the primary engine's is the record's integer accuracy.

    Columns :data:`GAP_COLUMNS`: ``config`` is ``"<configuration> · <engine>"``; ``mean``, ``ci95`` and ``n`` over
    the runs. Top-1 for classification, COCO mAP for detection. Simulated-only runs have no integer accuracy and
    are left out. Rows by configuration, the primary engine first.
    """
    rows = engine_rows(df)
    rows = rows.assign(gap=rows["int"] - rows["sim"])
    rows = rows[rows["status"].eq("ok") & rows["gap"].notna()]
    table = []
    for (configuration, engine), part in rows.groupby(["configuration", "engine"], sort=True):
        mean, _, half, n = t_interval(part["gap"].to_numpy(dtype=float))
        table.append({"config": f"{configuration} · {engine}", "configuration": configuration, "engine": engine,
                      "primary": bool(part["primary"].any()), "mean": mean, "ci95": half, "n": n})
    frame = pd.DataFrame(table, columns=list(GAP_COLUMNS))
    frame = frame.assign(_other=~frame["primary"].astype(bool)).sort_values(["configuration", "_other", "engine"])
    return frame.drop(columns="_other").reset_index(drop=True)


def _engine_order(table: pd.DataFrame) -> list[str]:
    """Engines of the gap table: those that are some configuration's primary first, then the rest, by name."""
    primary = set(table.loc[table["primary"], "engine"])
    return sorted(table["engine"].unique(), key=lambda e: (e not in primary, e))


def _draw_gaps(ax, table: pd.DataFrame, groups: list[str], engines: list[str]) -> None:  # type: ignore[no-untyped-def]
    """One horizontal bar per (configuration, engine), the engines of a configuration side by side."""
    height = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        part = table[table["engine"] == engine]
        ys = np.array([groups.index(c) for c in part["configuration"]]) + (i - (len(engines) - 1) / 2) * height
        means = part["mean"].to_numpy(dtype=float)
        ci = part["ci95"].to_numpy(dtype=float)  # NaN (n = 1): no error bar
        err = np.nan_to_num(ci)
        primary = " (primary)" if part["primary"].all() else ""
        ax.barh(ys, means, height * 0.92, xerr=ci if (err > 0).any() else None, capsize=3, color=f"C{i % 10}",
                label=engine + primary)
        for y, mean, half, n in zip(ys, means, err, part["n"], strict=True):
            end = mean + half if mean >= 0 else mean - half
            ax.annotate(f"{mean:+.2f}" + (f" (n={n})" if n > 1 else ""), (end, y), xytext=(4 if mean >= 0 else -4, 0),
                        textcoords="offset points", va="center", ha="left" if mean >= 0 else "right", fontsize=7)


def plot_sim_int_gap(df: pd.DataFrame, path: str | os.PathLike[str]) -> list[Path]:
    """Horizontal bars of integer − simulated accuracy, grouped per configuration, one bar per int8 engine with
    status ok (legend: the engines), zero line marked; the subtitle names the runs' host(s) and target(s)."""
    table = gap_table(df)
    if table.empty:
        raise ValueError("no run has both a simulated and an integer accuracy")
    groups = list(dict.fromkeys(table["configuration"]))
    engines = _engine_order(table)
    fig, (ax,) = new_figure(7.5, 1.6 + 0.25 * len(table) + 0.2 * len(groups))
    _draw_gaps(ax, table, groups, engines)
    ax.axvline(0.0, color="0.2", linewidth=1.0)
    ax.set_yticks(range(len(groups)), groups, fontsize=8)
    ax.invert_yaxis()  # first configuration, and in it the first engine, on top
    span = max(0.5, float(np.nanmax(np.abs(table["mean"]) + table["ci95"].fillna(0.0))) * 1.6)
    ax.set_xlim(-span, span)
    ax.set_xlabel("integer − simulated accuracy (percentage points)")
    fig.suptitle("Simulated vs integer model, per int8 engine", fontsize=11)
    ax.set_title(textwrap.fill(host_target_line(df), 110), fontsize=8)
    ax.grid(True, axis="x", alpha=0.4)
    ax.legend(title="engine", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


__all__ = ["GAP_COLUMNS", "gap_table", "has_method_comparison", "method_table", "plot_methods", "plot_sim_int_gap"]
