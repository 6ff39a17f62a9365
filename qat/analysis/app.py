"""The report app (``experiments/report.py``, config ``configs/report.yaml``): the report of a results store, or
one paper table beside our runs. Keys are checked here, so bad input is one :class:`QatError` naming a key of
``configs/report.yaml``."""

from __future__ import annotations

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from qat.analysis.report import write_paper_table, write_report
from qat.analysis.tables import get_table
from qat.errors import QatError


def _number(cfg: DictConfig, key: str) -> float | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise QatError(key, f"must be a non-negative number, got {value!r}", f"pass {key}=<number>")
    return float(value)


def report_app(cfg: DictConfig) -> None:
    """Resolve paths against the launch directory and write the report or the paper table."""
    if cfg.get("table") is not None:
        get_table(str(cfg.table))  # an unknown name fails first, listing the names
    for key in ("records", "out"):
        if OmegaConf.is_missing(cfg, key) or not str(cfg[key]).strip():
            raise QatError(key, "not set", f"pass {key}=<path>")
    records, out = to_absolute_path(str(cfg.records)), to_absolute_path(str(cfg.out))
    if cfg.get("table") is not None:
        where = cfg.get("where")
        if where is not None and not isinstance(where, DictConfig):
            raise QatError("where", f"must be a mapping, got {where!r}", "pass 'where={column: value}'")
        where = OmegaConf.to_container(where, resolve=True) if where is not None else {}
        write_paper_table(str(cfg.table), records, out, where=where, dataset_filter=bool(cfg.dataset_filter))
        return
    write_report(records, out, latency_budget_ms=_number(cfg, "latency_budget_ms"),
                 accuracy_drop=_number(cfg, "accuracy_drop"))


__all__ = ["report_app"]
