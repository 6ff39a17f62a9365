"""Analysis layer: read run and latency records, join them, aggregate over seeds, find Pareto fronts, answer
latency/accuracy budget queries, plot, and put our numbers beside the papers' tables."""

from qat.analysis.budget import fastest_within, float_baseline, most_accurate_under
from qat.analysis.latency import join_latency, load_latency_records
from qat.analysis.pareto import pareto_by, pareto_front
from qat.analysis.plots import model_label, plot_tradeoff
from qat.analysis.records import load_records
from qat.analysis.report import configurations, write_paper_table, write_report
from qat.analysis.stats import aggregate_seeds, t_interval
from qat.analysis.tables import build_table, to_latex, to_markdown

__all__ = [
    "aggregate_seeds", "build_table", "configurations", "fastest_within", "float_baseline", "join_latency",
    "load_latency_records", "load_records", "model_label", "most_accurate_under", "pareto_by", "pareto_front",
    "plot_tradeoff", "t_interval", "to_latex", "to_markdown", "write_paper_table", "write_report",
]  # fmt: skip
