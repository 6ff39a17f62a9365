"""Tables the README shows, regenerated from files under ``results/`` (never typed): a Markdown table from a
DataFrame, and the replacement of a marked block (``<!-- NAME -->`` ... ``<!-- /NAME -->``) of a text file."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from qat.errors import QatError
from qat.records import atomic_write_bytes


def markdown_table(frame: pd.DataFrame, formats: Mapping[str, str] | None = None, default: str = "{:.1f}") -> str:
    """``frame`` as a Markdown table; floats formatted per column (``formats``) or with ``default``; NaN as —."""
    formats = formats or {}

    def cell(value: object, column: str) -> str:
        if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
            return "—"
        if isinstance(value, float):
            return formats.get(column, default).format(value)
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v, c) for v, c in zip(row, frame.columns, strict=True)) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def replace_block(text: str, marker: str, block: str) -> str:
    """``text`` with the block between ``<!-- marker -->`` and ``<!-- /marker -->`` replaced by ``block`` (the
    end marker is added after a lone start marker). Raises :class:`QatError` when there is no start marker."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if end in text:
        return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{block}{end}", text,
                      flags=re.S)
    if start not in text:
        raise QatError("--readme", f"has no {start} marker", "add it on a line of its own where the table goes")
    return text.replace(start, f"{start}\n{block}{end}", 1)


def update_file(path: str | os.PathLike[str], marker: str, block: str) -> None:
    """Replace the marked block of the file at ``path`` (atomically)."""
    path = Path(path)
    atomic_write_bytes(path, replace_block(path.read_text(), marker, block).encode())


def publish(tables: Mapping[str, tuple[Path, str]], readme: str | os.PathLike[str] | None = None) -> int:
    """Each ``marker: (md_path, text)`` of ``tables`` written to its ``.md`` file and, with ``readme``, into the
    README's ``<!-- marker -->`` block, then printed. Returns a script's exit code: 0, or 2 after one ``error:``
    line when the README lacks a marker (the ``.md`` files are written first)."""
    for md, text in tables.values():
        atomic_write_bytes(md, text.encode())
    if readme is not None:
        try:
            for marker, (_, text) in tables.items():
                update_file(readme, marker, text)
        except QatError as exc:
            print(f"error: {exc.one_line()}", file=sys.stderr)
            return 2
    print("\n".join(text for _, text in tables.values()))
    return 0
