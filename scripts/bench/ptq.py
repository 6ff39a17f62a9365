"""Benchmark: calibration time of post-training methods for MobileNet v2 on the demo data, as ratios to
min/max calibration, and the simulated top-1 of each at W4A8 (issue 8).

Float weights: the ones the pipeline cached for the demo recipe (``~/.cache/qat/float``, same key as
``experiments/run.py experiment=demo``) when present, otherwise trained here for ``--float-epochs`` epochs
(and cached under that recipe's key). One thread throughout.

    .venv/bin/python scripts/bench/ptq.py --widths 0.35 --calibration-batches 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

from _cli import register_schemas  # noqa: E402

from qat.data.imagefolder import classification_transforms  # noqa: E402
from qat.models.registry import build_model  # noqa: E402
from qat.pipeline import cache_dir, float_key, float_weights, load_data  # noqa: E402
from qat.ptq.apply import run_ptq  # noqa: E402
from qat.ptq.config import PtqConfig  # noqa: E402
from qat.quant.config import QuantConfig  # noqa: E402
from qat.quant.prepare import prepare  # noqa: E402
from qat.schema import RunConfig  # noqa: E402
from qat.task import TaskData  # noqa: E402
from qat.train.loop import predict, top1  # noqa: E402


def demo_config(width: float, float_epochs: int | None) -> RunConfig:
    """The README demo's run config at ``width`` (so the float weights share the pipeline's cache key)."""
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("run", overrides=["experiment=demo", f"model.width_mult={width}", "quant=w4a8"])
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, RunConfig)
    if float_epochs is not None:
        config.train = replace(config.train, float_epochs=float_epochs)
    return config


def calibration_loader(data_root: str, cfg: RunConfig) -> DataLoader:
    """Training images with the evaluation transform (no random crops: BN re-estimation and bias correction
    need the statistics the model sees at test time), shuffled with the run's seed."""
    _, val_tf = classification_transforms(cfg.model.resolution, resize_ratio=cfg.data.resize_ratio)
    images = ImageFolder(str(Path(data_root) / "train"), transform=val_tf)
    return DataLoader(images, batch_size=cfg.data.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(cfg.seed))


def methods(args: argparse.Namespace) -> dict[str, PtqConfig]:
    common = {"calibration_batches": args.calibration_batches}
    ada = {"adaquant": True, "adaquant_iterations": args.iterations, "adaquant_batch": args.batch}
    return {
        "minmax": PtqConfig(**common),
        "mse": PtqConfig(calibration_observer="mse", **common),
        "mse+two_tensor": PtqConfig(calibration_observer="mse", two_tensor_threshold=args.two_tensor, **common),
        "adaquant": PtqConfig(**ada, **common),
        "adaquant+bn+bias": PtqConfig(**ada, bn_reestimation=True, bias_correction=True, **common),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.35])
    parser.add_argument("--calibration-batches", type=int, default=2, help="batches of 64 training images")
    parser.add_argument("--iterations", type=int, default=100, help="AdaQuant iterations per layer")
    parser.add_argument("--batch", type=int, default=32, help="AdaQuant batch")
    parser.add_argument("--two-tensor", type=float, default=0.01, help="relative weight MSE threshold")
    parser.add_argument("--float-epochs", type=int, default=None,
                        help="train this many epochs when no cached demo float weights exist (default: the demo's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, W4A8 (weights 4-bit per-channel symmetric, acts 8-bit)")
    for width in args.widths:
        cfg = demo_config(width, args.float_epochs)
        torch.manual_seed(cfg.seed)
        data, info = load_data(cfg)
        model = build_model("mobilenet_v2", width_mult=width, num_classes=info["num_classes"],
                            resolution=cfg.model.resolution)
        cached = cache_dir(cfg) / "float" / f"{float_key(cfg, info)}.pt"
        with tempfile.TemporaryDirectory() as run_dir:
            source = float_weights(model, TaskData(data.train, data.val, info), cfg, Path(run_dir))
        print(f"\nMobileNet v2 width {width:g}, {cfg.model.resolution}x{cfg.model.resolution}, float weights: "
              f"{source if source != 'trained' else f'trained {cfg.train.float_epochs} epochs -> {cached}'}")
        _, pred, targets = predict(model.eval(), data.val, desc="float")
        print(f"  float top-1 {top1(pred, targets):.1f}%  (val {len(targets)} images)")
        q = cfg.quant
        qconfig = QuantConfig(**{k: v for k, v in OmegaConf.to_container(OmegaConf.structured(q)).items()
                                 if k not in ("precision", "calibration_batches")})
        calibration = calibration_loader(info["root"], cfg)
        rows, base = [], None
        for name, ptq in methods(args).items():
            prepared = prepare(model, qconfig, torch.zeros(1, 3, cfg.model.resolution, cfg.model.resolution))
            t = time.perf_counter()
            report = run_ptq(prepared, calibration, ptq)
            seconds = time.perf_counter() - t
            base = base or seconds
            _, pred, _ = predict(prepared, data.val, desc=name)
            extra = ""
            if "two_tensor" in report:
                tt = report["two_tensor"]
                extra = (f"  two-tensor layers {len(tt['layers'])}, +{100 * tt['extra_weight_bits_fraction']:.1f}% "
                         f"weight bits, +{100 * tt['extra_macs_fraction']:.1f}% MACs")
            rows.append((name, seconds, seconds / base, top1(pred, targets), extra))
        print(f"  {'method':<18} {'calib s':>8} {'x min/max':>10} {'top-1 W4A8':>11}")
        for name, seconds, ratio, acc, extra in rows:
            print(f"  {name:<18} {seconds:8.2f} {ratio:10.2f} {acc:10.1f}%{extra}")


if __name__ == "__main__":
    main()
