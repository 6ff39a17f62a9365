"""Latency app: measure one model, or every model of a multirun tree, on one engine; write latency records.

    python experiments/latency.py int_model=outputs/multirun/X/3 engine=onnxruntime threads=2
    python experiments/latency.py arch=mobilenet_v2 resolution=224 out=results/lat float_engine=onnxruntime
    python experiments/latency.py tree=outputs/multirun/X engine=executorch_xnnpack out=results/store/pc
    python experiments/latency.py -m tree=outputs/multirun/X threads=1,2 launcher=slurm shard=0,1,2,3 num_shards=4

Each measurement runs in a fresh subprocess (threads and CPU affinity fixed, host described) and becomes one
``qat.latency/1`` record (``latency-<device>-<engine>-<model_id>-t<threads>-b<batch>[-r<res>].json``) that
``experiments/report.py`` joins with the accuracy records on ``model_id``. Tree mode needs only the run
directories (record.json, int_model.pt), so it can run on another machine than the training; a model the engine
cannot run is listed as ``unsupported`` with the reason (stderr and ``jobs-latency-*.json``), never measured on
another engine. Config: ``configs/latency_app.yaml``; the app itself: ``qat/latency/app.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from _cli import check_overrides, register_latency_schemas  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from qat.errors import one_line_errors  # noqa: E402
from qat.latency import app  # noqa: E402
from qat.latency.app import LatencyAppConfig, plan  # noqa: E402

register_latency_schemas()


@hydra.main(version_base="1.3", config_path="../configs", config_name="latency_app")
@one_line_errors
def main(dict_cfg: DictConfig) -> int:
    return app.run(OmegaConf.to_object(dict_cfg))  # type: ignore[arg-type]


run = one_line_errors(app.run)
"""The app on a typed config, as the command runs it: bad input exits 2 with one line, before any measurement."""


__all__ = ["LatencyAppConfig", "main", "plan", "run"]  # the library's, for the script's callers

if __name__ == "__main__":
    check_overrides("latency_app")
    main()
