"""Choose the run's logger from ``cfg.logger`` and manage its life: resume id, finish status."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qat.errors import choice_error
from qat.tracking.base import RunLogger
from qat.tracking.csv_logger import CsvLogger
from qat.tracking.wandb_logger import WandbLogger

log = logging.getLogger("qat")

LOGGERS = ("none", "csv", "wandb")
RUN_ID_KEY = "tracking_run_id"
"""Key of the tracker's run id in training checkpoints (``qat.pipeline.fit``)."""


def find_run_id(run_dir: str | Path) -> str | None:
    """The tracker run id stored in the newest ``<run_dir>/checkpoints/*_last.pt``, or ``None``."""
    from qat.train.checkpoint import load_checkpoint

    checkpoints = sorted((Path(run_dir) / "checkpoints").glob("*_last.pt"), key=lambda p: p.stat().st_mtime)
    for path in reversed(checkpoints):
        run_id = load_checkpoint(path).get(RUN_ID_KEY)
        if run_id:
            return str(run_id)
    return None


def build_logger(logger_cfg: Any, run_dir: str | Path, *, config: dict[str, Any], group: str | None,
                 run_name: str | None, resume_id: str | None = None) -> RunLogger:
    """The logger named by ``logger_cfg.name`` (a ``qat.schema.LoggerConfig``)."""
    name = logger_cfg.name
    if name == "none":
        return RunLogger(logger_cfg.log_every)
    if name == "csv":
        return CsvLogger(run_dir, logger_cfg.log_every)
    if name == "wandb":
        return WandbLogger(run_dir, config=config, project=logger_cfg.project, entity=logger_cfg.entity,
                           group=logger_cfg.group or group, run_name=run_name, tags=list(logger_cfg.tags),
                           mode=logger_cfg.mode, resume_id=resume_id, log_every=logger_cfg.log_every)
    raise choice_error("logger.name", name, LOGGERS)


@contextlib.contextmanager
def open_logger(logger_cfg: Any, run_dir: str | Path, *, config: dict[str, Any], group: str | None,
                run_name: str | None) -> Iterator[RunLogger]:
    """A logger that continues the tracked run of ``run_dir``'s checkpoints and is always finished:
    ``ok``, ``failed`` on an exception (W&B exit code 1), ``interrupted`` on SystemExit/KeyboardInterrupt
    (a signal, submitit's preemption requeue)."""
    resume_id = find_run_id(run_dir) if logger_cfg.name == "wandb" else None
    if resume_id:
        log.info("[tracking] continuing %s run %s", logger_cfg.name, resume_id)
    logger = build_logger(logger_cfg, run_dir, config=config, group=group, run_name=run_name,
                          resume_id=resume_id)
    try:
        yield logger
    except Exception:
        logger.finish("failed")
        raise
    except BaseException as exc:
        ok = isinstance(exc, SystemExit) and exc.code in (None, 0)
        logger.finish("ok" if ok else "interrupted")
        raise
    logger.finish("ok")
