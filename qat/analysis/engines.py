"""Every int8 engine of a run beside the simulated model: one row per (run, engine) from the record's
``fidelity.engines`` block, the report's per-configuration fidelity table, and the line naming the host(s) and
target(s) the runs were made on.

A record without ``fidelity.engines`` (written before several engines were evaluated) gives one row, its primary
engine's: ``fidelity.primary_engine`` or else the engine of its own latency measurement, with the top-level
fidelity numbers (``fidelity.sim_vs_int_top1_agreement``, ``fidelity.logit_*``) and the integer accuracy
(``accuracy.int_top1`` / ``int_map``). Float and simulated-only runs have no integer engine and give no row.
Differences from the simulated model are in output LSBs, or in real units (``unit == "real"``) where the model
has no output quantizer; for detection they are the differences of the detector core's outputs.
"""

from __future__ import annotations

import ast
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from qat.analysis.plots import model_label
from qat.analysis.records import simulated_mask

ENGINES = "fidelity.engines."
ROW_COLUMNS = ("configuration", "engine", "primary", "status", "reason", "metric_name", "int", "sim",
               "agreement_with_sim", "unit", "max_abs_diff", "mean_abs_diff", "within_1lsb", "target", "host_flags",
               "record")  # fmt: skip
"""The columns of :func:`engine_rows`: ``int`` / ``sim`` are the integer model's accuracy on the engine and the
simulated model's (``metric_name``: top1 or map, percent); ``record`` is the run's record path."""

TABLE_COLUMNS = ("configuration", "engine", "primary", "status", "reason", "n", "metric_name", "int", "sim", "gap",
                 "agreement_with_sim", "unit", "max_abs_diff", "mean_abs_diff", "within_1lsb", "target",
                 "host_flags")  # fmt: skip
"""The columns of :func:`engine_fidelity_table` (``gap`` = int − sim, points; means over the ``n`` runs)."""

DIFF_FIELDS = {
    ("logit", "lsb"): ("logit_max_abs_diff_lsb", "logit_mean_abs_diff_lsb", "logits_within_1lsb"),
    ("logit", "real"): ("logit_max_abs_diff", "logit_mean_abs_diff", None),
    ("core", "lsb"): ("core_max_abs_diff_lsb", "core_mean_abs_diff_lsb", "core_within_1lsb"),
}  # fmt: skip
"""(output kind, unit) -> the fidelity fields of the max and mean |difference| and the share within 1 LSB."""

FLAGS_SHOWN = ("avx2", "avx512_vnni", "avx_vnni")
"""The host's CPU flags that decide an x86 int8 target (VNNI or not)."""


def _width(value: object) -> str | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value if isinstance(value, str) else str(int(value))  # type: ignore[call-overload]


def bits_label(row: pd.Series) -> str:
    """``"w8a8"`` from ``quant.weight_bits`` / ``quant.act_bits`` (``"w4/8a4/8"`` where layers differ,
    :func:`qat.analysis.records.add_derived_columns`); ``"?"`` where either is missing."""
    w, a = _width(row.get("quant.weight_bits")), _width(row.get("quant.act_bits"))
    return f"w{w}a{a}" if w and a else "?"


def _number(value: Any) -> float:
    """``value`` as a float; NaN where it is missing or not a number."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def _text(value: Any) -> str | None:
    """A non-empty string value, or ``None``."""
    return value if isinstance(value, str) and value else None


def _flags(value: Any) -> list[str]:
    """A flag list from a record (a list, or its ``str`` as read back from a CSV)."""
    if isinstance(value, str) and value.startswith("["):
        value = ast.literal_eval(value)
    return [str(f) for f in value] if isinstance(value, (list, tuple)) else []


def host_flags(row: pd.Series) -> str:
    """The flags of :data:`FLAGS_SHOWN` the run's host has (``host.cpu_flags``, else ``target.host_flags``),
    space-separated."""
    flags = next((f for f in (_flags(row.get(k)) for k in ("host.cpu_flags", "target.host_flags")) if f), [])
    return " ".join(f for f in FLAGS_SHOWN if f in flags)


def isa_overrides(row: pd.Series) -> str:
    """`` (FBGEMM_ENABLE_INSTRUCTIONS=AVX2)`` where the run restricted an engine's kernels (the record's
    ``target.isa_overrides``): the host's flags alone would then misdescribe what the engines ran."""
    pairs = [(str(k).removeprefix("target.isa_overrides."), v) for k, v in row.items()
             if str(k).startswith("target.isa_overrides.") and isinstance(v, str)]
    return "".join(f" ({k}={v})" for k, v in pairs)


