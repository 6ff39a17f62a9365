"""Average pooling on its input's grid: the rounding rule, the engines that follow it, and the simulation's
:class:`GridAveragePool` reproducing the reference executor code for code (ties included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.compat.torch_private import make_per_tensor_quantized_tensor
from qat.engines.torch_native import quantized_engine
from qat.intmodel.graph import IntNode, TensorQ
from qat.intmodel.pooling import divide_half_even
from qat.intmodel.reference import avg_pool_kernel
from qat.quant.config import QuantConfig
from qat.quant.fake_quant import FakeQuantize
from qat.quant.observers import MinMaxObserver
from qat.quant.pooling import GridAveragePool
from qat.quant.prepare import calibration_mode, prepare
from qat.quant.scheme import QuantSpec


@pytest.mark.parametrize(("total", "count", "expected"), [
    (5, 2, 2), (-5, 2, -2),  # ±2.5: to even
    (7, 2, 4), (-7, 2, -4),  # ±3.5: to even
    (3, 2, 2), (-3, 2, -2),  # ±1.5
    (2, 4, 0), (-2, 4, 0), (6, 4, 2), (-6, 4, -2),  # ±0.5, ±1.5 of a 2x2 window
    (5, 4, 1), (7, 4, 2), (-7, 4, -2), (0, 9, 0), (13, 9, 1), (-14, 9, -2),
])
def test_divide_half_even_by_hand(total: int, count: int, expected: int) -> None:
    assert int(divide_half_even(torch.tensor(total), count)) == expected


def test_divide_half_even_matches_nearbyint_of_the_exact_quotient() -> None:
    totals = torch.arange(-4000, 4000, dtype=torch.int64)
    for count in (1, 2, 3, 4, 9, 16, 49):
        expected = torch.round(totals.double() / count).to(torch.int64)  # exact in float64, ties to even
        assert torch.equal(divide_half_even(totals, count), expected), count


WINDOWS = {
    "global": {"adaptive": True, "output_size": [1, 1]},
    "adaptive_uneven": {"adaptive": True, "output_size": [2, 3]},
    "2x2": {"adaptive": False, "kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0]},
    "3x3_pad_ceil": {"adaptive": False, "kernel_size": [3, 3], "stride": [2, 2], "padding": [1, 1],
                     "ceil_mode": True, "count_include_pad": False},
    "3x3_include_pad": {"adaptive": False, "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1]},
    "divisor": {"adaptive": False, "kernel_size": [2, 2], "stride": [1, 1], "padding": [0, 0],
                "divisor_override": 3},
}


def _codes(shape: tuple[int, ...], z: int) -> torch.Tensor:
    """Codes in [0, 255] with many exact ties (few distinct values), seeded."""
    torch.manual_seed(0)
    return (z + torch.randint(-6, 7, shape) * 2 + torch.randint(0, 2, shape)).clamp(0, 255).float()


@pytest.mark.parametrize("window", sorted(WINDOWS))
def test_grid_pool_reproduces_the_reference_code_for_code(window: str) -> None:
    attrs, z, scale = WINDOWS[window], 37, 0.03125 * 1.37
    q = TensorQ(scale=scale, zero_point=z, bits=8, signed=False, qmin=0, qmax=255)
    codes = _codes((2, 3, 7, 9), z)
    reference = avg_pool_kernel(IntNode("pool", "avg_pool", ["x"], q, attrs), q)(codes)

    fq = FakeQuantize(QuantSpec(), MinMaxObserver(False, 0))
    fq.scale, fq.zero_point = torch.tensor([scale]), torch.tensor([z], dtype=torch.int32)
    fq.observer(torch.tensor([-1.0, 1.0]))  # initialized; the grid is the one set above
    pool = GridAveragePool(attrs)
    pool.bind_input_quantizer(fq)
    x = fq.eval()((codes - z) * scale)
    simulated = pool(x) / scale + z
    assert torch.equal(torch.round(simulated), reference)
    assert torch.allclose(simulated, reference, atol=1e-3)  # on the grid, not merely rounding to it


def _torch_pool(codes: torch.Tensor, attrs: dict, scale: float, z: int, backend: str, layout: torch.memory_format):
    with quantized_engine(backend):
        xq = make_per_tensor_quantized_tensor(codes.to(torch.uint8), scale, z).contiguous(memory_format=layout)
        if attrs["adaptive"]:
            return F.adaptive_avg_pool2d(xq, attrs["output_size"]).int_repr().float()
        return F.avg_pool2d(xq, attrs["kernel_size"], attrs["stride"]).int_repr().float()


@pytest.mark.parametrize("window", ["global", "2x2", "adaptive_uneven"])
@pytest.mark.parametrize("backend", ["x86", "fbgemm", "qnnpack"])
def test_torch_quantized_pools_round_like_the_reference(window: str, backend: str) -> None:
    """The reference's rule is torch's on the channels-last tensors its quantized convolutions produce (qnnpack's
    in any layout); x86 on contiguous NCHW rounds the mean code instead: the same wherever Z is even."""
    if backend not in torch.backends.quantized.supported_engines:
        pytest.skip(f"{backend} is not in this PyTorch build")
    attrs, scale = WINDOWS[window], 0.05
    for z in (37, 38):
        q = TensorQ(scale=scale, zero_point=z, bits=8, signed=False, qmin=0, qmax=255)
        codes = _codes((2, 16, 8, 12), z)
        reference = avg_pool_kernel(IntNode("pool", "avg_pool", ["x"], q, attrs), q)(codes)
        assert torch.equal(_torch_pool(codes, attrs, scale, z, backend, torch.channels_last), reference)
        if backend == "qnnpack" or z % 2 == 0:
            assert torch.equal(_torch_pool(codes, attrs, scale, z, backend, torch.contiguous_format), reference)


def test_grid_pool_is_the_float_pool_until_quantizing_and_passes_its_gradient() -> None:
    fq = FakeQuantize(QuantSpec(), MinMaxObserver(False, 0))
    pool = GridAveragePool(WINDOWS["2x2"])
    pool.bind_input_quantizer(fq)
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    assert torch.equal(pool(x), F.avg_pool2d(x, 2))  # nothing observed yet
    fq.train()(x.detach())
    fq.eval()
    on_grid = fq(x)
    out = pool(on_grid)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.25))  # the float pool's, through the quantizer's STE
    fq.quantizing = False
    assert torch.equal(pool(x), F.avg_pool2d(x, 2))


class SqueezeExcite(nn.Module):
    """Conv, then a functional global pool gating the conv's output, then a module pool (v3's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.gate = nn.Conv2d(4, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        y = y * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(y, 1)))
        return self.fc(torch.flatten(self.pool(y), 1))


