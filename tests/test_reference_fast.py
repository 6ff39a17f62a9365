"""The reference executor's fast exact forms (issue 22) against int64 oracles computed here: gemmlowp's
requantization as one floor division, conv/linear layers in float GEMMs (float32, float32 digits, float64),
tabulated add/cat, on seeded layers, worst-case accumulators at 8 and 16 bits, and converted models."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script
from test_reference import MODELS, calibrated

from qat.errors import QatError
from qat.intmodel.convert import convert
from qat.intmodel.gemmlowp import (
    INT32_MAX,
    INT32_MIN,
    fixed_point_constants,
    fixed_point_multiply,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from qat.intmodel.graph import IntNode, TensorQ, as_pair
from qat.intmodel.reference import FLOAT32_EXACT, MatmulKernel, ReferenceExecutor, exact_float_kernels
from qat.quant.config import QuantConfig

torch.set_num_threads(1)


# --- the oracle: gemmlowp's primitives composed as in TFLite, int64 GEMMs ----------------------------------------
def mbqm_spec(x: torch.Tensor, m0: torch.Tensor, n: torch.Tensor, rounding: str = "double") -> torch.Tensor:
    """MultiplyByQuantizedMultiplier from the primitives (double) or TFLite's single-rounding formula, int64."""
    x, m0, n = x.to(torch.int64), m0.to(torch.int64), n.to(torch.int64)
    if rounding == "single":
        total = 31 + n.clamp(max=31)
        y = (x * m0 + torch.bitwise_left_shift(torch.ones_like(total), total - 1)) >> total
        return torch.where(n > 31, 0, y.clamp(INT32_MIN, INT32_MAX))
    left, right = (-n).clamp(0, 32), n.clamp(min=0)
    shifted = torch.bitwise_left_shift(x, left).clamp(INT32_MIN, INT32_MAX)
    y = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m0), right.clamp(max=31))
    return torch.where(right > 31, 0, y)


