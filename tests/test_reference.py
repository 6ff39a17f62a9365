"""The integer-only reference executor: gemmlowp/TFLite primitives, agreement with the simulation and with
PyTorch's int8 kernels layer by layer, sub-8-bit models, and its errors."""

from __future__ import annotations

import copy
import random
import types
from collections.abc import Callable

import pytest
import torch
import torchvision
from conftest import for_this_host
from torch import fx, nn

from qat.engines import torch_native
from qat.errors import QatError
from qat.intmodel.convert import convert
from qat.intmodel.gemmlowp import (
    INT32_MAX,
    INT32_MIN,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_rounding,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from qat.intmodel.graph import IntModel, TensorQ
from qat.intmodel.reference import ReferenceExecutor
from qat.models.registry import build_model
from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare

torch.set_num_threads(1)


# --- gemmlowp / TFLite primitives against hand-computed values ------------------------------------------------
@pytest.mark.parametrize(("a", "b", "expected"), [
    (INT32_MIN, INT32_MIN, INT32_MAX),  # the one overflow: 2·(-2^31)^2 / 2^32 = 2^31 saturates
    (INT32_MAX, INT32_MAX, INT32_MAX - 1),  # (2^31-1)^2·2 / 2^32 = 2^31 - 2 + 2^-31 -> 2^31 - 2
    (INT32_MIN, INT32_MAX, INT32_MIN + 1),  # -(2^31 - 1): exact
    (1 << 30, 1 << 30, 1 << 29),  # 0.5 · 0.5 in Q31 = 0.25
    (3, 1 << 30, 2),  # 3 · 0.5 = 1.5: tie rounds up
    (-3, 1 << 30, -1),  # -1.5: the nudge 1 - 2^30 rounds the tie up too, towards +inf
    (-5, 1 << 30, -2),  # -2.5 -> -2
    (5, 1 << 30, 3),  # 2.5 -> 3
    (-7, 1 << 30, -3),  # -3.5 -> -3
    (100, 1_610_612_736, 75),  # 100 · 0.75
    (-100, 1_610_612_736, -75),
    (0, INT32_MIN, 0),
])
def test_saturating_rounding_doubling_high_mul(a: int, b: int, expected: int) -> None:
    assert int(saturating_rounding_doubling_high_mul(a, b)) == expected


@pytest.mark.parametrize(("x", "exponent", "expected"), [
    (5, 1, 3), (-5, 1, -3),  # ±2.5: ties away from zero
    (6, 2, 2), (-6, 2, -2),  # ±1.5
    (7, 2, 2), (-7, 2, -2),  # ±1.75
    (-9, 3, -1), (-12, 3, -2), (12, 3, 2), (-11, 3, -1),  # -1.125, -1.5, 1.5, -1.375
    (INT32_MIN, 31, -1), (INT32_MAX, 31, 1), (-(1 << 30), 31, -1), ((1 << 30), 31, 1), ((1 << 30) - 1, 31, 0),
    (123, 0, 123), (-123, 0, -123),
])
def test_rounding_divide_by_pot(x: int, exponent: int, expected: int) -> None:
    assert int(rounding_divide_by_pot(x, exponent)) == expected


def test_rounding_divide_by_pot_rejects_exponents_gemmlowp_does_not_define() -> None:
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        rounding_divide_by_pot(1, 32)


def _srdhm_scalar(a: int, b: int) -> int:
    """gemmlowp's C++ transcribed on Python integers (no tensors)."""
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    total = ab + nudge
    return abs(total) // (1 << 31) * (1 if total >= 0 else -1)  # C++ truncation towards zero


def _rdbpot_scalar(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if (x & mask) > threshold else 0)


def _mbqm_scalar(x: int, m0: int, n: int) -> int:
    left, right = max(-n, 0), max(n, 0)
    shifted = min(max(x * (1 << left), INT32_MIN), INT32_MAX)
    return _rdbpot_scalar(_srdhm_scalar(shifted, m0), right)


def test_vectorized_primitives_match_the_scalar_transcription() -> None:
    rng = random.Random(0)
    xs = [rng.randint(INT32_MIN, INT32_MAX) for _ in range(300)] + [rng.randint(-5000, 5000) for _ in range(300)]
    m0s = [rng.randint(1 << 30, INT32_MAX) for _ in xs]
    ns = [rng.randint(-3, 31) for _ in xs]
    x, m0, n = (torch.tensor(v, dtype=torch.int64) for v in (xs, m0s, ns))
    expected = [_srdhm_scalar(a, b) for a, b in zip(xs, m0s, strict=True)]
    assert saturating_rounding_doubling_high_mul(x, m0).tolist() == expected
    exps = [e % 32 for e in ns]
    expected = [_rdbpot_scalar(a, e) for a, e in zip(xs, exps, strict=True)]
    assert rounding_divide_by_pot(x, torch.tensor(exps)).tolist() == expected
    expected = [_mbqm_scalar(*t) for t in zip(xs, m0s, ns, strict=True)]
    assert multiply_by_quantized_multiplier(x, m0, n).tolist() == expected


def _single_rounding_scalar(x: int, m0: int, n: int) -> int:
    """TFLite's TFLITE_SINGLE_ROUNDING MultiplyByQuantizedMultiplier on Python integers."""
    total = 31 + n
    return min(max((x * m0 + (1 << (total - 1))) >> total, INT32_MIN), INT32_MAX)


def test_single_rounding_matches_the_scalar_transcription_and_rounds_once() -> None:
    rng = random.Random(1)
    xs = [rng.randint(INT32_MIN, INT32_MAX) for _ in range(300)] + [rng.randint(-5000, 5000) for _ in range(300)]
    m0s = [rng.randint(1 << 30, INT32_MAX) for _ in xs]
    ns = [rng.randint(-3, 31) for _ in xs]
    ours = multiply_by_quantized_multiplier_single_rounding(*(torch.tensor(v) for v in (xs, m0s, ns)))
    assert ours.tolist() == [_single_rounding_scalar(*t) for t in zip(xs, m0s, ns, strict=True)]
    x = torch.arange(-100_000, 100_000, 7, dtype=torch.int64)
    exact = x.double() * (1_518_500_250 / 2**31) * 2.0**-9
    assert (multiply_by_quantized_multiplier_single_rounding(x, 1_518_500_250, 9).double() - exact).abs().max() <= 0.5
    assert int(multiply_by_quantized_multiplier_single_rounding(-3, 1 << 30, 0)) == -1  # -1.5: ties round up


def test_multiply_by_quantized_multiplier_close_to_the_real_product() -> None:
    x = torch.arange(-100_000, 100_000, 7, dtype=torch.int64)
    m0, n = 1_518_500_250, 9  # M = (m0 / 2^31) · 2^-9 ≈ 0.7071 / 512
    exact = x.double() * (m0 / 2**31) * 2.0**-n
    error = (multiply_by_quantized_multiplier(x, m0, n).double() - exact).abs()
    assert error.max() <= 0.5 + 2.0**-n  # two roundings (SRDHM, then the shift): TFLite's double rounding


def test_multiply_by_quantized_multiplier_saturates_and_flushes() -> None:
    # x · 2^2 leaves int32 and saturates; then SRDHM(2^31 - 1, 2^30) = 2^30
    assert int(multiply_by_quantized_multiplier(1 << 30, 1 << 30, -2)) == 1 << 30
    # a multiplier below 2^-32 is zero, as TFLite's QuantizeMultiplier flushes it
    assert int(multiply_by_quantized_multiplier(INT32_MAX, INT32_MAX, 40)) == 0


# --- models -------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Every integer op: conv+BN+ReLU6, depthwise conv+ReLU, 1x1 conv, add+ReLU, dilated conv, cat, max pool,
    average pool with padding, adaptive average pool, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.branch = nn.Conv2d(8, 4, 3, 1, 2, dilation=2)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(3, 2, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.pw(self.dw(x)) + x)
        z = torch.cat([y, self.branch(y)], 1)
        z = self.avg(self.pool(z))
        return self.fc(torch.flatten(self.gap(z), 1))


def small_resnet() -> nn.Module:
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)


