"""One run: float -> QAT -> integer model -> accuracy and latency -> record.json in the run directory.

    python experiments/run.py model.width_mult=0.5 quant=w8a8
    python experiments/run.py -m quant=float,w8a8 model.width_mult=0.35,0.5,1.0
    python experiments/run.py -m launcher=submitit_local logger=wandb quant=float,w8a8 train.threads=1
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from _cli import check_overrides, register_schemas  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qat.app import run_app  # noqa: E402
from qat.classification import CLASSIFICATION  # noqa: E402
from qat.errors import one_line_errors  # noqa: E402

register_schemas()


@hydra.main(version_base="1.3", config_path="../configs", config_name="run")
@one_line_errors
def main(cfg: DictConfig) -> float:
    return run_app(cfg, CLASSIFICATION)


if __name__ == "__main__":
    check_overrides("run")
    main()
