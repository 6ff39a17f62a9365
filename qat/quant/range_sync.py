"""One set of quantizer ranges across data-parallel ranks (DDP).

Under DDP each rank runs the forward pass on its shard of the global batch. An observer that updated its range
from its own shard alone would give every rank its own (S, Z) in the same step, and the checkpoint (written by
rank 0) would hold rank 0's ranges, not the ones the other ranks trained with. Inside :func:`synchronized`
every observing quantizer instead combines its *batch statistics* across the ranks before it updates its
range, so all ranks update from the same numbers and fake-quantize with the same (S, Z), bit for bit.

How each observer combines (``Observer.sync``):

* ``"extremes"`` — min/max, EMA of min/max and current-batch min/max: the global batch's minimum and maximum
  are the minimum of the ranks' minima and the maximum of their maxima, exactly, so the range is the one a
  single process computes on the concatenated global batch (Jacob et al. 2018 §3.1 and Krishnamoorthi 2018
  §3.2 define the EMA range on the batch's min/max; here "the batch" is the global batch). One all-reduce
  (MAX) of ``[-min, max]`` per quantizer and step.
* ``"mean"`` — percentile and MSE-optimal ranges: these are not functions of per-rank summaries (the global
  batch's percentile or MSE optimum needs the global batch's data), so the ranks' batch ranges are averaged
  (one all-reduce, SUM / world size). For the MSE observer, whose activation range is already the running
  mean of per-batch optima, this equals (up to float rounding) a single process calibrating on the same
  shards one after another; for percentiles it is an estimate of the global batch's percentile.
* ``None`` — stateless weight observers (current min/max, MSE of the weight tensor): their range is a function
  of the weight tensor alone and is recomputed from it at conversion; DDP keeps the weights identical on every
  rank, so nothing is communicated.

The collective has to run inside each quantizer's forward, between its batch statistics and its (S, Z): the
next layer's input depends on this quantizer's output, so the statistics of all quantizers of a step are not
known before the first has quantized, and packing them into one all-reduce per step would need each rank to
fake-quantize with a range that ignores the other ranks' part of the current batch (different (S, Z) per rank,
which is what this module removes). The cost is one all-reduce of 2 (per channel: 2·C) floats per observing
quantizer and step, stream-ordered under NCCL; outside :func:`synchronized`, and always in a single process,
nothing is communicated and the observers' only extra work is one check of a module global.

Every rank of the group must run the same observing forward passes inside :func:`synchronized` (a DDP
training step of a traced model does); :func:`install` enters it in every forward of the DDP wrapper, which
:func:`qat.train.distributed.wrap` does. Evaluation on rank 0 alone, PTQ calibration on rank 0 and conversion
run outside and communicate nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SYNC_MODES = ("extremes", "mean", None)

_STACK: list[tuple[Any, int]] = []  # (process group, its size) of each open synchronized() block, innermost last


def active() -> bool:
    """Whether observers combine their batch statistics across ranks now."""
    return bool(_STACK)


def _group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


@contextlib.contextmanager
def synchronized(group: Any = None) -> Iterator[None]:
    """Observers combine their batch statistics across the ranks of ``group`` (default: all) inside the block.

    A no-op when torch.distributed is not initialised or the group has one rank. Every rank of the group must
    run the same observing forward passes inside (e.g. the calibration batches of a data-parallel QAT run:
    ``with synchronized(), calibration_mode(model): ...`` on every rank).
    """
    size = _group_size(group)
    if size == 1:
        yield
        return
    _STACK.append((group, size))
    try:
        yield
    finally:
        _STACK.pop()


def combine(low: torch.Tensor, high: torch.Tensor, how: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks' batch range ``(low, high)`` combined as ``how`` says (see the module docstring); returned
    unchanged outside :func:`synchronized`. Returns fresh tensors (callers may scale them in place)."""
    if not _STACK or how is None:
        return low, high
    group, size = _STACK[-1]
    shape = low.shape
    if how == "extremes":  # min(a) = -max(-a): one MAX all-reduce gives both (negation is exact)
        packed = torch.cat((low.detach().reshape(-1).neg(), high.detach().reshape(-1)))
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        n = packed.numel() // 2
        return packed[:n].neg().reshape(shape), packed[n:].clone().reshape(shape)
    if how == "mean":
        packed = torch.cat((low.detach().reshape(-1), high.detach().reshape(-1)))
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        packed = packed / size
        n = packed.numel() // 2
        return packed[:n].clone().reshape(shape), packed[n:].clone().reshape(shape)
    raise ValueError(f"unknown range synchronization {how!r}; expected one of {SYNC_MODES}")


def _enter(module: nn.Module, args: Any) -> None:
    group = getattr(module, "process_group", None)
    _STACK.append((group, _group_size(group)))


def _leave(module: nn.Module, args: Any, output: Any) -> None:
    _STACK.pop()


def install(ddp: nn.Module) -> None:
    """Synchronize ranges in every forward of ``ddp`` (a DistributedDataParallel wrapper, whose
    ``process_group`` is used); the hooks go with the wrapper."""
    if _group_size(getattr(ddp, "process_group", None)) == 1:
        return
    ddp.register_forward_pre_hook(_enter)
    ddp.register_forward_hook(_leave, always_call=True)


__all__ = ["SYNC_MODES", "active", "combine", "install", "synchronized"]
