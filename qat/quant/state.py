"""Writing a quantizer's running state (ranges, S, Z) under ``torch.compile``: into the buffers it already has.

Each step an observer produces new ranges and its quantizer new (S, Z). In eager mode the attributes are
re-bound to the fresh tensors (no copy kernels). A compiled step replayed as a CUDA graph
(``torch.compile(mode="reduce-overhead")``) cannot work that way: the re-bound tensors are outputs of the graph,
read as next step's inputs from memory that the next replay overwrites, and torch stops the run. Under
compilation the values are therefore copied into the existing buffers (one tensor per buffer for the whole run,
as batch norm's running statistics are kept); torch's CUDA-graph trees accept in-place updates of a module's
buffers. The numbers are the same either way.

A buffer is re-bound also when compiling if the new value has another shape, dtype or device (the first
observation turns the empty range into a 0-d or per-channel one).
"""

from __future__ import annotations

import torch
from torch import nn


def store(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """``module.<name> = value``; under ``torch.compile`` written in place into the existing buffer where it can be.
    In eager mode an existing buffer is re-bound in the module's buffer table directly (what ``nn.Module.__setattr__``
    does for a registered buffer, without its checks: a few µs per quantizer per step)."""
    current = module._buffers.get(name)
    if current is None:  # not a buffer yet (or None): register it
        setattr(module, name, value)
        return
    if not torch.compiler.is_compiling():
        module._buffers[name] = value
        return
    if current is value or current.shape != value.shape or current.dtype != value.dtype \
            or current.device != value.device:
        setattr(module, name, value)
        return
    with torch.no_grad():
        current.copy_(value)


def store_range(observer: nn.Module, low: torch.Tensor, high: torch.Tensor) -> None:
    """An observer's new ``[min_val, max_val]``."""
    store(observer, "min_val", low)
    store(observer, "max_val", high)


def store_qparams(quantizer: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """A fake quantizer's new (S, Z)."""
    store(quantizer, "scale", scale)
    store(quantizer, "zero_point", zero_point)
