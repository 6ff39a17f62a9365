"""Worker for tests/test_distributed.py and tests/test_range_sync.py, alone or under torchrun.

Every rank sees disjoint shards of one seeded permutation (DistributedSampler); with a per-rank batch of
B / world_size the global batches equal a single process's batches of B, so DDP's averaged gradients and the
final weights must match the single-process run.

``ddp_worker.py OUT`` trains a small float network one ``fit`` epoch at a time; rank 0 writes the weights to
``OUT``. ``ddp_worker.py --ranges DIR`` runs the quantizer-range scenarios of tests/test_range_sync.py (QAT of
small prepared networks: calibration, training, an interrupted and resumed run, a run without range
synchronization) and every rank writes what it holds to ``DIR/ranges-rank<r>-of<world>.pt``.
``ddp_worker.py --detection COCO_ROOT OUT [--per-rank-n]`` runs the QAT phase of a small SSDLite detector on that
COCO-layout set (no flips: the ranks' random streams differ from one process's); rank 0 writes the prepared
core's state (calibrated, trained) to ``OUT``. ``--per-rank-n`` divides each rank's SSD loss by its own matched
boxes instead of the global batch's (torchvision's references; the control of the test).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from conftest import EngineSettings
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from qat.train.distributed import Runtime, setup, teardown

GLOBAL_BATCH = 16


def main(out: Path) -> None:
    from qat.data.imagefolder import ClassificationData
    from qat.pipeline import fit
    from qat.schema import RunConfig

    torch.set_num_threads(1)
    runtime = setup("cpu")
    torch.manual_seed(0)
    images = torch.randn(128, 3, 8, 8)
    labels = torch.randint(0, 4, (128,))
    dataset = TensorDataset(images, labels)
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // runtime.world_size, sampler=sampler)
    data = ClassificationData(loader, loader, ["a", "b", "c", "d"])
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    cfg = RunConfig()
    cfg.optim.weight_decay = 0.0
    fit(model, data, cfg, phase="float", epochs=2, lr=0.1, checkpoint=out.parent / f"ckpt-{out.stem}.pt",
        runtime=runtime)
    if runtime.is_main:
        torch.save(model.state_dict(), out)
    teardown()


# --- quantizer ranges under DDP (tests/test_range_sync.py) ---------------------------------------------------

RANGE_IMAGES = 64  # 4 global batches of 16: 4 steps per epoch
QAT_EPOCHS = 2
INTERRUPT_AT = 7  # the interrupted run stops before this step; its last checkpoint is step 6 (mid-epoch 2)


class _Interrupted(Exception):
    pass


def _float_model(bn: bool) -> nn.Module:
    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def _loader(runtime: Runtime) -> DataLoader:
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(RANGE_IMAGES, 3, 8, 8, generator=gen)
    images[::5] *= 4.0  # a few wide images: the batch extremes sit on one rank or the other
    labels = torch.randint(0, 4, (RANGE_IMAGES,), generator=gen)
    sampler = DistributedSampler(TensorDataset(images, labels), num_replicas=runtime.world_size,
                                 rank=runtime.rank, shuffle=True, seed=3)
    return DataLoader(TensorDataset(images, labels), batch_size=GLOBAL_BATCH // runtime.world_size,
                      sampler=sampler)


def _prepared(runtime: Runtime, loader: DataLoader, *, observer: str, bn: bool, sync_calibration: bool
              ) -> nn.Module:
    """A seeded small network prepared for QAT and calibrated on the first 2 batches (synchronized across
    ranks, or each rank on its shard alone as the app calibrates today)."""
    from qat.quant import range_sync
    from qat.quant.config import QuantConfig
    from qat.quant.prepare import calibration_mode, prepare

    model = prepare(_float_model(bn), QuantConfig(act_observer=observer), torch.randn(1, 3, 8, 8))
    sync = range_sync.synchronized() if sync_calibration else contextlib.nullcontext()
    loader.sampler.set_epoch(0)  # as in a fresh process (an earlier fit left the sampler at its last epoch)
    with sync, calibration_mode(model), torch.no_grad():
        for i, (images, _) in enumerate(loader):
            if i >= 2:
                break
            model(images)
    return model


def _fit(model: nn.Module, loader: DataLoader, runtime: Runtime, checkpoint: Path, epochs: int = QAT_EPOCHS,
         stop_at: int | None = None) -> None:
    from qat.quant.schedule import QuantSchedule
    from qat.train.engine import Task, fit
    from qat.train.loop import OptimConfig, classification_loss

    sched = QuantSchedule()

    def before_step(step: int) -> None:
        if stop_at is not None and step >= stop_at:
            raise _Interrupted(step)
        sched.apply(model, step)

    fit(model, loader, Task(classification_loss), train=EngineSettings(checkpoint_every_steps=3),
        optim=OptimConfig(weight_decay=0.0), seed=0,
        phase="qat", epochs=epochs, lr=0.02, checkpoint=checkpoint, before_step=before_step, runtime=runtime)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ranges_main(out_dir: Path) -> None:
    from qat.quant import range_sync
    from qat.train.checkpoint import read_checkpoint_file

    torch.set_num_threads(1)
    runtime = setup("cpu")
    loader = _loader(runtime)
    tag = f"rank{runtime.rank}-of{runtime.world_size}"
    result: dict[str, Any] = {}
    first = next(iter(loader))[0]  # this rank's first batch: its own extremes (the shards must differ)
    result["local_first_batch"] = torch.stack([first.min(), first.max()])

    # min/max-based observers: synchronized calibration, then QAT; no batch norm, so the global-batch single
    # process is the reference (weights agree up to the gradient all-reduce's float summation order)
    for observer in ("ema", "minmax", "current", "percentile", "mse", "lsq_plus"):
        model = _prepared(runtime, loader, observer=observer, bn=False, sync_calibration=True)
        result[f"{observer}/calibrated"] = _state(model)
        _fit(model, loader, runtime, out_dir / f"ckpt-{observer}-{tag}.pt", epochs=1 if observer == "mse" else 2)
        result[f"{observer}/trained"] = _state(model)

    # the app's flow: each rank calibrates on its shard (DDP's construction broadcasts rank 0's ranges), folded
    # batch norm (Jacob eq. 14), checkpoints every 3 steps
    model = _prepared(runtime, loader, observer="ema", bn=True, sync_calibration=False)
    _fit(model, loader, runtime, out_dir / f"ckpt-bn-{tag}.pt")
    result["bn/trained"] = _state(model)

    # the same run interrupted before step INTERRUPT_AT, then resumed by a fresh process state from the
    # checkpoint rank 0 wrote (mid-epoch)
    resumed = out_dir / f"ckpt-resumed-{tag.split('-')[1]}.pt"  # one file for all ranks, like the app's
    model = _prepared(runtime, loader, observer="ema", bn=True, sync_calibration=False)
    with contextlib.suppress(_Interrupted):
        _fit(model, loader, runtime, resumed, stop_at=INTERRUPT_AT)
    del model
    gc.collect()
    runtime.barrier()  # rank 0 has written its last checkpoint
    saved = read_checkpoint_file(resumed)
    result["resumed/from_step"] = saved["step"]
    result["resumed/checkpoint_model"] = saved["model"]
    model = _prepared(runtime, loader, observer="ema", bn=True, sync_calibration=False)
    _fit(model, loader, runtime, resumed)
    result["resumed/trained"] = _state(model)

    # control: the same QAT without synchronization (each rank's ranges follow its own shards)
    install, range_sync.install = range_sync.install, lambda ddp: None
    try:
        model = _prepared(runtime, loader, observer="ema", bn=False, sync_calibration=False)
        _fit(model, loader, runtime, out_dir / f"ckpt-unsynced-{tag}.pt")
        result["unsynced/trained"] = _state(model)
    finally:
        range_sync.install = install
    torch.save(result, out_dir / f"ranges-{tag}.pt")
    if runtime.distributed:
        dist.barrier()
    teardown()


# --- detection QAT under DDP (tests/test_distributed.py) -----------------------------------------------------

DETECTION_RESOLUTION = 64


def detection_main(root: Path, out: Path, per_rank_n: bool) -> None:
    """The QAT phase of SSDLite (MobileNet v2 x0.35): prepared core, calibration combined across the ranks, batch
    norm folded with frozen statistics from the first step, the SSD loss normalized by the global batch's matched
    boxes (qat.detection.train.detection_loss). One step per global batch of the set (the test's set is one
    batch) at a small learning rate, the quantizers observing but not quantizing (delays beyond the run): the
    float noise of batch-shape-dependent kernels (about 1e-6) flips single LSBs when rounding is on and swaps
    hard negatives at the mining cut-off; an untrained detector's gradients are chaotic under both (measured:
    input noise of 1e-6 changes its float gradients by 7%, 1e-7 its quantized ones by more than 100%; a second
    step turned a 0.6% gap into 96% on an AMD EPYC host), so only the first step can be compared exactly."""
    from qat.detection import train as detection_train
    from qat.detection.data import CocoDetectionSet, check_split, collate, detection_transforms
    from qat.detection.models import build_detector
    from qat.detection.task import with_core
    from qat.quant import range_sync
    from qat.quant.config import QuantConfig
    from qat.quant.prepare import calibration_mode, prepare
    from qat.quant.schedule import QuantSchedule
    from qat.train.engine import Task, fit
    from qat.train.loop import OptimConfig

    torch.set_num_threads(1)
    runtime = setup("cpu")
    if per_rank_n:  # each rank's N alone: the global count reported as world_size x the local one
        detection_train.global_sum = lambda value: (value * runtime.world_size, runtime.world_size)
    split = check_split(root, "train2017", keep_annotations=False)
    dataset = CocoDetectionSet(split, detection_transforms(DETECTION_RESOLUTION, True, hflip=0.0))
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // runtime.world_size, sampler=sampler, collate_fn=collate)
    torch.manual_seed(0)
    detector = build_detector("mobilenet_v2", num_categories=split.num_categories, width_mult=0.35,
                              resolution=DETECTION_RESOLUTION)
    # running statistics as float training leaves them, from the whole set (the same on every rank): batch norm
    # folds with them from the first QAT step
    for module in detector.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average
    detector.train()
    with torch.no_grad():
        for images, _ in DataLoader(dataset, batch_size=GLOBAL_BATCH, collate_fn=collate):
            detector.core(detector.shell.transform(images)[0].tensors)
    example = torch.zeros(1, 3, DETECTION_RESOLUTION, DETECTION_RESOLUTION)
    core = prepare(detector.core, QuantConfig(), example)
    quantized = with_core(detector, core)
    loader.sampler.set_epoch(0)
    with range_sync.synchronized(), calibration_mode(core), torch.no_grad():
        for i, (images, _) in enumerate(loader):
            if i >= 2:
                break
            core(quantized.shell.transform(images)[0].tensors)
    calibrated = _state(core)
    never = 10**9
    sched = QuantSchedule(weight_quant_delay=never, act_quant_delay=never)
    fit(quantized, loader, Task(detection_train.detection_loss), train=EngineSettings(checkpoint_every_steps=3),
        optim=OptimConfig(weight_decay=0.0),
        seed=0, phase="qat", epochs=1, lr=1e-5, checkpoint=out.parent / f"ckpt-{out.stem}.pt",
        before_step=lambda step: sched.apply(core, step), runtime=runtime)
    if runtime.is_main:
        torch.save({"calibrated": calibrated, "trained": _state(core)}, out)
    teardown()


if __name__ == "__main__":
    if sys.argv[1] == "--ranges":
        ranges_main(Path(sys.argv[2]))
    elif sys.argv[1] == "--detection":
        detection_main(Path(sys.argv[2]), Path(sys.argv[3]), per_rank_n="--per-rank-n" in sys.argv[4:])
    else:
        main(Path(sys.argv[1]))
