"""The logger interface of a run, and the ``none`` logger (everything is a no-op).

A run always writes its record locally (``qat.records.write_record``); a logger only *adds* a copy of the
configuration, per-step training metrics and the final record somewhere else (a CSV file, Weights & Biases).
"""

from __future__ import annotations

from typing import Any

STATUSES = ("ok", "failed", "interrupted")
"""How a run ended: finished, raised an error, or was stopped from outside (signal, preemption, Ctrl-C)."""


class RunLogger:
    """Base class and ``logger=none``: receives metrics and drops them.

    ``run_id`` is the tracker's own identity of the run (the W&B run id); the training loop stores it in its
    checkpoints so that a resumed or requeued run continues the same tracked run.
    """

    name = "none"
    run_id: str | None = None

    def __init__(self, log_every: int = 1) -> None:
        self.log_every = max(int(log_every), 1)

    def wants_step(self, step: int) -> bool:
        """True for the steps that are logged (every ``log_every``-th, counting from step 0)."""
        return step % self.log_every == 0

    def log_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        """Per-step training metrics of ``phase`` (``float`` or ``qat``): loss, lr, epoch."""

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Run-level metrics (top-1 of the float, simulated and integer models)."""

    def log_record(self, record: dict[str, Any]) -> None:
        """The final record, exactly as written to ``record.json``."""

    def finish(self, status: str = "ok") -> None:
        """Close the tracked run; ``status`` is one of :data:`STATUSES`."""
