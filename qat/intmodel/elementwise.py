"""Integer forms of MobileNet v3's elementwise ops: hardswish, hardsigmoid (lookup tables) and MUL.

**hardswish / hardsigmoid as a table over the input grid.** The output code is a function of the input code
alone, so the op is a table with one entry per input code (256 for 8-bit grids, at most 2^16), computed once
from the two grids as the simulated model computes the value:

    table[q] = clamp(nearbyint(f(S_in·(q − Z_in)) · float32(1/S_out)) + Z_out, qmin, qmax)

with f evaluated by torch's own ``F.hardswish``/``F.hardsigmoid`` on float32 and the rounding of
``torch.fake_quantize_per_tensor_affine``. The simulation applies exactly these steps (dequantized input, the
float op, the output's fake quantizer), so the table equals the simulation code for code, and at run time the
op is one integer gather. TFLite does the same for its int8 LOGISTIC/TANH/ELU (tables filled from the float
function at ``Prepare``, ``LUTPopulate``). TFLite's fixed-point HARD_SWISH (``reference_ops::HardSwish``:
16-bit fixed-point input rescale, ReLU6 shape, output multiplier) and XNNPACK's int8 hardswish (``qs8-vhswish``,
Q15 fixed point) are within 1 LSB of the simulation, not equal to it; the table is what an engine that takes a table
runs, and a float hardswish quantized once (XNNPACK's fp32 kernel between converts, as qat's ExecuTorch adapter
lowers it) equals it.

**MUL** is TFLite's quantized MUL (``reference_integer_ops::MulElementwise``): acc = (q_a − Z_a)(q_b − Z_b) in
int32, ``MultiplyByQuantizedMultiplier(acc, M0, n)`` with M = S_a·S_b/S_out (Jacob §2.2), + Z_out, clamp. Its
output is a function of the code pair, so the executor tabulates it for 8-bit grids like ADD.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qat.errors import QatError
from qat.intmodel.fixedpoint import quantize_multiplier
from qat.intmodel.gemmlowp import INT32_MAX, FixedPointConstants, apply_multiplier
from qat.intmodel.graph import IntModel, IntNode, TensorQ

FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hardswish": F.hardswish,  # x·ReLU6(x + 3)/6 (Howard et al. 2019 §5.2)
    "hardsigmoid": F.hardsigmoid,  # ReLU6(x + 3)/6: the squeeze-excite gate
}
TABLE_OPS = tuple(FUNCTIONS)


def dequantized(codes: torch.Tensor, grid: TensorQ) -> torch.Tensor:
    """float32 S·(q − Z), as torch's fake quantizer returns it: (q − Z) converted to float32, times float32 S."""
    return (codes.to(torch.int64) - grid.zero_point).to(torch.float32) * torch.tensor(grid.scale,
                                                                                        dtype=torch.float32)


def requantized(values: torch.Tensor, grid: TensorQ) -> torch.Tensor:
    """clamp(nearbyint(r · float32(1/S)) + Z): the fake quantizer's rounding of float32 ``values`` (int64 codes)."""
    inv_scale = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(grid.scale, dtype=torch.float32)
    return torch.round(values.to(torch.float32) * inv_scale).to(torch.int64).add_(grid.zero_point) \
        .clamp_(grid.qmin, grid.qmax)


def activation_table(op: str, in_q: TensorQ, out_q: TensorQ) -> torch.Tensor:
    """Output codes (int64) of ``op`` for every input code qmin..qmax, as the simulated model computes them."""
    if op not in FUNCTIONS:
        raise QatError("intmodel", f"op {op!r} has no lookup table", f"tabulated ops: {', '.join(TABLE_OPS)}")
    codes = torch.arange(in_q.qmin, in_q.qmax + 1, dtype=torch.int64)
    return requantized(FUNCTIONS[op](dequantized(codes, in_q)), out_q)


def check_mul_accumulator(name: str, in_qs: list[TensorQ]) -> None:
    """The product (q_a − Z_a)(q_b − Z_b) must fit TFLite MUL's int32 accumulator for every code pair."""
    bound = 1
    for q in in_qs:
        bound *= max(abs(q.qmin - q.zero_point), abs(q.qmax - q.zero_point))
    if bound > INT32_MAX:
        raise QatError("intmodel", f"layer {name}: the int32 product of MUL can reach {bound}",
                       "use activation grids of at most 15 bits around the multiplied tensors")


def mul_codes(a: torch.Tensor, b: torch.Tensor, in_qs: list[TensorQ], out: FixedPointConstants, z_out: int,
              low: int, high: int) -> torch.Tensor:
    """TFLite MUL on integer codes (broadcasting): (q_a − Z_a)(q_b − Z_b) → MBQM(·, M0, n) + Z_out, clamped."""
    acc = (a.to(torch.int64) - in_qs[0].zero_point) * (b.to(torch.int64) - in_qs[1].zero_point)
    return apply_multiplier(acc, out, reuse_input=True).add_(z_out).clamp_(low, high)


def squeeze_excite_probe(signed: bool) -> IntModel:
    """A small integer model with each MobileNet v3 op once, on 8-bit grids (int8 if ``signed``, else uint8):
    quantize -> hardswish -> global mean -> hardsigmoid -> mul (the gate times the hardswish output). Engines
    lower it to read back, for their records, how they execute these ops."""
    low, high = (-128, 127) if signed else (0, 255)

    def grid(scale: float, zero_point: int) -> TensorQ:
        return TensorQ(scale, zero_point + low, 8, signed, low, high)

    x, act, gate = grid(0.05, 100), grid(0.03, 20), grid(1 / 256, 0)
    m0, shift = quantize_multiplier(gate.scale * act.scale / act.scale)
    mul = {"multiplier": torch.tensor([m0]), "shift": torch.tensor([shift], dtype=torch.int32)}
    nodes = [IntNode("x", "quantize", [], x), IntNode("act", "hardswish", ["x"], act),
             IntNode("pool", "avg_pool", ["act"], act, {"adaptive": True, "output_size": [1, 1]}),
             IntNode("gate", "hardsigmoid", ["pool"], gate),
             IntNode("se", "mul", ["gate", "act"], act, {"clamp_min": low, "clamp_max": high}, mul),
             IntNode("out", "dequantize", ["se"], None)]
    model = IntModel(nodes, [1, 4, 4, 4])
    model.validate("squeeze-excite probe")
    return model
