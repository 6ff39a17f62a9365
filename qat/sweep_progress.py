"""A Hydra callback that says how far a local sweep is: after each job, one line with the jobs done, the time
spent and an estimate of the time left (the mean job time so far times the jobs left), flushed at once so a log
file or a pipe shows it as it happens (issue 15 item 2).

It speaks only where the sweep runs its jobs in its own process (the basic launcher: ``make demo``, a local
``--multirun``); with submitit each job runs elsewhere and its own log is the progress.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def sweep_size(overrides: list[str]) -> int | None:
    """Number of jobs of a basic sweep over ``overrides`` (the product of each sweep override's choices), or
    None when it cannot be told from them (e.g. a sweeper with its own search space)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
        size = 1
        for override in parsed:
            if override.is_sweep_override():
                size *= len(list(override.sweep_string_iterator()))
        return size
    except Exception:  # noqa: BLE001 - any override Hydra's basic sweeper would reject: no total to show
        return None


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class SweepProgress(Callback):
    """``hydra.callbacks.sweep_progress``: ``[sweep] 3/6 jobs done in 2 min 36 s; about 1 min 50 s left``."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.total: int | None = None
        self.done = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.monotonic()
        self.total = sweep_size(list(config.hydra.overrides.task))
        self.done = 0

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.start is None:  # the job runs in another process than the sweep (submitit): nothing to count
            return
        self.done += 1
        spent = time.monotonic() - self.start
        if self.total is None:
            line = f"[sweep] {self.done} jobs done in {duration(spent)}"
        else:
            left = max(self.total - self.done, 0)
            estimate = f"; about {duration(spent / self.done * left)} left" if left else ""
            line = f"[sweep] {self.done}/{self.total} jobs done in {duration(spent)}{estimate}"
        print(line, file=sys.stdout, flush=True)


__all__ = ["SweepProgress", "duration", "sweep_size"]
