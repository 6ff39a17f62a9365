"""Every record under a directory tree in one tidy table: one row per run, one column per field (the collect app,
``experiments/collect.py``).

Records are read by :func:`qat.analysis.records.load_records` (nested fields become dotted columns such as
``accuracy.top1``); unreadable or invalid records are listed and skipped. Lists and dicts inside a cell are
written as JSON text. Files are written atomically. Parquet needs pyarrow or fastparquet: without either, the CSV
is written and a warning says so. A directory that does not exist or holds no valid record is a
:class:`QatError` naming ``records``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import pandas as pd

from qat.analysis.records import load_records
from qat.errors import QatError
from qat.records import atomic_write_bytes

PARQUET_ENGINES = ("pyarrow", "fastparquet")


def parquet_engine() -> str | None:
    """The first installed Parquet engine pandas can use, or ``None``."""
    return next((name for name in PARQUET_ENGINES if importlib.util.find_spec(name) is not None), None)


def _cell(value: object) -> object:
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (list, dict, tuple)) else value


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Scalar cells only (lists and dicts as JSON text), so CSV and Parquet hold the same values."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = out[column].map(_cell)
    return out


def collect(root: str | os.PathLike[str], out_dir: str | os.PathLike[str], name: str = "records"
            ) -> tuple[pd.DataFrame, list[Path], list[tuple[Path, str]]]:
    """Write ``<out_dir>/<name>.csv`` (and ``.parquet`` when an engine is installed).

    Returns ``(table, written paths, skipped records with reasons)``.
    """
    root = Path(root)
    if not root.exists():
        raise QatError("records", f"{root} does not exist", "give the directory that holds the runs")
    frame, skipped = load_records(root)
    if frame.empty:
        raise QatError("records", f"no valid record.json under {root} ({len(skipped)} skipped)",
                       "run experiments/run.py first, or point at the sweep directory")
    table = tidy(frame)
    out = Path(out_dir)
    written = [out / f"{name}.csv"]
    atomic_write_bytes(written[0], table.to_csv(index=False).encode())
    engine = parquet_engine()
    if engine is not None:
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False, engine=engine)
        written.append(out / f"{name}.parquet")
        atomic_write_bytes(written[-1], buffer.getvalue())
    return table, written, skipped


def collect_app(root: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
                name: str = "records") -> None:
    """The collect app: :func:`collect` (into ``root`` unless ``out_dir``), each skipped record and a missing
    Parquet engine on stderr, one summary line on stdout."""
    out = Path(out_dir or root)
    table, written, skipped = collect(root, out, name)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if parquet_engine() is None:
        print(f"warning: {out / (name + '.parquet')} not written: Parquet needs pyarrow or fastparquet (pip install "
              "pyarrow); the CSV holds the same table", file=sys.stderr)
    print(f"{len(table)} records, {len(table.columns)} columns, {len(skipped)} skipped -> "
          + ", ".join(str(p) for p in written))


__all__ = ["PARQUET_ENGINES", "collect", "collect_app", "parquet_engine", "tidy"]
