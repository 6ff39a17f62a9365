"""Experiment tracking: a logger per run (``none``, ``csv``, ``wandb``) and unique run directories.

Importing this package registers the ``${qat_unique:}`` resolver used by ``configs/run.yaml``: submitit
workers import it while unpickling the task function, before they resolve the job's run directory.
"""

from qat.tracking.base import RunLogger
from qat.tracking.factory import LOGGERS, RUN_ID_KEY, build_logger, find_run_id, open_logger
from qat.tracking.rundir import register_resolvers

register_resolvers()

__all__ = ["LOGGERS", "RUN_ID_KEY", "RunLogger", "build_logger", "find_run_id", "open_logger",
           "register_resolvers"]