def integer_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per record of a quantized run with an integer model (not float, not simulated only)."""
    runs = df[~simulated_mask(df)]
    if "quant.precision" in runs.columns:
        runs = runs[runs["quant.precision"].astype(str) != "float"]
    return runs.drop_duplicates("record_path") if "record_path" in runs.columns else runs


def configuration_labels(df: pd.DataFrame) -> pd.Series:
    """Per row: model (with the architecture when there are several), bits and method, and the target when the
    rows have several (``"w0.5 r32 w8a8 qat"``, ``"mobilenet_v2 w1.0 r224 w8a8 qat · x86_vnni"``)."""
    if df.empty:
        return pd.Series(dtype=str, index=df.index)
    with_arch = "model.arch" in df.columns and df["model.arch"].nunique() > 1
    labels = df.apply(lambda r: f"{model_label(r, with_arch=with_arch)} {bits_label(r)} {r.get('method', '')}"
                      .strip(), axis=1)
    if "target.name" in df.columns and df["target.name"].nunique() > 1:
        labels = labels + " · " + df["target.name"].fillna("no target").astype(str)
    return labels


def engine_names(df: pd.DataFrame) -> list[str]:
    """The engines any record of ``df`` names in ``fidelity.engines`` (column order)."""
    names = [c.removeprefix(ENGINES).removesuffix(".status") for c in df.columns
             if c.startswith(ENGINES) and c.endswith(".status")]
    return [n for n in names if "." not in n]


def _differences(get: Callable[[str], Any]) -> dict[str, Any]:
    """``unit``, ``max_abs_diff``, ``mean_abs_diff`` and ``within_1lsb`` from the first kind of field present."""
    for (_, unit), (high, mean, within) in DIFF_FIELDS.items():
        if math.isfinite(_number(get(high))):
            return {"unit": unit, "max_abs_diff": _number(get(high)), "mean_abs_diff": _number(get(mean)),
                    "within_1lsb": _number(get(within)) if within else math.nan}
    return {"unit": None, "max_abs_diff": math.nan, "mean_abs_diff": math.nan, "within_1lsb": math.nan}


def _engine_row(run: pd.Series, name: str, primary: bool, get: Callable[[str], Any]) -> dict[str, Any]:
    """One engine of one run; the primary engine's accuracy is the record's integer accuracy."""
    metric = str(run.get("metric_name")) if _text(run.get("metric_name")) else "top1"
    values = [_number(get(metric))]
    if primary:
        values = [_number(run.get(f"accuracy.int_{metric}")), *values, _number(run.get("metric"))]
    status = _text(get("status")) or "ok"
    return {"engine": name, "primary": primary, "status": status, "reason": _text(get("reason")),
            "metric_name": metric, "int": next((v for v in values if math.isfinite(v)), math.nan),
            "sim": _number(run.get(f"accuracy.sim_{metric}")), "agreement_with_sim": _number(get("agreement_with_sim")),
            **_differences(get), "target": _text(run.get("target.name")), "host_flags": host_flags(run),
            "record": run.get("record_path")}


def _run_engines(run: pd.Series, names: list[str]) -> list[dict[str, Any]]:
    """The engine rows of one run: every engine of its ``fidelity.engines`` (primary first), or its primary's."""
    primary = _text(run.get("fidelity.primary_engine"))
    present = [n for n in names if _text(run.get(f"{ENGINES}{n}.status"))]
    if present:
        return [_engine_row(run, n, n == primary, lambda f, n=n: run.get(f"{ENGINES}{n}.{f}"))
                for n in sorted(present, key=lambda n: (n != primary, n))]
    source = run.get("latency.source")  # a separate measurement's engine did not give the integer accuracy
    own = _text(run.get("latency.engine")) if not isinstance(source, str) or source == "record" else None
    alias = {"agreement_with_sim": "sim_vs_int_top1_agreement"}
    row = _engine_row(run, primary or own or "not recorded", True,
                      lambda f: run.get(f"fidelity.{alias.get(f, f)}"))
    return [row] if math.isfinite(row["int"]) else []