def _set_bn_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running BN statistics of the data, so the untrained network is well scaled (as after training)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def calibrated(factory: Callable[[], nn.Module], config: QuantConfig, n: int = 32,
               res: int = 32) -> tuple[fx.GraphModule, torch.Tensor]:
    """A prepared model (seeded weights) with BN statistics and activation ranges from random images (PTQ-style)."""
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(n, 3, res, res)
    prepared = prepare(_set_bn_statistics(model, x), config, x[:1])
    with calibration_mode(prepared), torch.no_grad():
        prepared(x)
    return prepared.eval(), torch.randn(n, 3, res, res)


def _output_q(int_model: IntModel) -> TensorQ:
    q = int_model.node(int_model.nodes[-1].inputs[0]).out
    assert q is not None
    return q


def _lsb(a: torch.Tensor, b: torch.Tensor, int_model: IntModel) -> torch.Tensor:
    return (a - b).abs() / _output_q(int_model).scale


MODELS = {
    "tiny": TinyNet,
    "mobilenet_v2": lambda: build_model("mobilenet_v2", width_mult=0.35, num_classes=10, resolution=32),
    "resnet": small_resnet,
}


class _QuantizedValues(fx.Interpreter):
    """Runs the simulation and keeps each activation quantizer's output, keyed by the op it quantizes."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}
        self.raw: dict[str, torch.Tensor] = {}  # ops that keep their input's grid (max pool, flatten)

    def run_node(self, n: fx.Node) -> torch.Tensor:
        result = super().run_node(n)
        # kept as it is now: a later in-place op (Hardswish(inplace=True)) overwrites its input, this output
        kept = result.clone() if isinstance(result, torch.Tensor) else result
        self.raw[n.name] = kept
        if n.op == "call_module" and str(n.target).startswith("act_quant."):
            source = n.args[0]
            self.values["input" if source.op == "placeholder" else source.name] = kept
            if source.args and isinstance(source.args[0], fx.Node) and "add" in source.args[0].name:
                self.values[source.args[0].name] = kept  # add -> ReLU: one integer op named after the add
        return result


def simulated_integers(prepared: fx.GraphModule, int_model: IntModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The simulation's value after each integer op, as integers q = round(r / S) + Z (exact: r is on the grid)."""
    capture = _QuantizedValues(prepared)
    with torch.no_grad():
        capture.run(x)
    result = {}
    for n in int_model.nodes:
        if n.out is not None:
            value = capture.values.get(n.name, capture.raw.get(n.name))
            result[n.name] = (torch.round(value / n.out.scale) + n.out.zero_point).to(torch.int32)
    return result


