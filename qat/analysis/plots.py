"""Accuracy-vs-latency trade-off plot (the shape of Jacob et al. 2018, Fig. 4.1).

Top-1 against measured latency on a log axis, one line per precision, the Pareto front ringed and joined
by a dashed line. Simulated-only runs (no integer model, so no integer latency) are never points on the
latency axis: each is a dotted horizontal line at its simulated accuracy, labelled "(simulated only)". Uses the
Agg canvas on a bare ``Figure``: no pyplot, no global backend switch.
"""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patheffects import withStroke
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from qat.analysis.pareto import pareto_front
from qat.analysis.records import simulated_column, simulated_mask
from qat.records import atomic_write_bytes

Label = str | Callable[[pd.Series], str] | None
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FORMATS = ("png", "pdf")
HALO = [withStroke(linewidth=3, foreground="white")]  # keeps point labels legible over lines
SIMULATED_SUFFIX = " (simulated only)"
SIMULATED_LEGEND = "simulated only (no integer model or latency)"


def _unique(df: pd.DataFrame, column: str) -> list:
    """Distinct non-null values of ``column`` in first-seen order; empty if the column is absent."""
    if column not in df.columns:
        return []
    return list(dict.fromkeys(df[column].dropna().tolist()))


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def model_label(row: pd.Series, *, with_arch: bool = False) -> str:
    """Short point label such as ``"w0.5 r32"`` (``"mobilenet_v2 w0.5 r32"`` with ``with_arch``)."""
    parts = []
    if with_arch and pd.notna(row.get("model.arch")):
        parts.append(str(row["model.arch"]))
    width, resolution = row.get("model.width_mult"), row.get("model.resolution")
    if pd.notna(width):
        parts.append(f"w{float(width)}" if isinstance(width, (int, float)) else f"w{width}")
    if pd.notna(resolution):
        parts.append(f"r{_fmt(resolution)}")
    return " ".join(parts) if len(parts) > int(with_arch) else str(row.get("model_id", "?"))


def latency_axis_label(df: pd.DataFrame, x: str = "latency.median_ms") -> str:
    """``"latency, median ms (batch 1, 1 thread, torch_native_x86)"``, from the values in ``df``."""
    base = x.removesuffix(".mean")
    if not (base.startswith("latency.") and base.endswith("_ms")):
        return x
    stat = base.removeprefix("latency.").removesuffix("_ms")
    conditions = []
    if batches := _unique(df, "latency.batch"):
        conditions.append("batch " + "/".join(_fmt(b) for b in batches))
    if threads := _unique(df, "latency.threads"):
        plural = "" if threads == [1] else "s"
        conditions.append("/".join(_fmt(t) for t in threads) + f" thread{plural}")
    if engines := _unique(df, "latency.engine"):
        conditions.append(", ".join(str(e) for e in engines))
    suffix = f" ({', '.join(conditions)})" if conditions else ""
    return f"latency, {stat} ms{suffix}"


METRIC_LABELS = {"top1": "top-1", "map": "COCO mAP"}


def accuracy_axis_label(y: str, metric_name: str | None = None) -> str:
    """``"top-1 (%)"`` for ``accuracy.top1``, ``"float top-1 (%)"`` for ``accuracy.float_top1``; for the
    derived ``metric`` (or ``metric.mean``) column, the name of ``metric_name`` (``"COCO mAP (%)"`` for map)."""
    y = y.removesuffix(".mean")
    if y == "metric":
        return f"{METRIC_LABELS.get(str(metric_name), 'accuracy')} (%)"
    if y.startswith("accuracy.") and y.endswith("top1"):
        kind = y.removeprefix("accuracy.").removesuffix("top1").rstrip("_").replace("_", " ")
        return f"{kind} top-1 (%)".strip()
    if y.startswith("accuracy.") and y.endswith("map"):
        kind = y.removeprefix("accuracy.").removesuffix("map").rstrip("_").replace("_", " ")
        return f"{kind} COCO mAP (%)".strip()
    return y


def _series_order(names: list) -> list:
    """``float`` first, then the rest by name."""
    return sorted(names, key=lambda name: (str(name) != "float", str(name)))


