"""Pareto front of an accuracy-latency table: lower latency and higher accuracy are both better
(the upper-left envelope of Jacob et al. 2018, Fig. 4.1). Simulated-only runs (no integer model, no integer
latency: the ``simulated_only`` column of :func:`qat.analysis.load_records`) are never on a front."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from qat.analysis.records import simulated_mask


def pareto_front(df: pd.DataFrame, x: str = "latency.median_ms", y: str = "accuracy.top1") -> pd.Series:
    """Boolean Series (same index as ``df``): True where no other point is at least as good on both axes
    and strictly better on one (minimize ``x``, maximize ``y``).

    Ties: exact duplicates do not dominate each other, so both are on the front; among points with equal
    ``x`` only those with the highest ``y`` can be, and among equal ``y`` only those with the lowest ``x``.
    Rows with NaN, infinite or non-numeric ``x`` or ``y``, or a missing column, are never on the front, nor
    are rows with ``simulated_only`` True.
    """
    flags = np.zeros(len(df), dtype=bool)
    if x in df.columns and y in df.columns:
        xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
        ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
        integer = ~simulated_mask(df).to_numpy()
        valid = np.flatnonzero(np.isfinite(xs) & np.isfinite(ys) & integer)
        best_y = -math.inf  # best accuracy among strictly faster points
        for x_value in np.unique(xs[valid]):  # ascending latency
            same_x = valid[xs[valid] == x_value]
            top = ys[same_x].max()
            if top > best_y:
                flags[same_x[ys[same_x] == top]] = True
                best_y = top
    return pd.Series(flags, index=df.index, name="pareto")


def pareto_by(
    df: pd.DataFrame,
    by: tuple[str, ...] | list[str] = ("latency.device",),
    x: str = "latency.median_ms",
    y: str = "accuracy.top1",
) -> pd.Series:
    """:func:`pareto_front` computed separately within each group of ``by`` (columns absent are ignored;
    missing values form their own group), e.g. one front per device or per (engine, device)."""
    keys = [c for c in by if c in df.columns]
    if not keys:
        return pareto_front(df, x, y)
    flags = pd.Series(False, index=df.index, name="pareto")
    for _, group in df.groupby(keys, dropna=False, sort=False):
        flags[group.index] = pareto_front(group, x, y)
    return flags
