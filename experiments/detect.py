"""One detection run: SSDLite float -> QAT (or PTQ) of backbone + heads -> integer core -> COCO mAP and latency
-> record, through the same pipeline as experiments/run.py (qat.pipeline.run with the detection task).

    python experiments/detect.py experiment=detect_demo                       # synthetic shapes, minutes on CPU
    python experiments/detect.py -m experiment=detect_demo quant=float,w8a8 model.width_mult=0.5,1.0
    python experiments/detect.py -m experiment=jacob2018_table4_4 data.root=/datasets/coco
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from _cli import check_overrides, register_detect_schemas  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qat.app import run_app  # noqa: E402
from qat.detection.task import DETECTION  # noqa: E402
from qat.errors import one_line_errors  # noqa: E402

register_detect_schemas()


@hydra.main(version_base="1.3", config_path="../configs", config_name="detect")
@one_line_errors
def main(cfg: DictConfig) -> float:
    return run_app(cfg, DETECTION)


if __name__ == "__main__":
    check_overrides("detect")
    main()
