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
# Rebuilds the demo report from run records (Jacob et al. 2018 Fig. 4.1 style). Point `QAT_RECORDS` at any
# directory of runs (default: the newest `outputs/demo/*` sweep) and `QAT_REPORT_OUT` at where to write.
# Open it as a notebook with jupytext, or run it top to bottom with `python notebooks/tradeoff.py`.

# %%
import os
from pathlib import Path

from qat.analysis import load_records, pareto_front, plot_tradeoff
from qat.analysis.report import precision_pairs, results_table

ROOT = Path(__file__).resolve().parents[1] if "__file__" in globals() else Path.cwd().parent
sweeps = sorted((ROOT / "outputs" / "demo").glob("*"))
records_root = Path(os.environ.get("QAT_RECORDS", sweeps[-1] if sweeps else ROOT / "outputs"))
out_dir = Path(os.environ.get("QAT_REPORT_OUT", ROOT / "outputs" / "notebook"))

# %% [markdown]
# Load every `record.json`; unreadable records are listed, not fatal.

# %%
frame, skipped = load_records(records_root)
print(f"{len(frame)} records from {records_root}; skipped {len(skipped)}")
table = results_table(frame)
table[["model_id", "quant.precision", "accuracy.top1", "latency.median_ms"]]

# %% [markdown]
# Float against int8 for each model size: the accuracy cost and the speed-up of integer inference.

# %%
pairs = precision_pairs(table)
pairs

# %% [markdown]
# The Pareto front over all runs (lower latency, higher top-1), and the trade-off plot.

# %%
front = table[pareto_front(table)]
print(front[["model_id", "accuracy.top1", "latency.median_ms"]].to_string(index=False))
paths = plot_tradeoff(table, out_dir / "tradeoff")
print("wrote", *paths)
