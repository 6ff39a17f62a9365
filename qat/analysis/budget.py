"""Budget queries per engine and device: the most accurate configuration under a latency budget, and the
fastest within an accuracy-drop budget (the two readings of an accuracy-latency trade-off curve, Jacob et
al. 2018 §4.1, Fig. 4.1).

Both work on a per-run table (:func:`qat.analysis.join_latency`: ``latency.median_ms``, ``metric``) or a
per-configuration one (:func:`qat.analysis.aggregate_seeds`: ``latency.median_ms.mean``, ``metric.mean``),
and answer one row per (engine, device) group that has an answer; a group with none is absent. Simulated-only
runs (``simulated_only``: no integer model, hence no integer latency) are never an answer.
"""

from __future__ import annotations

import math

import pandas as pd

from qat.analysis.records import simulated_mask

GROUP = ("latency.engine", "latency.device")
MODEL_KEYS = ("task", "data.name", "model.arch", "model.width_mult", "model.resolution")
"""A quantized run's float baseline is the float run(s) with the same values of these columns."""


def _columns(df: pd.DataFrame) -> tuple[str, str, str]:
    """(latency, accuracy, own-float accuracy) columns: aggregated names if the frame has them."""
    if "metric.mean" in df.columns:
        return "latency.median_ms.mean", "metric.mean", "metric_float.mean"
    return "latency.median_ms", "metric", "metric_float"


def _select(df: pd.DataFrame, engine: str | None, device: str | None, x: str, y: str) -> pd.DataFrame:
    data = df.copy()
    data = data[~simulated_mask(data)]
    for column in (x, y):
        if column not in data.columns:
            raise KeyError(f"column {column!r} not in the table")
        data[column] = pd.to_numeric(data[column], errors="coerce")
    data = data[data[x].notna() & data[y].notna()]
    for column, wanted in zip(GROUP, (engine, device), strict=True):
        if column not in data.columns:
            data[column] = pd.NA
        if wanted is not None:
            data = data[data[column] == wanted]
    return data


def _per_group(data: pd.DataFrame, order: list[str], ascending: list[bool]) -> pd.DataFrame:
    """The first row of each (engine, device) group after sorting by ``order``."""
    if data.empty:
        return data.reset_index(drop=True)
    ranked = data.sort_values(order, ascending=ascending, kind="mergesort")
    best = ranked.groupby(list(GROUP), dropna=False, sort=True).head(1)
    return best.sort_values(list(GROUP), kind="mergesort").reset_index(drop=True)


def most_accurate_under(
    df: pd.DataFrame, latency_ms: float, engine: str | None = None, device: str | None = None
) -> pd.DataFrame:
    """Per (engine, device): the most accurate row with latency ≤ ``latency_ms`` (ties: the faster, then
    the first in table order). ``engine``/``device`` restrict the search to one of each."""
    if not latency_ms > 0:
        raise ValueError(f"latency budget must be positive, got {latency_ms!r}")
    x, y, _ = _columns(df)
    data = _select(df, engine, device, x, y)
    data = data[data[x] <= latency_ms]
    return _per_group(data, [y, x], [False, True])


def float_baseline(df: pd.DataFrame) -> pd.Series:
    """Per row: the mean accuracy of the float runs of the same model (:data:`MODEL_KEYS`), else the run's
    own float accuracy (``metric_float``); NaN when neither exists."""
    _, y, own = _columns(df)
    keys = [k for k in MODEL_KEYS if k in df.columns]
    values = pd.to_numeric(df[y], errors="coerce")
    is_float = df["method"].eq("float") if "method" in df.columns else pd.Series(False, index=df.index)
    fallback = pd.to_numeric(df[own], errors="coerce") if own in df.columns else pd.Series(math.nan, index=df.index)
    if df.empty or not keys or not is_float.any():
        return fallback
    key = df[keys].apply(lambda row: "|".join(map(str, row)), axis=1)
    means = values[is_float].groupby(key[is_float]).mean()
    return key.map(means).astype(float).fillna(fallback)


def fastest_within(
    df: pd.DataFrame,
    accuracy_drop: float,
    engine: str | None = None,
    device: str | None = None,
    baseline: str | float = "float",
) -> pd.DataFrame:
    """Per (engine, device): the fastest row whose accuracy is at most ``accuracy_drop`` points below its
    baseline (ties: the more accurate, then the first). Adds ``baseline`` and ``drop`` columns.

    ``baseline``: ``"float"`` (each row's own float model, :func:`float_baseline`; rows without one are
    left out), ``"best"`` (the most accurate row of the same engine and device) or a number (percent).
    """
    if not accuracy_drop >= 0:
        raise ValueError(f"accuracy-drop budget must be ≥ 0, got {accuracy_drop!r}")
    x, y, _ = _columns(df)
    data = _select(df, engine, device, x, y)
    if isinstance(baseline, str) and baseline == "float":
        data["baseline"] = float_baseline(df).loc[data.index]
    elif isinstance(baseline, str) and baseline == "best":
        data["baseline"] = data.groupby(list(GROUP), dropna=False)[y].transform("max")
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        data["baseline"] = float(baseline)
    else:
        raise ValueError(f"baseline must be 'float', 'best' or a number, got {baseline!r}")
    data["drop"] = data["baseline"] - data[y]
    data = data[data["drop"].notna() & (data["drop"] <= accuracy_drop + 1e-9)]
    return _per_group(data, [x, y], [True, False])


__all__ = ["fastest_within", "float_baseline", "most_accurate_under"]
