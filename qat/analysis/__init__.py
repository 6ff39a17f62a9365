"""Analysis layer: read run records, find the Pareto front, tabulate and plot accuracy against latency."""

from qat.analysis.pareto import pareto_front
from qat.analysis.plots import model_label, plot_tradeoff
from qat.analysis.records import load_records
from qat.analysis.report import write_report

__all__ = ["load_records", "model_label", "pareto_front", "plot_tradeoff", "write_report"]
