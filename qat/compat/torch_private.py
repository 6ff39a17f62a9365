"""torch's and torchvision's private APIs used by qat, in one place (see :mod:`qat.compat`).

* ``torch._foreach_*`` and ``torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams``: the fewer-kernel
  fake quantizer of :mod:`qat.quant.fused` (bound here as plain aliases: no extra Python call per step);
* ``torch._make_per_{tensor,channel}_quantized_tensor``: quantized weight tensors of the deprecated
  quantized-tensor API (:mod:`qat.engines.torch_native`);
* ``torch.ao.quantization.fx._decomposed``: registers ``torch.ops.quantized_decomposed``, the Q/DQ ops of the
  PT2E graphs ExecuTorch lowers (:mod:`qat.engines.executorch_xnnpack`);
* torchvision's SSDLite ``_extra_block`` and ``_normal_init`` (:mod:`qat.detection.models`);
* ``torch._dynamo.utils.counters``: the graph breaks ``torch.compile`` met (tests/test_compile.py).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

CHECKED_AGAINST = {"torch": "2.14.1", "torchvision": "0.29.1"}

foreach_mul = torch._foreach_mul
foreach_mul_ = torch._foreach_mul_
foreach_add_ = torch._foreach_add_
fake_quantize_cachemask_tensor_qparams = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams
make_per_tensor_quantized_tensor = torch._make_per_tensor_quantized_tensor
make_per_channel_quantized_tensor = torch._make_per_channel_quantized_tensor


def quantized_decomposed_ops() -> Any:
    """``torch.ops.quantized_decomposed`` (quantize/dequantize per tensor and per channel), registered first."""
    importlib.import_module("torch.ao.quantization.fx._decomposed")
    return torch.ops.quantized_decomposed


def ssdlite_extra_block(in_channels: int, out_channels: int, norm_layer: Any) -> nn.Sequential:
    """torchvision's SSDLite extra feature block (1x1 reduce, 3x3 stride-2 depthwise, 1x1 expand)."""
    from torchvision.models.detection.ssdlite import _extra_block

    return _extra_block(in_channels, out_channels, norm_layer)


def ssdlite_normal_init(module: nn.Module) -> None:
    """torchvision's SSDLite initialisation (normal(0, 0.03) conv weights, zero biases), in place."""
    from torchvision.models.detection.ssdlite import _normal_init

    _normal_init(module)


def cudagraph_skips() -> int:
    """How many compiled graphs inductor ran without CUDA graphs in this process (``reduce-overhead`` falls back
    silently, e.g. on a CPU tensor or a mutated non-static input); checked against torch 2.11 and 2.14.1."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def compile_graph_breaks(clear: bool = False) -> dict[str, int]:
    """The graph breaks ``torch.compile`` counted in this process (reason -> count); ``clear`` resets the count."""
    from torch._dynamo.utils import counters

    if clear:
        counters.clear()
    return dict(counters["graph_break"])
