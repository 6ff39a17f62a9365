"""Aggregation over seeds: mean, sample standard deviation, 95% Student-t interval and n per configuration.

Runs that differ only in their seed (and hence in ``model_id``, ``run_id``, paths and timings) are one
configuration. For ``n`` values x_i the interval is mean ± t_{0.975, n-1} · s / sqrt(n), s the sample
standard deviation (ddof = 1); with n = 1 the spread is unknown, so ``std`` and ``ci95`` are NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

CONFIG_KEYS = (
    "experiment", "task", "metric_name", "data.name", "method", "model.arch", "model.width_mult", "model.resolution",
    "quant.precision", "quant.weight_bits", "quant.act_bits", "quant.input_bits", "quant.weight_per_channel",
    "quant.weight_symmetric", "quant.act_symmetric", "quant.act_observer", "quant.weight_observer",
    "quant.bn_fold", "quant.activation", "quant.step_lr_scale", "quant.step_init", "quant.weight_step_init",
    "quant.step_domain", "simulated_only",
    "latency.engine", "latency.device", "latency.threads",
    "latency.batch", "data.val_subset.images", "data.val_subset.seed",
)  # fmt: skip
"""What identifies a configuration by default (those present in the frame): everything but the seed
(``simulated_only`` keeps runs without an integer model apart from integer runs; runs evaluated on a validation
subset, ``data.val_max_images``, are apart from whole-set runs and from other subsets)."""

VALUE_COLUMNS = (
    "metric", "metric_sim", "metric_float", "accuracy.top1", "accuracy.map", "accuracy.float_top1",
    "accuracy.sim_top1", "accuracy.int_top1", "latency.median_ms", "latency.p10_ms", "latency.p90_ms",
)  # fmt: skip
"""Aggregated by default (those present in the frame)."""

STATS = ("mean", "std", "ci95", "n")


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, std, half_width, n)`` of the finite ``values``: Student-t interval mean ± half_width."""
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    n = int(data.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(data.mean())
    if n == 1:
        return mean, math.nan, math.nan, 1
    std = float(data.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return mean, std, half, n


def _hashable(value: object) -> object:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def aggregate_seeds(
    df: pd.DataFrame, by: Sequence[str] | None = None, values: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per configuration: the ``by`` columns, ``n`` (runs), ``seeds`` and, for each of ``values``,
    ``<value>.mean``, ``<value>.std``, ``<value>.ci95`` (half-width of the 95% interval) and ``<value>.n``
    (finite values). Defaults: ``by`` = :data:`CONFIG_KEYS`, ``values`` = :data:`VALUE_COLUMNS` (those present).
    Rows keep the order in which their configuration first appears; missing keys form their own group.
    """
    by = [c for c in (CONFIG_KEYS if by is None else by) if c in df.columns]
    missing = [c for c in (values or ()) if c not in df.columns]
    if missing:
        raise KeyError(f"value column(s) not in the table: {', '.join(missing)}")
    values = [c for c in (VALUE_COLUMNS if values is None else values) if c in df.columns]
    data = df.copy()
    for column in by:
        data[column] = data[column].map(_hashable)
    for column in values:
        data[column] = pd.to_numeric(data[column], errors="coerce")
    rows = []
    groups = data.groupby(by, dropna=False, sort=False) if by else [((), data)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, object] = dict(zip(by, key, strict=True))
        row["n"] = len(group)
        if "seed" in group.columns:
            row["seeds"] = ",".join(str(s) for s in sorted(group["seed"].dropna().unique()))
        for column in values:
            row.update(zip((f"{column}.{s}" for s in STATS), t_interval(group[column].to_numpy()), strict=True))
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["CONFIG_KEYS", "VALUE_COLUMNS", "aggregate_seeds", "t_interval"]
