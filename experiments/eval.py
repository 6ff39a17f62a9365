"""Evaluate a saved model on a dataset's validation split; write ``eval.json`` into the run directory.

An integer model (``int_model.pt`` of a run) runs on PyTorch's int8 kernels with the architecture, width and
resolution stored in the file; float weights (a state dict, or a run's checkpoint holding one under
``model``) are loaded into ``model.*`` (``qat/evaluation.py``):

    python experiments/eval.py checkpoint=outputs/runs/.../int_model.pt data=demo
    python experiments/eval.py checkpoint=mnv2.pth model=mobilenet_v2 data=imagenet data.root=/datasets/imagenet
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from _cli import check_overrides, register_eval_schemas  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qat.errors import one_line_errors  # noqa: E402
from qat.evaluation import EvalConfig, eval_app, evaluate, is_int_model, load_float  # noqa: E402

register_eval_schemas()


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
@one_line_errors
def main(cfg: DictConfig) -> float:
    return eval_app(cfg, HydraConfig.get().runtime.output_dir)


__all__ = ["EvalConfig", "evaluate", "is_int_model", "load_float", "main"]  # the library's, for the script's callers

if __name__ == "__main__":
    check_overrides("eval")
    main()
