"""``logger=csv``: metrics appended to ``<run_dir>/metrics.csv`` in tidy long form.

Columns: ``time, phase, step, key, value`` (one row per metric). A resumed run appends; the steps run again
after a kill appear twice, so keep the last row per ``(phase, step, key)`` when reading.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from qat.tracking.base import RunLogger

METRICS_NAME = "metrics.csv"
COLUMNS = ("time", "phase", "step", "key", "value")


class CsvLogger(RunLogger):
    name = "csv"

    def __init__(self, run_dir: str | Path, log_every: int = 1) -> None:
        super().__init__(log_every)
        self.path = Path(run_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(COLUMNS)
            self._file.flush()

    def _rows(self, phase: str, step: int | str, metrics: dict[str, float]) -> None:
        now = f"{time.time():.3f}"
        self._writer.writerows([now, phase, step, key, repr(float(value))] for key, value in metrics.items())
        self._file.flush()

    def log_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        if self.wants_step(step):
            self._rows(phase, step, metrics)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._rows("eval", "", metrics)

    def log_record(self, record: dict[str, Any]) -> None:
        """The record itself is ``record.json`` next to this file; nothing to duplicate."""

    def finish(self, status: str = "ok") -> None:
        if not self._file.closed:
            self._rows("run", "", {"failed": float(status != "ok")})
            self._file.close()