def test_prepare_rounds_module_and_functional_pools_on_their_input_grid() -> None:
    torch.manual_seed(0)
    prepared = prepare(SqueezeExcite(), QuantConfig(act_observer="minmax"), torch.randn(1, 3, 8, 8))
    pools = {name: m for name, m in prepared.named_modules() if isinstance(m, GridAveragePool)}
    assert len(pools) == 2 and "pool" in pools, sorted(pools)
    with calibration_mode(prepared), torch.no_grad():
        prepared(torch.randn(4, 3, 8, 8))
    assert all(p._input_fq.observer.initialized for p in pools.values())
    # stateless: checkpoints of models prepared before pools were rounded load unchanged
    assert not any(key.startswith("grid_pool") or key.startswith("pool.") for key in prepared.state_dict())


@pytest.mark.parametrize("window", ["global", "2x2", "adaptive_uneven"])
def test_onnxruntime_pools_round_like_the_reference(window: str) -> None:
    """ONNX Runtime rounds the mean code Σq / N half to even: the reference's rule wherever Z is even (odd Z:
    ties land on the other neighbour, 1 LSB)."""
    from qat.engines import registry
    from qat.intmodel.graph import IntModel
    from qat.intmodel.reference import ReferenceExecutor

    attrs, scale, z = WINDOWS[window], 0.05, 38
    q = TensorQ(scale=scale, zero_point=z, bits=8, signed=False, qmin=0, qmax=255)
    nodes = [IntNode("input", "quantize", [], q), IntNode("pool", "avg_pool", ["input"], q, attrs),
             IntNode("output", "dequantize", ["pool"], None)]
    int_model = IntModel(nodes=nodes, input_shape=[2, 8, 8, 12])
    x = (_codes((2, 8, 8, 12), z) - z) * scale
    expected = ReferenceExecutor(int_model)(x)
    ours = registry.build_int("onnxruntime", int_model)(x)
    assert torch.equal(torch.round(ours / scale), torch.round(expected / scale))