def layer_by_layer_differences(prepared: fx.GraphModule, int_model: IntModel, x: torch.Tensor,
                               rounding: str = "double", only: set[str] | None = None) -> tuple[dict[str, int], float]:
    """Each reference node fed the simulation's integers: the largest difference per node, the fraction equal."""
    reference = ReferenceExecutor(int_model, rounding)
    simulated = simulated_integers(prepared, int_model, x)
    largest: dict[str, int] = {}
    equal = total = 0
    for node in int_model.nodes:
        if node.op in ("quantize", "dequantize") or (only is not None and node.name not in only):
            continue
        ours = reference.run_node(node.name, *(simulated[i] for i in node.inputs))
        diff = (ours.to(torch.int64) - simulated[node.name]).abs()
        largest[node.name] = int(diff.max())
        equal, total = equal + int((diff == 0).sum()), total + diff.numel()
    return largest, equal / total


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reference_agrees_with_the_simulation_layer_by_layer(name: str) -> None:
    prepared, x = calibrated(MODELS[name], QuantConfig(act_observer="minmax"), n=8)
    int_model = convert(prepared)
    largest, equal = layer_by_layer_differences(prepared, int_model, x)
    assert set(largest) == {n.name for n in int_model.nodes if n.op not in ("quantize", "dequantize")}
    # each layer fed the simulation's own integers: the reference's int32 bias and (M0, n) double rounding
    # (and the simulation's float32 arithmetic) move a value by 1 LSB, and only near rounding ties
    assert max(largest.values()) <= 1, largest
    assert equal >= 0.99


@pytest.mark.parametrize("name", ["tiny", "resnet"])
def test_reference_agrees_with_the_simulation_end_to_end(name: str) -> None:
    prepared, x = calibrated(MODELS[name], QuantConfig(act_observer="minmax"), n=16)
    int_model = convert(prepared)
    with torch.no_grad():
        simulated = prepared(x)
    logits = ReferenceExecutor(int_model)(x)
    assert logits.dtype == torch.float32 and logits.shape == simulated.shape
    lsb = _lsb(simulated, logits, int_model)
    # The per-layer 1-LSB tie effects propagate: every output reads hundreds of inputs, so the few differing
    # values spread layer after layer and add up; the logits differ by a few LSB, the predictions hardly.
    assert lsb.mean() < 2.5 and (simulated.argmax(1) == logits.argmax(1)).float().mean() >= 0.9


def with_integer_biases(prepared: fx.GraphModule, int_model: IntModel) -> fx.GraphModule:
    """A copy of the simulation whose conv/linear biases are the integer model's int32 biases (b_q · S_in·S_w)."""
    prepared = copy.deepcopy(prepared)
    nodes = {n.name: n for n in int_model.nodes if n.op in ("conv2d", "linear")}
    for fx_node in prepared.graph.nodes:
        if fx_node.op != "call_module" or fx_node.name not in nodes:
            continue
        node, module = nodes[fx_node.name], prepared.get_submodule(fx_node.target)
        bias = (node.tensors["bias"].double() * node.tensors["bias_scale"].double()).float()
        if node.op == "linear":
            module.linear.bias = nn.Parameter(bias)
        else:
            fold = module.folded_weight_and_bias
            module.folded_weight_and_bias = types.MethodType(lambda self, f=fold, b=bias: (f()[0], b), module)
    return prepared


@pytest.mark.parametrize("name", sorted(MODELS))
def test_int32_bias_and_single_rounding_explain_the_gap_to_the_simulation(name: str) -> None:
    prepared, x = calibrated(MODELS[name], QuantConfig(act_observer="minmax"), n=8)
    int_model = convert(prepared)
    with_bias = with_integer_biases(prepared, int_model)
    largest, _ = layer_by_layer_differences(with_bias, int_model, x, rounding="single")
    exact_ops = {n.name for n in int_model.nodes
                 if n.op in ("conv2d", "linear", "add", "cat", "max_pool", "avg_pool")}
    # The simulation rounds r/S once per layer with the same int32 bias: the single-rounding reference is then
    # bit-exact but for float32 round-off, at most one value in this batch; its pools round as the reference's.
    _, equal = layer_by_layer_differences(with_bias, int_model, x, rounding="single", only=exact_ops)
    assert max(largest.values()) <= 1 and equal >= 0.9999, (largest, equal)
    with torch.no_grad():
        simulated = with_bias(x)
    logits = ReferenceExecutor(int_model, rounding="single")(x)
    assert (simulated.argmax(1) == logits.argmax(1)).all()


def test_unknown_rounding_is_a_clear_error() -> None:
    prepared, _ = calibrated(TinyNet, QuantConfig(), n=4)
    with pytest.raises(QatError, match="reference.rounding: unknown value 'nearest'"):
        ReferenceExecutor(convert(prepared), rounding="nearest")


def test_every_intermediate_value_is_an_integer_on_its_grid() -> None:
    prepared, x = calibrated(TinyNet, QuantConfig(act_observer="minmax"))
    int_model = convert(prepared)
    values = ReferenceExecutor(int_model).run_layers(x)
    assert set(values) == {n.name for n in int_model.nodes if n.op != "dequantize"}
    for node in int_model.nodes:
        if node.op == "dequantize":
            continue
        v = values[node.name]
        assert v.dtype == torch.int32, node.name
        assert node.out.qmin <= int(v.min()) and int(v.max()) <= node.out.qmax, node.name
        if "clamp_min" in node.attrs:
            assert node.attrs["clamp_min"] <= int(v.min()) and int(v.max()) <= node.attrs["clamp_max"], node.name


def _quantized(values: torch.Tensor, q: TensorQ) -> torch.Tensor:
    """The reference's integers as the quint8 tensor torch_native runs on (signed grids shifted by 128)."""
    offset = 128 if q.signed else 0
    return torch._make_per_tensor_quantized_tensor((values.to(torch.int64) + offset).to(torch.uint8), q.scale,
                                                   q.zero_point + offset)


def _integers(t: torch.Tensor, q: TensorQ) -> torch.Tensor:
    return t.int_repr().to(torch.int64) - (128 if q.signed else 0)


# Per op: the largest difference allowed between the reference and PyTorch's x86 (fbgemm) kernels on identical
# integer inputs, and why.
TORCH_NATIVE_TOLERANCE = {
    "quantize": 0,  # same rounding: nearbyint(x · float32(1/S)) + Z in both
    "max_pool": 0,  # integer max: no rounding anywhere
    "flatten": 0,  # a reshape
    "conv2d": 1,  # fbgemm requantizes acc · float32(S_in·S_w/S_out) with nearbyint (ties to even); the reference
                  # uses (M0, n) with gemmlowp's double rounding; the two differ only near ties
    "linear": 1,  # same as conv2d
    "add": 1,  # torch's quantized add rescales in float; the reference uses TFLite's 2^20 fixed-point ADD
    "cat": 1,  # torch requantizes each input in float; the reference in fixed point (S_i/S_out as (M0, n))
    "avg_pool": 1,  # ties: x86 on the NCHW tensors fed here rounds the mean code, the reference the centred mean
                    # (tests/test_pooling.py); the two differ where Z is odd
}


@pytest.mark.parametrize("acts", ["8-bit", "7-bit", "7-bit signed"])
@pytest.mark.parametrize("name", ["tiny", "resnet"])
def test_layer_by_layer_against_torch_native(name: str, acts: str) -> None:
    """Every op within its tolerance of the reference, 8-bit grids and <8-bit ones in 8-bit containers alike
    (the 7-bit grid's clamp to [0, 127] or [-64, 63] after convolutions without ReLU, adds and linears)."""
    config = QuantConfig(act_observer="minmax", act_bits=int(acts[0]), act_symmetric="signed" in acts)
    prepared, x = calibrated(MODELS[name], for_this_host(config), n=8)
    int_model = convert(prepared)
    reference = ReferenceExecutor(int_model)
    engine = torch_native.build(int_model, "x86")
    values = reference.run_layers(x)
    q_of = {n.name: n.out for n in int_model.nodes}
    checked: dict[str, float] = {}
    with torch.inference_mode():
        for (step_name, inputs, fn), node in zip(engine.steps, int_model.nodes, strict=True):
            assert step_name == node.name
            if node.op == "dequantize":
                continue
            args = [_quantized(values[i], q_of[i]) for i in inputs] if inputs else [x]
            theirs = _integers(fn(*args), node.out)
            diff = (theirs - values[node.name].to(torch.int64)).abs()
            assert int(diff.max()) <= TORCH_NATIVE_TOLERANCE[node.op], (node.name, node.op, int(diff.max()))
            checked[node.op] = max(checked.get(node.op, 0.0), float((diff > 0).float().mean()))
    # every op kind ran; where 1 LSB is allowed it is a rare tie effect, not a systematic offset
    assert set(checked) >= {"quantize", "conv2d", "add", "avg_pool", "linear", "flatten"}
    assert max(checked.values()) < 0.05, checked


def test_sub_8_bit_model_runs_exactly_on_its_grid() -> None:
    prepared, x = calibrated(TinyNet, QuantConfig(weight_bits=4, act_bits=4, act_observer="minmax"))
    int_model = convert(prepared)
    assert int_model.min_bits == 4
    for node in int_model.nodes:
        if "weight" in node.tensors:
            assert node.tensors["weight"].abs().max() <= 7  # narrow-range signed 4-bit
        if node.out is not None:
            assert (node.out.qmin, node.out.qmax) == (0, 15)
    values = ReferenceExecutor(int_model).run_layers(x)
    assert all(int(v.min()) >= 0 and int(v.max()) <= 15 for v in values.values())
    largest, equal = layer_by_layer_differences(prepared, int_model, x)
    # coarser grids make M = S_in·S_w/S_out larger (small n: more double-rounding ties) and the int32 bias
    # step S_in·S_w a larger fraction of an output LSB, so ties are more frequent than at 8 bits; still <= 1 LSB
    assert max(largest.values()) <= 1 and equal >= 0.95, (largest, equal)


# --- errors ---------------------------------------------------------------------------------------------------
def test_accumulator_overflow_names_the_layer() -> None:
    prepared, x = calibrated(TinyNet, QuantConfig(weight_bits=16, act_bits=16, act_observer="minmax"), n=4)
    with pytest.raises(QatError, match=r"intmodel: layer \w+: the int32 accumulator overflows"):
        ReferenceExecutor(convert(prepared))(x * 3)


def test_unknown_op_names_the_node() -> None:
    prepared, _ = calibrated(TinyNet, QuantConfig(), n=4)
    int_model = convert(prepared)
    int_model.nodes[3].op = "softmax"
    with pytest.raises(QatError, match=f"node {int_model.nodes[3].name} uses op 'softmax'"):
        ReferenceExecutor(int_model)


def test_wrong_input_is_a_clear_error() -> None:
    prepared, x = calibrated(TinyNet, QuantConfig(), n=4)
    reference = ReferenceExecutor(convert(prepared))
    with pytest.raises(QatError, match="input: the reference executor expects float images"):
        reference(x[:, :2])
    with pytest.raises(QatError, match="expects float images"):
        reference((x * 10).to(torch.int32))


def test_uncalibrated_model_error_names_the_layer() -> None:
    model = prepare(TinyNet(), QuantConfig(), torch.randn(1, 3, 32, 32))
    with pytest.raises(QatError, match=r"convert: the activation quantizer of layer input \(x\) has no range"):
        convert(model)
