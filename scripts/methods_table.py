"""The README's post-training methods vs QAT table, regenerated from ``results/methods/results.csv``.

    python scripts/methods_table.py results/methods --readme README.md

Rows are methods (float, min/max, MMSE, AdaQuant PTQ, QAT with EMA ranges, QAT with learned step sizes), columns
the bit widths that ran (read back from the records: ``W7A8`` where a deployment target narrowed 8-bit weights); a
cell is the integer top-1 as mean ± the half-width of its 95% Student-t interval over seeds, then, in brackets, the
paired change against the float model of the same seed, also as mean ± 95% half-width. A run without an integer
model (``status: simulated_only``) shows its simulated top-1 marked †. Writes ``methods_table.md`` into the
results directory, headed by the records' host and target; with ``--readme`` it replaces the README block
``<!-- METHODS_TABLE -->`` (``--marker``: another block, e.g. the same sweeps on a second host).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qat.analysis.engines import host_target_line
from qat.analysis.readme import markdown_table, publish
from qat.analysis.stats import t_interval
from qat.errors import ArgumentParser, QatError, one_line_errors

METHOD_LABELS = {"float": "float", "ptq_minmax": "min/max (PTQ)", "ptq_mse": "MMSE (PTQ)",
                 "ptq_minmax+adaquant": "AdaQuant (PTQ)", "ptq_mse+adaquant": "MMSE + AdaQuant (PTQ)",
                 "qat": "QAT (EMA ranges)", "qat_lsq": "QAT (LSQ: learned steps)"}
LEARNED_OBSERVERS = {"lsq", "lsq_plus"}


def _method(row: pd.Series) -> str:
    """The record's method; QAT whose quantizers learn their steps (LSQ/LSQ+ observers) is its own row."""
    observers = {row.get("quant.weight_observer"), row.get("quant.act_observer")}
    return "qat_lsq" if row["method"] == "qat" and observers & LEARNED_OBSERVERS else str(row["method"])


def _bits(row: pd.Series) -> str:
    """``W<weight bits>A<activation bits>`` as the record read them back (``4/8`` for a mixed model)."""
    if row["method"] == "float":
        return "float"
    return "W{}A{}".format(*(_width(row[f"quant.{kind}_bits"]) for kind in ("weight", "act")))


def _width(value: object) -> str:
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


def _widest_first(label: str) -> tuple[int, ...]:
    """Sort key: fewer bits later; a mixed setting (``W4/8A4/8``: 8-bit first and last layers) before its plain one."""
    return (*(-int(part.split("/")[0]) for part in label[1:].split("A")), -len(label))


def _top1(row: pd.Series) -> tuple[float, bool]:
    """(top-1 of the integer model, or the simulated top-1 where the run has no integer model; simulated?)"""
    simulated = row.get("status") == "simulated_only"
    return float(row["accuracy.sim_top1" if simulated else "accuracy.top1"]), simulated


def _mean_ci(values: np.ndarray, signed: bool = False) -> str:
    mean, _, half, n = t_interval(values)
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text + (f" ± {half:.1f}" if n > 1 else "")


def methods_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per method, one column per bit setting: ``mean ± 95% CI (paired change against float ± 95% CI)``;
    float sits in the widest setting's column."""
    if "seed" not in frame.columns:
        raise QatError("results.csv", "has no seed column", "regenerate it with experiments/report.py")
    floats = {int(r["seed"]): float(r["accuracy.top1"]) for _, r in frame[frame["method"] == "float"].iterrows()}
    keys = frame.apply(lambda r: (_method(r), _bits(r)), axis=1)
    settings = sorted({b for _, b in keys if b != "float"}, key=_widest_first) or ["W8A8"]
    cells: dict[tuple[str, str], str] = {}
    for (method, bits), part in frame.groupby(keys):
        values = [_top1(r) for _, r in part.iterrows()]
        top1 = np.array([v for v, _ in values])
        change = np.array([v - floats[int(s)] for (v, _), s in zip(values, part["seed"], strict=True)
                           if int(s) in floats])
        mark = "†" if any(sim for _, sim in values) else ""
        delta = f" ({_mean_ci(change, signed=True)})" if len(change) else ""
        cells[(method, settings[0] if bits == "float" else bits)] = f"{_mean_ci(top1)}{delta}{mark}"
    methods = sorted({m for m, _ in cells}, key=lambda m: (list(METHOD_LABELS).index(m) if m in METHOD_LABELS
                                                          else len(METHOD_LABELS), m))
    return pd.DataFrame([{"method": METHOD_LABELS.get(m, m), **{b: cells.get((m, b), "") for b in settings}}
                         for m in methods])


@one_line_errors(exit=False)
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the directory experiments/report.py wrote (results.csv)")
    parser.add_argument("--readme", type=Path)
    parser.add_argument("--marker", default="METHODS_TABLE",
                        help="the README block to replace, <!-- MARKER --> (one block per host's results directory)")
    args = parser.parse_args(argv)
    csv = args.results / "results.csv"
    if not csv.is_file():
        raise QatError(str(csv), "does not exist", "run the methods_demo sweeps and experiments/report.py first")
    frame = pd.read_csv(csv)
    table = methods_table(frame)
    seeds = ", ".join(str(s) for s in sorted(frame["seed"].unique()))
    marker = "" if args.marker == "METHODS_TABLE" else f" --marker {args.marker}"
    text = (f"Measured by the methods_demo sweeps below (seeds {seeds}), {host_target_line(frame)}. Regenerated by "
            f"`python scripts/methods_table.py {args.results.as_posix()} --readme README.md{marker}`. Cells: "
            "integer top-1, mean ± 95% Student-t half-width over seeds (in brackets: the change against each seed's "
            "own float model, mean ± 95% half-width); † simulated only.\n\n"
            + markdown_table(table))
    return publish({args.marker: (args.results / "methods_table.md", text)}, args.readme)


if __name__ == "__main__":
    raise SystemExit(main())
