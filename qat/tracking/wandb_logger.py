"""``logger=wandb``: Weights & Biases, offline by default (no network; ``wandb sync`` uploads later).

The run lives in ``<run_dir>/wandb/``. Its id is given explicitly with ``resume="allow"``: the training loop
stores the id in its checkpoints, and a resumed or requeued run passes it back here, so W&B continues the
same run instead of starting a new one.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any

from qat.errors import QatError, choice_error
from qat.tracking.base import RunLogger

MODES = ("offline", "online", "disabled")
PHASES = ("float", "qat")


def new_run_id() -> str:
    """A fresh W&B run id: 8 characters from [a-z0-9], like W&B's own."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbLogger(RunLogger):
    name = "wandb"

    def __init__(self, run_dir: str | Path, *, config: dict[str, Any], project: str, entity: str | None,
                 group: str | None, run_name: str | None, tags: list[str], mode: str,
                 resume_id: str | None = None, log_every: int = 1) -> None:
        super().__init__(log_every)
        if mode not in MODES:
            raise choice_error("logger.mode", mode, MODES)
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - wandb is a project dependency
            raise QatError("logger.name", "wandb is not installed", "pip install wandb, or logger=csv") from exc
        self._wandb = wandb
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project, entity=entity, group=group, name=run_name, tags=tags, config=config,
            dir=str(run_dir), id=resume_id or new_run_id(), resume="allow", mode=mode,
            settings=wandb.Settings(console="off"),
        )
        self.run_id = self.run.id
        for phase in PHASES:  # each phase counts its own steps; plot its metrics against them
            self.run.define_metric(f"{phase}/step")
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")

    def log_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        if self.wants_step(step):
            self.run.log({f"{phase}/step": step, **{f"{phase}/{k}": v for k, v in metrics.items()}})

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics))
        self.run.summary.update(dict(metrics))

    def log_record(self, record: dict[str, Any]) -> None:
        self.run.summary.update({"record": record})

    def finish(self, status: str = "ok") -> None:
        if status == "interrupted":
            self.run.mark_preempting()  # W&B expects the run to be resumed (requeue)
        self.run.finish(exit_code=0 if status == "ok" else 1)
        # wandb-core buffers the offline run file until its service stops: stop it now, so the file is
        # complete on disk when the job ends (a later run in this process starts a new service)
        self._wandb.teardown()
