"""Hydra app: the report, or one paper table beside our runs (``qat/analysis/app.py``).

``python experiments/report.py records=<runs dir> [out=results/report] [latency_budget_ms=2] [accuracy_drop=1]``
writes ``results.csv``, ``summary.csv``, ``fidelity.csv``, ``summary.md`` and the figures the data supports (PNG
and PDF). ``python experiments/report.py table=<name> records=<runs dir> out=<dir> [where={model.arch: resnet50}]``
writes ``<name>.md``, ``.tex`` and ``.csv``. On bad input prints one line, ``error: <key>: <problem> (<fix>)``,
naming a key of ``configs/report.yaml``, to stderr and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from _cli import check_overrides  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qat.analysis.app import report_app  # noqa: E402
from qat.errors import one_line_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="report")
@one_line_errors
def main(cfg: DictConfig) -> None:
    report_app(cfg)


if __name__ == "__main__":
    check_overrides("report")
    main()