def matmul_oracle(node: IntNode, in_q: TensorQ, x: torch.Tensor, rounding: str = "double") -> torch.Tensor:
    """Jacob eq. 7 in int64: Σ (q_in - Z_in)(q_w - Z_w) + b, int32 check, MBQM, + Z_out, clamp."""
    w = node.tensors["weight"].to(torch.int64)
    w = w - node.tensors["weight_zero_point"].to(torch.int64).reshape([-1] + [1] * (w.dim() - 1))
    centred = x.to(torch.int64) - in_q.zero_point
    if node.op == "linear":
        acc = centred @ w.t()
    else:
        a = node.attrs
        acc = F.conv2d(centred, w, None, as_pair(a["stride"]), as_pair(a["padding"]), as_pair(a["dilation"]),
                       a["groups"])
    view = [1, -1] + [1] * (acc.dim() - 2)
    acc = acc + node.tensors["bias"].to(torch.int64).reshape(view)
    assert int(acc.min()) >= INT32_MIN and int(acc.max()) <= INT32_MAX
    q = mbqm_spec(acc, node.tensors["multiplier"].reshape(view), node.tensors["shift"].reshape(view), rounding)
    return (q + node.out.zero_point).clamp(int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"]))


def grid(bits: int, zero_point: int = 0, signed: bool = False) -> TensorQ:
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return TensorQ(0.05, zero_point, bits, signed, qmin, qmax)


def matmul_node(weight: torch.Tensor, out: TensorQ, *, weight_zp: int = 0, relu: bool = False, seed: int = 0,
                shift_range: tuple[int, int] = (4, 14), **conv: object) -> IntNode:
    g = torch.Generator().manual_seed(seed)
    oc = weight.shape[0]
    attrs = {"clamp_min": out.zero_point if relu else out.qmin, "clamp_max": out.qmax}
    if weight.dim() == 4:
        attrs.update({"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **conv})
    tensors = {"weight": weight.to(torch.int32), "weight_zero_point": torch.full((oc,), weight_zp),
               "bias": torch.randint(-5000, 5000, (oc,), generator=g, dtype=torch.int32),
               "multiplier": torch.randint(1 << 30, 1 << 31, (oc,), generator=g, dtype=torch.int64),
               "shift": torch.randint(*shift_range, (oc,), generator=g)}
    return IntNode("layer", "conv2d" if weight.dim() == 4 else "linear", ["x"], out, attrs, tensors)


def run_kernel(node: IntNode, in_q: TensorQ, x: torch.Tensor, rounding: str = "double") -> torch.Tensor:
    kernel = MatmulKernel(node, in_q, rounding)
    with torch.inference_mode(), exact_float_kernels():
        return kernel(x.to(torch.float32)).to(torch.int64)


def codes(shape: tuple[int, ...], q: TensorQ, seed: int) -> torch.Tensor:
    return torch.randint(q.qmin, q.qmax + 1, shape, generator=torch.Generator().manual_seed(seed))


# --- requantization as one floor division ----------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ["double", "single"])
def test_fixed_point_form_equals_the_gemmlowp_primitives(rounding: str) -> None:
    rng = random.Random(3)
    xs = [rng.randint(INT32_MIN, INT32_MAX) for _ in range(2000)] + [rng.randint(-3000, 3000) for _ in range(2000)]
    xs += [INT32_MIN, INT32_MAX, 0, -1, 1]
    m0s = [rng.choice([0, 1, 3, 1 << 30, INT32_MAX, rng.randint(1 << 30, INT32_MAX)]) for _ in xs]
    ns = [rng.randint(-30 if rounding == "single" else -33, 40) for _ in xs]
    x, m0, n = (torch.tensor(v, dtype=torch.int64) for v in (xs, m0s, ns))
    c = fixed_point_constants(m0, n, rounding)
    ours = fixed_point_multiply(x, c, saturate_input=rounding == "double")
    if rounding == "single":
        ours = ours.clamp(INT32_MIN, INT32_MAX)
    assert torch.equal(ours, mbqm_spec(x, m0, n, rounding))


def test_fixed_point_shortcuts_are_exact_where_they_apply() -> None:
    """A folded bias b·M0 equals MBQM(x + b); dropping the sign correction changes only results <= 0."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-(1 << 24), 1 << 24, (50_000,), generator=g)
    b = torch.randint(-(1 << 20), 1 << 20, (50_000,), generator=g)
    m0 = torch.randint(1 << 30, 1 << 31, (50_000,), generator=g)
    n = torch.randint(0, 32, (50_000,), generator=g)
    c = fixed_point_constants(m0, n, "double")
    assert torch.equal(fixed_point_multiply(x, c, saturate_input=False, extra_offset=b * m0), mbqm_spec(x + b, m0, n))
    relu = fixed_point_multiply(x, c, negatives_clamped=True).clamp(min=0)
    assert torch.equal(relu, mbqm_spec(x, m0, n).clamp(min=0))


# --- conv / linear: exact float GEMMs against int64 ------------------------------------------------------------
CONVS = {
    "3x3 pad Z_in!=0": dict(cin=8, cout=6, k=3, padding=1, in_zp=37),
    "depthwise stride 2": dict(cin=12, cout=12, k=3, padding=1, stride=2, groups=12),
    "groups 2 dilation 2": dict(cin=8, cout=6, k=3, padding=2, dilation=2, groups=2),
    "1x1 signed Z_in": dict(cin=16, cout=8, k=1, in_zp=-9, signed=True),
    "5x5 asym weights stride 2 no pad": dict(cin=4, cout=5, k=5, stride=2, weight_zp=3),
}


@pytest.mark.parametrize("rounding", ["double", "single"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_equals_int64(case: str, relu: bool, rounding: str) -> None:
    p = dict(CONVS[case])
    cin, cout, k = p.pop("cin"), p.pop("cout"), p.pop("k")
    in_q = grid(8, p.pop("in_zp", 0), p.pop("signed", False))
    weight_zp = p.pop("weight_zp", 0)
    w = codes((cout, cin // p.get("groups", 1), k, k), grid(8, signed=True), seed=1).clamp(-127, 127)
    node = matmul_node(w, grid(8, 11), weight_zp=weight_zp, relu=relu, **p)
    x = codes((3, cin, 13, 11), in_q, seed=2)
    assert torch.equal(run_kernel(node, in_q, x, rounding), matmul_oracle(node, in_q, x, rounding))


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_linear_equals_int64(rounding: str) -> None:
    in_q = grid(8, 128)
    node = matmul_node(codes((10, 300), grid(8, signed=True), seed=5).clamp(-127, 127), grid(8, 3))
    x = codes((7, 300), in_q, seed=6)
    assert torch.equal(run_kernel(node, in_q, x, rounding), matmul_oracle(node, in_q, x, rounding))


@pytest.mark.parametrize(("k", "plan"), [(518, "float32"), (519, "float32 x2 digits")])
def test_worst_case_8_bit_accumulator_at_the_float32_limit(k: int, plan: str) -> None:
    """All inputs at qmax (255 - 0) and weights at ±127: Σ reaches 255·127·K; K = 518 is the last exact float32
    GEMM (16,774,930 < 2^24), K = 519 is split into digits. Sums are chosen to peak at the bound."""
    in_q = grid(8)
    w = torch.full((4, k), 127)
    w[1] = -127
    w[2, ::2] = -127  # partial sums swing; the bound still caps them
    node = matmul_node(w, grid(8, 128), shift_range=(20, 22))
    kernel = MatmulKernel(node, in_q, "double")
    assert kernel.plan.describe() == plan and kernel.plan.bound == 255 * 127 * k
    assert (kernel.plan.bound < FLOAT32_EXACT) == (k == 518)
    x = torch.stack([torch.full((k,), 255), torch.zeros(k, dtype=torch.int64), codes((k,), in_q, seed=7)])
    assert torch.equal(run_kernel(node, in_q, x), matmul_oracle(node, in_q, x))


def test_worst_case_8_bit_conv_extremes() -> None:
    """A 3x3 conv over 64 channels (K = 576) with inputs at qmin/qmax and weights at -127/127 (255·127·576 > 2^24:
    two float32 digits), and the same conv with Z_in = 100 (155·127·576 < 2^24: one float32 GEMM)."""
    in_q = grid(8)
    g = torch.Generator().manual_seed(8)
    w = torch.where(torch.rand(8, 64, 3, 3, generator=g) < 0.5, -127, 127)
    node = matmul_node(w, grid(8, 128), padding=1, shift_range=(18, 22))
    x = torch.where(torch.rand(2, 64, 9, 9, generator=g) < 0.5, 0, 255)
    x[0] = 255
    assert MatmulKernel(node, in_q, "double").plan.describe() == "float32 x2 digits"
    assert torch.equal(run_kernel(node, in_q, x), matmul_oracle(node, in_q, x))
    centred = grid(8, 100)
    assert MatmulKernel(node, centred, "double").plan.describe() == "float32"
    assert torch.equal(run_kernel(node, centred, x), matmul_oracle(node, centred, x))


def test_16_bit_grids_choose_float64_and_stay_exact() -> None:
    """16-bit activations and weights: |Σ| can reach 2^31·K, beyond float32 and its digits; float64 is exact."""
    in_q = grid(16, 30_000)
    w = codes((4, 6, 3, 3), grid(16, signed=True), seed=9).clamp(-32767, 32767)
    node = matmul_node(w, grid(16, 30_000), padding=1, shift_range=(14, 18))
    kernel = MatmulKernel(node, in_q, "double")
    assert kernel.plan.dtype == torch.float64 and not kernel.plan.int32_safe
    x = in_q.zero_point + codes((2, 6, 7, 7), TensorQ(1.0, 0, 12, True, -1000, 1000), seed=10)
    x[0, 0] = in_q.zero_point + 1000  # accumulators far above 2^24 (inexact in float32), still int32
    ours, expected = run_kernel(node, in_q, x), matmul_oracle(node, in_q, x)
    assert torch.equal(ours, expected) and (expected.double() - in_q.zero_point).abs().max() > 1000


def test_16_bit_accumulator_overflow_names_the_layer() -> None:
    in_q = grid(16)
    node = matmul_node(torch.full((2, 40_000), 32767), grid(16), shift_range=(20, 22))
    x = torch.full((1, 40_000), in_q.qmax)
    with pytest.raises(QatError, match="intmodel: layer layer: the int32 accumulator overflows"):
        run_kernel(node, in_q, x)


def test_accumulators_beyond_float64_are_an_error_at_build() -> None:
    node = matmul_node(torch.full((1, 1 << 23), 32767), grid(16))  # 65535 · 32767 · 2^23 > 2^53
    with pytest.raises(QatError, match=r"layer layer: accumulators can reach \d+ >= 2\^53"):
        MatmulKernel(node, grid(16), "double")


# --- every node of converted models against the int64 oracle ----------------------------------------------------
@pytest.mark.parametrize("rounding", ["double", "single"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_conv_linear_add_cat_of_converted_models_equals_int64(name: str, rounding: str) -> None:
    prepared, x = calibrated(MODELS[name], QuantConfig(act_observer="minmax"), n=4)
    int_model = convert(prepared)
    reference = ReferenceExecutor(int_model, rounding)
    values = reference.run_layers(x)
    q_of = {n.name: n.out for n in int_model.nodes}
    checked = set()
    for node in int_model.nodes:
        inputs = [values[i].to(torch.int64) for i in node.inputs]
        if node.op in ("conv2d", "linear"):
            expected = matmul_oracle(node, q_of[node.inputs[0]], inputs[0], rounding)
        elif node.op in ("add", "cat"):
            expected = rescaled_oracle(node, [q_of[i] for i in node.inputs], inputs, rounding)
        else:
            continue
        assert torch.equal(values[node.name].to(torch.int64), expected), node.name
        checked.add(node.op)
    assert checked >= ({"conv2d", "linear", "add", "cat"} if name == "tiny" else {"conv2d", "linear", "add"})


def rescaled_oracle(node: IntNode, grids: list[TensorQ], xs: list[torch.Tensor], rounding: str) -> torch.Tensor:
    """TFLite ADD / the cat requantization from the primitives (int64)."""
    left, t = int(node.attrs["left_shift"]), node.tensors
    extra = left if node.op == "cat" else 0
    terms = [mbqm_spec((x - q.zero_point) << left, t["input_multiplier"][i], t["input_shift"][i] + extra, rounding)
             for i, (x, q) in enumerate(zip(xs, grids, strict=True))]
    if node.op == "add":
        out = mbqm_spec(terms[0] + terms[1], t["multiplier"][0], t["shift"][0], rounding)
        return (out + node.out.zero_point).clamp(int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"]))
    parts = [(term + node.out.zero_point).clamp(int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"]))
             for term in terms]
    return torch.cat(parts, int(node.attrs["dim"]))


def test_add_of_wide_grids_runs_the_arithmetic_and_equals_int64() -> None:
    """10-bit add inputs (over the table size): the chunked arithmetic path, same results as the oracle."""
    prepared, x = calibrated(MODELS["tiny"], QuantConfig(act_observer="minmax", act_bits=10, weight_bits=8), n=4)
    int_model = convert(prepared)
    reference = ReferenceExecutor(int_model)
    adds = [n for n in int_model.nodes if n.op == "add"]
    assert adds and all(kernel.table is None for node, kernel in reference.steps if node.op == "add")
    values = reference.run_layers(x)
    q_of = {n.name: n.out for n in int_model.nodes}
    for node in adds:
        expected = rescaled_oracle(node, [q_of[i] for i in node.inputs], [values[i].to(torch.int64)
                                                                       for i in node.inputs], "double")
        assert torch.equal(values[node.name].to(torch.int64), expected)


def test_run_node_rejects_codes_off_their_grid() -> None:
    prepared, x = calibrated(MODELS["tiny"], QuantConfig(act_observer="minmax"), n=2)
    int_model = convert(prepared)
    reference = ReferenceExecutor(int_model)
    conv = next(n for n in int_model.nodes if n.op == "conv2d")
    values = reference.run_layers(x)
    with pytest.raises(QatError, match=f"layer {conv.name}: input .* leaves its grid"):
        reference.run_node(conv.name, values[conv.inputs[0]] + 1000)


def test_benchmark_script_runs_and_prints_the_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/bench/reference.py on tiny settings: it runs and ends with the ratio line (timing not asserted)."""
    bench = load_script("scripts/bench/reference.py", "qat_bench_reference")
    bench.main(["--models", "mobilenet_v2", "--resolution", "32", "--batch", "2", "--batches", "1", "--threads", "1",
                "--no-cuda"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("reference/float eval time: ") and "(mobilenet_v2, cpu" in lines[-1]
    assert any("torch_native_x86 int8" in line for line in lines)
