"""One run: float -> QAT -> integer model -> accuracy and latency -> record.json in the run directory.

    python experiments/run.py model.width_mult=0.5 quant=w8a8
    python experiments/run.py -m quant=float,w8a8 model.width_mult=0.35,0.5,1.0
    python experiments/run.py -m launcher=submitit_local logger=wandb quant=float,w8a8 train.threads=1
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from _cli import check_overrides, one_line_errors, register_schemas  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from qat.pipeline import run_classification, validate  # noqa: E402
from qat.tracking import open_logger  # noqa: E402

register_schemas()


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


@hydra.main(version_base="1.3", config_path="../configs", config_name="run")
@one_line_errors
def main(cfg: DictConfig) -> float:
    config = OmegaConf.to_object(cfg)
    validate(config)  # bad names and paths stop here, before a tracker run is created
    run_dir = HydraConfig.get().runtime.output_dir
    if int(os.environ.get("RANK", "0")) != 0:  # DDP: rank 0 alone tracks and writes the record
        run_classification(config, run_dir)
        return float("nan")
    with open_logger(config.logger, run_dir, **tracking_context(cfg)) as tracker:
        record = run_classification(config, run_dir, tracker=tracker)
    # the sweep objective is the integer model's top-1; a simulated-only run has none (NaN, never the simulated)
    return float(record["accuracy"].get("top1", float("nan")))


if __name__ == "__main__":
    check_overrides("run")
    main()