def _log_ticks(ax, lo: float, hi: float) -> None:
    """Readable plain-number ticks on a log axis, even when the data span far less than a decade."""
    ticks = [t for t in LogLocator(subs=(1.0, 2.0, 5.0)).tick_values(lo, hi) if lo <= t <= hi]
    if len(ticks) < 3:
        linear = MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        ticks = [t for t in linear if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _title(df: pd.DataFrame) -> str:
    columns = ("model.arch", "data.name")
    about = [", ".join(map(str, values)) for col in columns if (values := _unique(df, col))]
    return "Accuracy vs latency" + (f": {' on '.join(about)}" if about else "")


def _output_paths(path: str | os.PathLike[str]) -> list[Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in {f".{f}" for f in FORMATS} else path
    return [stem.with_name(f"{stem.name}.{fmt}") for fmt in FORMATS]


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` atomically (reproducible PDF bytes); return the paths."""
    written = []
    for out in _output_paths(path):
        buffer = io.BytesIO()
        metadata = {"CreationDate": None} if out.suffix == ".pdf" else None
        fig.savefig(buffer, format=out.suffix[1:], bbox_inches="tight", metadata=metadata)
        atomic_write_bytes(out, buffer.getvalue())
        written.append(out)
    return written


def new_figure(width: float, height: float, ncols: int = 1, sharey: bool = False) -> tuple[Figure, list]:
    """A bare Agg figure with ``ncols`` axes side by side (no pyplot state)."""
    fig = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, sharey=sharey, squeeze=False)[0]
    return fig, list(axes)


def _numeric_error(data: pd.DataFrame, column: str | None) -> np.ndarray | None:
    if column is None or column not in data.columns:
        return None
    err = pd.to_numeric(data[column], errors="coerce").to_numpy(dtype=float)
    return np.where(np.isfinite(err), err, 0.0) if np.isfinite(err).any() and (err > 0).any() else None


def _draw_tradeoff(ax, data: pd.DataFrame, labels: pd.Series, x: str, y: str, series: str,  # type: ignore[no-untyped-def]
                   order: list, yerr: str | None, xerr: str | None) -> bool:
    """One panel: a line per series, error bars where given, the Pareto front ringed. True if bars drawn."""
    colors = [f"C{i}" for i in range(10)]
    drew_bars = False
    for i, name in enumerate(order):
        group = data[data[series] == name].sort_values([x, y], kind="mergesort")
        if group.empty:
            continue
        color, marker = colors[i % len(colors)], MARKERS[i % len(MARKERS)]
        style = {"color": color, "marker": marker, "markersize": 6}
        ax.plot(group[x], group[y], linewidth=1.6, label=f"{name} ({len(group)})", zorder=2, **style)
        ax.plot(group[x], group[y], linestyle="none", zorder=5, **style)  # markers above labels and lines
        ey, ex = _numeric_error(group, yerr), _numeric_error(group, xerr)
        if ey is not None or ex is not None:
            ax.errorbar(group[x], group[y], yerr=ey, xerr=ex, fmt="none", ecolor=color, elinewidth=1.0,
                        capsize=3, zorder=4)
            drew_bars = True
        for (_, row), text in zip(group.iterrows(), labels[group.index], strict=True):
            ax.annotate(
                text,
                (row[x], row[y]),
                xytext=(7, -3),  # below right: clear of a rising curve and of faster series
                textcoords="offset points",
                ha="left",
                va="top",
                fontsize=9,
                color=color,
                annotation_clip=False,
                zorder=3,
                path_effects=HALO,
            )

    front = data[pareto_front(data, x, y)].sort_values([x, y], kind="mergesort")
    ring = {
        "color": "0.2",
        "marker": "o",
        "markersize": 14,
        "markerfacecolor": "none",
        "markeredgewidth": 1.3,
    }
    ax.plot(front[x], front[y], linestyle="--", linewidth=1.1, label="Pareto front", zorder=1, **ring)
    ax.plot(front[x], front[y], linestyle="none", zorder=4, **ring)  # rings above the series lines

    spread = _numeric_error(data, xerr)
    spread = np.zeros(len(data)) if spread is None else spread
    lo = float(np.min(np.where(data[x] - spread > 0, data[x] - spread, data[x])))
    hi = float((data[x] + spread).max())
    pad = max(1.2, (hi / lo) ** 0.1)
    ax.set_xscale("log")
    ax.set_xlim(lo / pad, hi * pad)
    _log_ticks(ax, lo / pad, hi * pad)
    ax.margins(y=0.12)
    ax.set_xlabel(latency_axis_label(data, x), fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(True, which="major", alpha=0.45)
    ax.grid(True, which="minor", alpha=0.15)
    return drew_bars


def _labels(data: pd.DataFrame, label: Label, with_arch: bool) -> pd.Series:
    if data.empty:
        return pd.Series(dtype=str)
    if label is None:
        return data.apply(lambda row: model_label(row, with_arch=with_arch), axis=1)
    if isinstance(label, str):
        return data[label].map(_fmt)
    return data.apply(label, axis=1)


def _draw_simulated(ax, simulated: pd.DataFrame, y: str, labels: pd.Series, series: str) -> None:  # type: ignore[no-untyped-def]
    """Each simulated-only row as a dotted line at its accuracy, labelled at the right edge."""
    for (_, row), text in zip(simulated.iterrows(), labels, strict=True):
        ax.axhline(row[y], color="0.4", linestyle=":", linewidth=1.3, label=SIMULATED_LEGEND, zorder=1)
        name = str(row[series]).removesuffix(SIMULATED_SUFFIX)
        ax.annotate(f"{name} {text}{SIMULATED_SUFFIX}", (0.99, row[y]), xycoords=("axes fraction", "data"),
                    xytext=(0, 2), textcoords="offset points", ha="right", va="bottom", fontsize=8, color="0.3",
                    annotation_clip=False, zorder=3, path_effects=HALO)


def plot_tradeoff(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    x: str = "latency.median_ms",
    y: str = "accuracy.top1",
    series: str = "quant.precision",
    label: Label = None,
    title: str | None = None,
    yerr: str | None = None,
    xerr: str | None = None,
    panel: str | None = None,
    host: str | None = None,
) -> list[Path]:
    """Draw ``y`` against ``x`` (log scale), one line per value of ``series``, Pareto front marked.

    ``label`` names a column, or maps a row to its point label; by default :func:`model_label`.
    ``yerr``/``xerr`` name columns of error-bar half-widths (e.g. ``metric.ci95`` from
    :func:`qat.analysis.aggregate_seeds`; NaN or 0 draws none). ``panel`` names a column (e.g.
    ``latency.device``): one panel per value, each with its own Pareto front. Rows with ``simulated_only`` True
    are drawn in every panel as dotted lines at their simulated accuracy (the simulated counterpart of ``y``:
    ``metric_sim.mean`` for ``metric.mean``, ``accuracy.sim_top1`` for ``accuracy.top1``), never as points.
    Under the title, ``host`` (default: :func:`qat.analysis.engines.host_target_line` of ``df``; pass it for an
    aggregate that lost the records' host columns).
    Writes ``<stem>.png`` and ``<stem>.pdf`` atomically (``path`` with or without a suffix) and returns them.
    Raises ``ValueError`` if no row has finite ``x`` and ``y``.
    """
    for column in (x, y, series, *(c for c in (panel,) if c)):
        if column not in df.columns:
            raise ValueError(f"column {column!r} not in the table")
    is_simulated = simulated_mask(df)
    sim_y = simulated_column(y)
    simulated = df[is_simulated].copy()
    if sim_y is not None and sim_y in simulated.columns:
        simulated[sim_y] = pd.to_numeric(simulated[sim_y], errors="coerce")
        simulated = simulated[np.isfinite(simulated[sim_y])].reset_index(drop=True)
    else:
        simulated = simulated.iloc[:0]
    data = df[~is_simulated].copy()
    data[x] = pd.to_numeric(data[x], errors="coerce")
    data[y] = pd.to_numeric(data[y], errors="coerce")
    data = data[np.isfinite(data[x]) & np.isfinite(data[y]) & (data[x] > 0)].reset_index(drop=True)
    if data.empty:
        raise ValueError(f"no row has a positive {x!r} and a finite {y!r} to plot")
    with_arch = len(_unique(pd.concat([data, simulated]), "model.arch")) > 1
    labels = _labels(data, label, with_arch)
    sim_labels = _labels(simulated, label, with_arch)

    panels = _unique(data, panel) if panel else [None]
    order = _series_order(_unique(data, series))
    fig, axes = new_figure(7.5 * len(panels) ** 0.8, 5.0, ncols=len(panels), sharey=True)
    bars = False
    for ax, value in zip(axes, panels, strict=True):
        part = data if value is None else data[data[panel] == value]
        bars |= _draw_tradeoff(ax, part, labels, x, y, series, order, yerr, xerr)
        if sim_y is not None:
            _draw_simulated(ax, simulated, sim_y, sim_labels, series)
        if value is not None and len(panels) > 1:
            ax.set_title(f"{panel.split('.')[-1]}: {value}", fontsize=11)
    names = _unique(data, "metric_name")
    y_label = accuracy_axis_label(y, names[0] if len(names) == 1 else None)
    axes[0].set_ylabel(y_label + (", mean ± 95% CI" if bars else ""), fontsize=11)
    from qat.analysis.engines import host_target_line  # engines imports this module

    heading = title if title is not None else _title(data)
    # every figure names its host: ``host`` where ``df`` is an aggregate without the records' host columns
    host = textwrap.fill(host or host_target_line(pd.concat([data, simulated])), 110)
    if len(panels) > 1:
        fig.suptitle(f"{heading}\n{host}", fontsize=10)
    else:
        axes[0].set_title(heading, fontsize=12, pad=12 + 11 * (host.count("\n") + 1))  # room for the host
        axes[0].text(0.5, 1.01, host, transform=axes[0].transAxes, ha="center", va="bottom", fontsize=8)
    handles: dict[str, object] = {}
    for ax in axes:  # one legend for all panels; "Pareto front" last
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(text, handle)
    handles = {**{k: v for k, v in handles.items() if k != "Pareto front"}, "Pareto front": handles["Pareto front"]}
    axes[0].legend(list(handles.values()), list(handles), title=series.split(".")[-1], fontsize=9, title_fontsize=9,
                   loc="best", framealpha=0.9)
    return save_figure(fig, path)


__all__ = ["accuracy_axis_label", "latency_axis_label", "model_label", "new_figure", "plot_tradeoff", "save_figure"]
