# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Accuracy against latency from the results store
#
# Rebuilds the report from run records (Jacob et al. 2018 Fig. 4.1 style): records and separate latency
# records joined on model id, seeds pooled (mean, std, 95% Student-t interval, n), the Pareto front per
# device, budget queries per engine and device, the figures, and one paper table beside our runs.
# Point `QAT_RECORDS` at any directory of runs (default: the newest `outputs/demo/*` sweep) and
# `QAT_REPORT_OUT` at where to write. Open it with jupytext, or run it with `python notebooks/tradeoff.py`.

# %%
import os
from pathlib import Path

from qat.analysis import (
    aggregate_seeds,
    build_table,
    configurations,
    fastest_within,
    join_latency,
    load_latency_records,
    load_records,
    most_accurate_under,
    plot_tradeoff,
    to_markdown,
)
from qat.analysis.comparisons import gap_table, plot_sim_int_gap
from qat.analysis.report import precision_pairs, results_table

ROOT = Path(__file__).resolve().parents[1] if "__file__" in globals() else Path.cwd().parent
sweeps = sorted((ROOT / "outputs" / "demo").glob("*"))
records_root = Path(os.environ.get("QAT_RECORDS", sweeps[-1] if sweeps else ROOT / "outputs"))
out_dir = Path(os.environ.get("QAT_REPORT_OUT", ROOT / "outputs" / "notebook"))

# %% [markdown]
# Load every `record.json` and every `latency*.json`; unreadable ones are listed, not fatal. Then
# accuracy ⋈ latency on model id: one row per run and measurement.

# %%
records, skipped = load_records(records_root)
latency, skipped_latency = load_latency_records(records_root)
print(f"{len(records)} records and {len(latency)} separate latency records from {records_root}; "
      f"skipped {len(skipped) + len(skipped_latency)}")
for path, reason in skipped + skipped_latency:
    print(f"  {path}: {reason}")
table = results_table(join_latency(records, latency))
table[["model_id", "method", "metric", "latency.engine", "latency.device", "latency.median_ms"]]

# %% [markdown]
# Seeds pooled per configuration; `metric.ci95` is the half-width of the 95% Student-t interval.

# %%
summary = configurations(table)
summary[["series", "model.width_mult", "n", "metric.mean", "metric.std", "metric.ci95", "latency.median_ms.mean",
         "pareto"]]

# %% [markdown]
# Float against int8 for each model size: the accuracy cost and the speed-up of integer inference.

# %%
pairs = precision_pairs(table)
pairs

# %% [markdown]
# Budget queries, per engine and device: the most accurate configuration under the median latency, and the
# fastest within one point of its float model.

# %%
budget_ms = float(summary["latency.median_ms.mean"].median())
print(f"most accurate under {budget_ms:.2f} ms:")
print(most_accurate_under(summary, budget_ms)[["latency.engine", "series", "model.width_mult", "metric.mean"]])
print("fastest within 1 point of float:")
print(fastest_within(summary, 1.0)[["latency.engine", "series", "model.width_mult", "drop"]])

# %% [markdown]
# The trade-off plot (Pareto front ringed, error bars where n > 1) and the simulated-vs-integer gap.

# %%
paths = plot_tradeoff(summary, out_dir / "tradeoff", x="latency.median_ms.mean", y="metric.mean",
                      series="series", yerr="metric.ci95")
if not gap_table(table).empty:
    paths += plot_sim_int_gap(table, out_dir / "sim_int_gap")
print("wrote", *paths)

# %% [markdown]
# A paper table beside our runs: Jacob et al. Table 4.7's bit-depth grid (change against float), with
# every dataset admitted; cells with no run stay "—".

# %%
grid = build_table(table, "jacob2018_table4_7", dataset_filter=False)
print(to_markdown(grid, "jacob2018_table4_7"))
print(aggregate_seeds(table, by=["method"], values=["metric"]).to_string(index=False))
