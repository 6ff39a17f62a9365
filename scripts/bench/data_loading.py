"""Benchmark: the classification data pipeline streamed from disk (``data.in_memory=false``: PIL decode and
per-image transforms every epoch) against decode-once (``data.in_memory=true``: uint8 tensors in memory, batched
crop/flip/normalise; qat/data/memory.py).

Prints images/s of one training epoch's data (no model) and of one validation pass, old and new measured
interleaved (A, B, A, B, ...) in one run, medians and the ratio; the one-time decode of the new pipeline; and,
with ``--model-epochs N``, the median seconds of N float training epochs (or their first ``--model-batches``
steps) of MobileNet v2 (``--width``) at the demo's resolution with each pipeline, interleaved, and their ratio.
Uses the demo dataset (generated when missing).

    .venv/bin/python scripts/bench/data_loading.py --repeats 3 --model-epochs 3 --model-batches 40
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qat.data.imagefolder import build_classification_loaders
from qat.data.memory import clear_cache
from qat.data.synthetic import DEMO_DEFAULTS, default_cache_dir, make_demo_dataset
from qat.models.registry import build_model


def drain(loader: torch.utils.data.DataLoader) -> float:
    """Seconds to draw every batch of ``loader``."""
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def train_epoch(model: torch.nn.Module, loader: torch.utils.data.DataLoader, batches: int) -> float:
    """Seconds of one SGD epoch, or of its first ``batches`` steps (channels_last, as the engine trains on CPU)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    t0 = time.perf_counter()
    for _, (images, targets) in zip(range(batches or len(loader)), loader, strict=False):
        loss = F.cross_entropy(model(images.to(memory_format=torch.channels_last)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="an ImageFolder tree (default: the demo set)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=250)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.35, 1.0))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-epochs", type=int, default=0, help="float epochs per pipeline (0: skip)")
    parser.add_argument("--model-batches", type=int, default=0, help="steps per timed epoch (0: the whole epoch)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.root or make_demo_dataset(default_cache_dir() / "data", **DEMO_DEFAULTS)
    modes = {"old": "false", "new": "true"}
    loaders = {name: build_classification_loaders(root, resolution=args.resolution, batch_size=args.batch, seed=0,
                                                  train_crop_scale=tuple(args.crop_scale), in_memory=mode)
               for name, mode in modes.items()}
    evals = {name: build_classification_loaders(root, resolution=args.resolution, batch_size=args.eval_batch,
                                                in_memory=mode).val for name, mode in modes.items()}
    train_images = len(loaders["old"].train) * args.batch
    val_images = len(evals["old"].dataset)
    print(f"{root}: {train_images} training images per epoch (batch {args.batch}), {val_images} validation images "
          f"(batch {args.eval_batch}), {args.resolution} px, {args.threads} thread(s), workers 0")

    clear_cache()
    t0 = time.perf_counter()
    loaders["new"].train.dataset.materialize()
    decode_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    evals["new"].dataset.materialize()
    decode_val = time.perf_counter() - t0
    print(f"new, once per process: decode train {decode_train:.2f} s, decode + resize/crop val {decode_val:.2f} s")

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name in ("old", "new"):
            times.setdefault(("train epoch", name), []).append(drain(loaders[name].train))
            times.setdefault(("val pass", name), []).append(drain(evals[name]))
    print(f"median of {args.repeats} interleaved passes")
    print(f"{'pass':<14}{'old img/s':>11}{'new img/s':>11}{'old s':>8}{'new s':>8}{'new/old speed':>15}")
    for what, count in (("train epoch", train_images), ("val pass", val_images)):
        old, new = (statistics.median(times[what, name]) for name in ("old", "new"))
        print(f"{what:<14}{count / old:>11.0f}{count / new:>11.0f}{old:>8.2f}{new:>8.3f}{old / new:>14.1f}x")

    if args.model_epochs:
        torch.manual_seed(0)
        initial = build_model("mobilenet_v2", width_mult=args.width, num_classes=len(loaders["old"].class_names),
                              resolution=args.resolution).to(memory_format=torch.channels_last)
        state = {k: v.clone() for k, v in initial.state_dict().items()}
        epochs: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.model_epochs):
            for name in ("old", "new"):
                initial.load_state_dict(state)
                epochs[name].append(train_epoch(initial, loaders[name].train, args.model_batches))
        old, new = (statistics.median(epochs[name]) for name in ("old", "new"))
        steps = args.model_batches or len(loaders["old"].train)
        print(f"float training, MobileNet v2 x{args.width} at {args.resolution} px, {steps} steps (median of "
              f"{args.model_epochs} interleaved): old {old:.1f} s, new {new:.1f} s, new/old time {new / old:.2f} "
              f"(saves {100 * (1 - new / old):.0f}%)")


if __name__ == "__main__":
    main()