def engine_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, int8 engine) of the quantized runs of ``df`` (columns :data:`ROW_COLUMNS`); a run
    joined with several latency measurements counts once."""
    runs = integer_runs(df)
    labels = configuration_labels(runs)
    names = engine_names(runs)
    rows = [{"configuration": label, **row} for label, (_, run) in zip(labels, runs.iterrows(), strict=True)
            for row in _run_engines(run, names)]
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def _joined(values: pd.Series) -> str | None:
    """The distinct non-empty values, sorted, comma-separated; ``None`` if there are none."""
    distinct = sorted({str(v) for v in values.dropna() if str(v)})
    return ", ".join(distinct) or None


def engine_fidelity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and int8 engine (columns :data:`TABLE_COLUMNS`): status (and why unsupported), the
    number of runs ``n``, means over them of the integer and simulated accuracy, their gap, the top-1 agreement
    with the simulated model and the output differences, and the target(s) and host flags of the runs.
    Configurations keep the order of the runs; the primary engine comes first in each."""
    rows = engine_rows(df)
    if rows.empty:
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    rows["gap"] = rows["int"] - rows["sim"]
    means = ("int", "sim", "gap", "agreement_with_sim", "max_abs_diff", "mean_abs_diff", "within_1lsb")
    table = rows.groupby(["configuration", "engine", "status", "unit"], sort=False, dropna=False).agg(
        primary=("primary", "any"), reason=("reason", _joined), n=("engine", "size"),
        metric_name=("metric_name", "first"), **{c: (c, "mean") for c in means},
        target=("target", _joined), host_flags=("host_flags", _joined)).reset_index()
    order = {c: i for i, c in enumerate(dict.fromkeys(rows["configuration"]))}
    table = table.assign(_order=table["configuration"].map(order), _other=~table["primary"])
    table = table.sort_values(["_order", "_other", "engine", "status"], kind="mergesort")
    return table[list(TABLE_COLUMNS)].reset_index(drop=True)


def _host(run: pd.Series) -> str | None:
    """``"<cpu> · <cores> cores · <flags>"`` for one run's host (the parts it records); ``None`` if none."""
    cores = _number(run.get("host.cores"))
    parts = [_text(run.get("host.cpu")), f"{int(cores)} cores" if math.isfinite(cores) else None,
             (host_flags(run) + isa_overrides(run)).strip() or None]
    return " · ".join(p for p in parts if p) or None


def host_target_line(df: pd.DataFrame) -> str:
    """The host(s) and target(s) of the quantized runs of ``df``: ``"host: AMD EPYC 9654 · 2 cores · avx2
    avx512_vnni — target x86_vnni"``; several are listed (``hosts: A; B — targets x86_avx2, x86_vnni``), and
    older records without them give ``host unknown`` / ``target not recorded``. Without quantized runs, the hosts
    of all runs."""
    runs = integer_runs(df)
    hosts = list(dict.fromkeys(h for _, run in (runs if len(runs) else df).iterrows() if (h := _host(run))))
    targets = sorted({t for t in runs.get("target.name", pd.Series(dtype=object)) if _text(t)})
    host = f"host{'s' if len(hosts) > 1 else ''}: {'; '.join(hosts)}" if hosts else "host unknown"
    target = f"target{'s' if len(targets) > 1 else ''} {', '.join(targets)}" if targets else "target not recorded"
    return f"{host} — {target}"


__all__ = ["bits_label", "configuration_labels", "engine_fidelity_table", "engine_rows", "host_target_line",
           "integer_runs", "isa_overrides"]
