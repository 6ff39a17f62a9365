"""fbgemm's depthwise int8 kernel saturates 16-bit sums; the torch_native adapter runs depthwise convolutions on
qnnpack's kernel for the x86/fbgemm backends by default, exactly, and says so in engine_info."""

from __future__ import annotations

import pytest
import torch

from qat.engines import registry
from qat.engines.torch_native import build, engine_info
from qat.intmodel.fixedpoint import quantize_multiplier
from qat.intmodel.graph import IntModel, IntNode, TensorQ
from qat.intmodel.reference import ReferenceExecutor

CHANNELS = 8


def depthwise_model() -> IntModel:
    """quantize -> depthwise 3x3 conv with all weights 127 -> dequantize: the worst case for 16-bit sums."""
    in_q = TensorQ(scale=0.02, zero_point=0, bits=8, signed=False, qmin=0, qmax=255)
    out_q = TensorQ(scale=1.0, zero_point=0, bits=8, signed=False, qmin=0, qmax=255)
    w_scale = torch.full((CHANNELS,), 0.01)
    real = float(w_scale[0]) * in_q.scale / out_q.scale
    m0, shift = quantize_multiplier(real)
    conv = IntNode("dw", "conv2d", ["input"], out_q,
                   {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": CHANNELS,
                    "activation": "none", "weight_bits": 8, "weight_per_channel": True, "weight_qmin": -127,
                    "weight_qmax": 127, "clamp_min": 0, "clamp_max": 255},
                   {"weight": torch.full((CHANNELS, 1, 3, 3), 127, dtype=torch.int8), "weight_scale": w_scale,
                    "weight_zero_point": torch.zeros(CHANNELS, dtype=torch.int32),
                    "bias": torch.zeros(CHANNELS, dtype=torch.int32),
                    "bias_scale": torch.full((CHANNELS,), float(w_scale[0]) * in_q.scale),
                    "multiplier": torch.full((CHANNELS,), m0, dtype=torch.int64),
                    "shift": torch.full((CHANNELS,), shift, dtype=torch.int32)})
    nodes = [IntNode("input", "quantize", [], in_q), conv, IntNode("output", "dequantize", ["dw"], None)]
    return IntModel(nodes=nodes, input_shape=[1, CHANNELS, 5, 5])


@pytest.mark.parametrize("backend", ["fbgemm", "x86"])
def test_depthwise_runs_exactly_on_saturating_backends(backend: str) -> None:
    model = depthwise_model()
    x = torch.full((1, CHANNELS, 5, 5), 255 * 0.02)  # every input code at 255
    exact = ReferenceExecutor(model, "single")(x)
    assert (build(model, backend)(x) - exact).abs().max() <= 1.0  # within one output LSB (scale 1.0)
    assert engine_info(backend)["depthwise_kernels"] == "qnnpack"
    assert registry.engine_info(f"torch_native_{backend}")["depthwise_kernels"] == "qnnpack"


def test_fbgemm_depthwise_kernel_saturates_without_the_remedy() -> None:
    model = depthwise_model()
    x = torch.full((1, CHANNELS, 5, 5), 255 * 0.02)
    exact = ReferenceExecutor(model, "single")(x)
    raw = build(model, "fbgemm", exact_depthwise=False)(x)
    assert (raw - exact).abs().max() > 10  # the reason for the remedy: 16-bit sums saturate
    info = engine_info("fbgemm", exact_depthwise=False)
    assert info["depthwise_kernels"] == "fbgemm (saturating 16-bit sums: exact_depthwise=False)"
    assert "saturating 16-bit" in info["status_note"]
