"""Collect every record under a directory tree into one tidy table: one row per run, one column per field.

    python experiments/collect.py outputs/multirun                 # -> outputs/multirun/records.{csv,parquet}
    python experiments/collect.py outputs --out results/all --name sweep1

Records are read by ``qat.analysis.records.load_records`` (nested fields become dotted columns such as
``accuracy.top1``); unreadable or invalid records are listed on stderr and skipped. Lists and dicts inside a
cell are written as JSON text. Files are written atomically. Parquet needs pyarrow or fastparquet: without
either, the CSV is written and a warning says so. Exit status 2, with one line on stderr, when the directory
does not exist or holds no valid record.
"""

from __future__ import annotations

import argparse
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="directory searched recursively for record.json")
    parser.add_argument("--out", default=None, help="output directory (default: the records directory)")
    parser.add_argument("--name", default="records", help="file name stem (default: records)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        table, written, skipped = collect(args.records, args.out or args.records, args.name)
    except QatError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if parquet_engine() is None:
        print(f"warning: {Path(args.out or args.records) / (args.name + '.parquet')} not written: Parquet needs "
              "pyarrow or fastparquet (pip install pyarrow); the CSV holds the same table", file=sys.stderr)
    print(f"{len(table)} records, {len(table.columns)} columns, {len(skipped)} skipped -> "
          + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
