"""Data-parallel training (DDP) and device / mixed-precision choice, in one place.

Started by ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or by submitit on SLURM (one task per
GPU; submitit's environment is exported to the same variables). NCCL on GPU, gloo on CPU. Rank 0 alone
writes checkpoints, evaluates, converts, measures latency and writes the record; the others train and wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qat.errors import QatError, choice_error
from qat.quant import range_sync
from qat.quant.lsq import step_parameters

log = logging.getLogger("qat")

DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its rank in the job and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _export_submitit_environment() -> None:
    """Under submitit with several tasks, expose RANK/WORLD_SIZE/... as torchrun would (once)."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(device: str = "auto") -> Runtime:
    """Initialise the process group when launched with several processes; pick the device."""
    if device not in DEVICES:
        raise choice_error("train.device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise QatError("train.device", "cuda was asked for but no GPU is visible", "use train.device=cpu or auto")
    _export_submitit_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    target = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend)
        log.info("[ddp] rank %d/%d on %s (%s)", rank, world_size, target, backend)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, runtime: Runtime) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes (buffers — BN running
    statistics — are broadcast from rank 0 at each forward, as in torchvision's reference scripts).

    Its construction broadcasts rank 0's parameters and buffers, quantizer ranges included (so ranks start
    from rank 0's calibration); in each of its forward passes the activation quantizers combine their batch
    statistics across the ranks (:mod:`qat.quant.range_sync`), so every rank updates the same ranges from the
    global batch and fake-quantizes with the same (S, Z); the checkpoint rank 0 writes holds them."""
    if not runtime.distributed:
        return model
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # learned step sizes (qat.quant.lsq) sit unused while their quantizer waits (schedule.act_quant_delay)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                              find_unused_parameters=bool(step_parameters(model)))
    range_sync.install(ddp)
    return ddp


def global_sum(value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``value`` summed over the job's ranks, and the number of ranks (``value`` itself and 1 outside DDP). A
    collective: every rank must call it at the same point."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value, 1
    total = value.detach().clone()
    dist.all_reduce(total)
    return total, dist.get_world_size()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` (none | fp16 | bf16); fp16 needs a GPU."""
    if name not in AMP_DTYPES:
        raise choice_error("train.amp", name, AMP_DTYPES)
    dtype = AMP_DTYPES[name]
    if dtype is torch.float16 and device.type != "cuda":
        raise QatError("train.amp", "fp16 autocast needs a GPU", "use train.amp=bf16 on CPU, or none")
    return dtype


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision for the forward pass; fake quantization itself runs in float32 (FakeQuantize)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 inside (cuDNN convolutions and matmuls): the simulated model's evaluation must be float32 to be
    compared with the integer model LSB by LSB."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul
