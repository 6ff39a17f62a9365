"""Collect every record under a directory tree into one tidy table: one row per run, one column per field.

    python experiments/collect.py outputs/multirun                 # -> outputs/multirun/records.{csv,parquet}
    python experiments/collect.py outputs --out results/all --name sweep1

Records are read by ``qat.analysis.records.load_records`` (nested fields become dotted columns such as
``accuracy.top1``); unreadable or invalid records are listed on stderr and skipped. Lists and dicts inside a
cell are written as JSON text. Files are written atomically. Parquet needs pyarrow or fastparquet: without
either, the CSV is written and a warning says so. Exit status 2, with one line on stderr, when the directory
does not exist or holds no valid record (``qat/analysis/collect.py``).
"""

from __future__ import annotations

import argparse
import sys

from qat.analysis.collect import collect, collect_app, parquet_engine, tidy
from qat.errors import ArgumentParser, one_line_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="directory searched recursively for record.json")
    parser.add_argument("--out", default=None, help="output directory (default: the records directory)")
    parser.add_argument("--name", default="records", help="file name stem (default: records)")
    return parser.parse_args(argv)


@one_line_errors(exit=False)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    collect_app(args.records, args.out, args.name)
    return 0


__all__ = ["collect", "main", "parquet_engine", "tidy"]  # the library's, for the script's callers

if __name__ == "__main__":
    sys.exit(main())
