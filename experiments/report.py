"""Hydra app: ``python experiments/report.py records=<runs dir> [out=results/report]``.

Writes ``<out>/results.csv`` and ``<out>/tradeoff.{png,pdf}``; on bad input prints one line to stderr and
exits 1.
"""

from __future__ import annotations

import sys

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from qat.analysis.report import write_report
from qat.errors import QatError


def run(cfg: DictConfig) -> None:
    """Resolve paths against the launch directory and write the report."""
    for key in ("records", "out"):
        if OmegaConf.is_missing(cfg, key) or not str(cfg[key]).strip():
            raise QatError(f"report.{key}", "not set", f"pass {key}=<path>")
    write_report(to_absolute_path(str(cfg.records)), to_absolute_path(str(cfg.out)))


@hydra.main(version_base="1.3", config_path="../configs", config_name="report")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except QatError as exc:
        print(exc.one_line(), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
