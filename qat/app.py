"""The Hydra side of a run app (``experiments/run.py``, ``experiments/detect.py``): one run of a task through
:func:`qat.pipeline.run`, tracked by the configured logger. Lives in the library, not beside the scripts, so that
launchers which pickle the job (submitit) find it in the job's process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qat.task import RunTask


def tracking_context(cfg: DictConfig) -> dict[str, Any]:
    """W&B group and run name: runs of one sweep share the sweep directory as group; a single run's group is
    its tag. The logged config is the resolved run config plus Hydra's group choices."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        group = "/".join(Path(str(hc.sweep.dir)).parts[-2:])
        name = f"{Path(str(hc.sweep.dir)).name}/{hc.job.num}:{hc.job.override_dirname}"
    else:
        group, name = str(cfg.tag), Path(hc.runtime.output_dir).name
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    config["hydra_choices"] = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    config["run_dir"] = hc.runtime.output_dir
    return {"group": group, "run_name": name, "config": config}


def run_app(cfg: DictConfig, task: RunTask) -> float:
    """One run of ``task`` through :func:`qat.pipeline.run`, tracked by the configured logger; returns the sweep
    objective: the integer model's accuracy (``task.objective``), NaN for a simulated-only run (never the
    simulated accuracy) and on DDP ranks other than 0 (rank 0 alone tracks and writes the record)."""
    from qat.pipeline import run, validate
    from qat.tracking import open_logger

    config = OmegaConf.to_object(cfg)
    validate(config, task)  # bad names and paths stop here, before a tracker run is created
    run_dir = HydraConfig.get().runtime.output_dir
    if int(os.environ.get("RANK", "0")) != 0:
        run(config, run_dir, task)
        return float("nan")
    with open_logger(config.logger, run_dir, **tracking_context(cfg)) as tracker:
        record = run(config, run_dir, task, tracker=tracker)
    return float(record["accuracy"].get(task.objective, float("nan")))


__all__ = ["run_app", "tracking_context"]
