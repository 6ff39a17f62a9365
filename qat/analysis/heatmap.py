"""Bit-depth heatmap: accuracy over weight bits × activation bits (Jacob et al. 2018, Tables 4.7/4.8).

One panel per model and method; rows are weight bits, columns activation bits, both descending from 8
as in the paper. A cell shows the mean over seeds (n when > 1) and, when the model has a float run, the
change against it (the quantity Jacob Tables 4.7/4.8 report). A cell with no run is grey with "—".
Simulated-only runs (no integer model) are left out: the grid holds integer-model accuracy only.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize

from qat.analysis.budget import float_baseline
from qat.analysis.plots import METRIC_LABELS, model_label, new_figure, save_figure
from qat.analysis.records import simulated_mask

PANEL_KEYS = ("model.arch", "model.width_mult", "model.resolution", "method")


def bit_grid(df: pd.DataFrame, value: str = "metric") -> list[tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]]:
    """Per panel: ``(title, mean, n, delta)`` tables indexed by weight bits (rows) × activation bits
    (columns), descending; cells without a run are NaN (``n`` 0). Only quantized runs (not ``float``)."""
    needed = ("quant.weight_bits", "quant.act_bits", value, "method")
    if any(c not in df.columns for c in needed):
        return []
    data = df.assign(baseline=float_baseline(df) if "task" in df.columns else np.nan)
    data = data[(data["method"] != "float") & ~simulated_mask(data)].copy()
    for column in ("quant.weight_bits", "quant.act_bits", value):
        data[column] = pd.to_numeric(data[column], errors="coerce")
    data = data.dropna(subset=["quant.weight_bits", "quant.act_bits", value])
    data["delta"] = data[value] - data["baseline"]
    keys = [k for k in PANEL_KEYS if k in data.columns]
    panels = []
    for _, group in data.groupby(keys, dropna=False, sort=True):
        rows = sorted(group["quant.weight_bits"].unique(), reverse=True)
        cols = sorted(group["quant.act_bits"].unique(), reverse=True)
        table = group.groupby(["quant.weight_bits", "quant.act_bits"])
        mean = table[value].mean().unstack().reindex(index=rows, columns=cols)
        count = table[value].count().unstack().reindex(index=rows, columns=cols).fillna(0).astype(int)
        delta = table["delta"].mean().unstack().reindex(index=rows, columns=cols)
        first = group.iloc[0]
        title = f"{model_label(first, with_arch=True)} · {first['method']}"
        panels.append((title, mean, count, delta))
    return panels


def has_bit_grid(df: pd.DataFrame) -> bool:
    """True when some model and method ran at two or more (weight bits, activation bits) settings."""
    return any(int((n > 0).to_numpy().sum()) >= 2 for _, _, n, _ in bit_grid(df))


def plot_bit_heatmap(df: pd.DataFrame, path: str | os.PathLike[str], value: str = "metric") -> list[Path]:
    """Draw the heatmap(s) and write ``<stem>.png``/``.pdf``. Raises ``ValueError`` without quantized runs."""
    panels = bit_grid(df, value)
    if not panels:
        raise ValueError("no quantized run with quant.weight_bits, quant.act_bits and a metric to plot")
    names = df["metric_name"].dropna().unique().tolist() if "metric_name" in df.columns else []
    unit = f"{METRIC_LABELS.get(names[0], 'accuracy') if len(names) == 1 else 'accuracy'} (%)"
    finite = np.concatenate([m.to_numpy(dtype=float).ravel() for _, m, _, _ in panels])
    finite = finite[np.isfinite(finite)]
    norm = Normalize(vmin=float(finite.min()) - 1e-6, vmax=float(finite.max()) + 1e-6)
    fig, axes = new_figure(4.2 * len(panels) + 1.2, 4.4, ncols=len(panels))
    image = None
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    for ax, (title, mean, count, delta) in zip(axes, panels, strict=True):
        grid = np.ma.masked_invalid(mean.to_numpy(dtype=float))
        image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
        for i, wbits in enumerate(mean.index):
            for j, abits in enumerate(mean.columns):
                v = mean.loc[wbits, abits]
                if not np.isfinite(v):
                    ax.text(j, i, "—", ha="center", va="center", fontsize=11, color="0.3")
                    continue
                lines = [f"{v:.1f}"]
                if np.isfinite(d := delta.loc[wbits, abits]):
                    lines.append(f"Δ {d:+.1f}")
                if (n := count.loc[wbits, abits]) > 1:
                    lines.append(f"n={n}")
                dark = norm(v) < 0.6
                ax.text(j, i, "\n".join(lines), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(mean.columns)), [f"{int(b)}" for b in mean.columns])
        ax.set_yticks(range(len(mean.index)), [f"{int(b)}" for b in mean.index])
        ax.set_xlabel("activation bits")
        ax.set_ylabel("weight bits")
        ax.set_title(title, fontsize=10)
    colorbar = fig.colorbar(image, ax=axes, shrink=0.85)
    colorbar.set_label(unit + ", mean over seeds")
    fig.suptitle("Bit depth: weights × activations (Δ vs float)", fontsize=12)
    return save_figure(fig, path)


__all__ = ["bit_grid", "has_bit_grid", "plot_bit_heatmap"]
