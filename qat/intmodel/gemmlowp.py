"""gemmlowp / TFLite fixed-point primitives, vectorized over torch int64 tensors (Jacob et al. 2018 §2.2).

Each function is bit-exact to its namesake in gemmlowp ``fixedpoint/fixedpoint.h`` or TFLite
``kernels/internal/common.h`` (the default, double-rounding ``MultiplyByQuantizedMultiplier``). Values are
carried in int64 tensors so that the int32 products of the C++ code are exact; results are int32 values
(checked by :func:`saturating_cast` or by construction) in int64 containers.

Shift convention: this project stores a multiplier as (M0, n) with M = M0 · 2^-31 · 2^-n, so n > 0 is a right
shift; TFLite's ``shift`` argument is -n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def _int64(x: torch.Tensor | int) -> torch.Tensor:
    return x.to(torch.int64) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.int64)


def saturating_cast(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Clamp to [low, high] (gemmlowp ``SaturatingCast``; TFLite's final clamp to the activation range)."""
    return torch.clamp(_int64(x), low, high)


def saturating_rounding_doubling_high_mul(a: torch.Tensor | int, b: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: the high 32 bits of 2·a·b, rounded to nearest.

    ``nudge = ab >= 0 ? 2^30 : 1 - 2^30`` then ``(ab + nudge) / 2^31`` with C++ truncating division; the only
    overflow, a = b = INT32_MIN, saturates to INT32_MAX. Ties round up (towards +inf): 1.5 -> 2, -1.5 -> -1.
    """
    a, b = _int64(a), _int64(b)
    ab = a * b  # |a|, |b| <= 2^31, so |ab| <= 2^62: exact in int64
    nudge = torch.where(ab >= 0, torch.tensor(1 << 30), torch.tensor(1 - (1 << 30)))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a == b) & (a == INT32_MIN)
    return torch.where(overflow, torch.tensor(INT32_MAX), high)


def rounding_divide_by_pot(x: torch.Tensor | int, exponent: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp ``RoundingDivideByPOT``: x / 2^exponent rounded to nearest, ties away from zero.

    ``mask = 2^e - 1; remainder = x & mask; threshold = (mask >> 1) + (x < 0); (x >> e) + (remainder >
    threshold)``, with arithmetic right shift. gemmlowp requires 0 <= exponent <= 31.
    """
    x, exponent = _int64(x), _int64(exponent)
    if bool((exponent < 0).any()) or bool((exponent > 31).any()):
        raise ValueError(f"RoundingDivideByPOT exponent must be in [0, 31], got {exponent.tolist()}")
    mask = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) - 1
    remainder = torch.bitwise_and(x, mask)
    threshold = torch.bitwise_right_shift(mask, 1) + (x < 0).to(torch.int64)
    return torch.bitwise_right_shift(x, exponent) + (remainder > threshold).to(torch.int64)


@dataclass(frozen=True)
class FixedPointConstants:
    """``MultiplyByQuantizedMultiplier`` rewritten as one floor division by a power of two, per channel.

    For n > 0, gemmlowp's two roundings nest into one: with h = SRDHM(x, M0) = floor((x·M0 + 2^30) / 2^31)
    (its nudge 1 - 2^30 for negative products is the same floor) and RoundingDivideByPOT(h, n) =
    floor((h + 2^(n-1) - [h < 0]) / 2^n) (ties away from zero), floor(floor(a)/b) = floor(a/b) gives
    ``(y - 2^31·[y < 2^(30+n)]) >> (31+n)`` with y = x·M0 + 2^30 + 2^(30+n).
    TFLite's single rounding is ``(x·M0 + 2^(30+n)) >> (31+n)``. Every step is exact in int64 for int32 x
    (|x·M0| <= 2^62); a flushed multiplier (n > 31) is M0 = 0.
    """

    multiplier: torch.Tensor  # M0 (int64)
    offset: torch.Tensor  # the rounding constant added to x·M0
    shift: torch.Tensor  # 31 + n (n > 31: 0, with M0 = 0)
    left: torch.Tensor | None  # double rounding's x·2^-n before SRDHM (n < 0), saturated to int32; None: no n < 0
    negative_below: torch.Tensor | None  # double rounding: numerators y below it get -2^31 (int64 min where n <= 0)
    rounding: str


def fixed_point_constants(multiplier: torch.Tensor | int, shift: torch.Tensor | int,
                          rounding: str = "double") -> FixedPointConstants:
    """The constants of :class:`FixedPointConstants` for M0 >= 0 and shifts n (double or single rounding)."""
    m0, n = _int64(multiplier), _int64(shift)
    if bool((m0 < 0).any()):
        raise ValueError("quantized multipliers must be non-negative")
    flushed = n > 31
    m0 = torch.where(flushed, torch.zeros_like(m0), m0)
    if rounding == "single":
        if bool((n < -30).any()):
            raise ValueError(f"single-rounding requantization needs n >= -30, got {n.min().item()}")
        total = torch.where(flushed, torch.zeros_like(n), 31 + n)
        offset = torch.where(flushed, torch.zeros_like(n), torch.bitwise_left_shift(torch.ones_like(n), total - 1))
        return FixedPointConstants(m0, offset, total, None, None, rounding)
    right = torch.where(flushed, torch.zeros_like(n), torch.clamp(n, min=0))
    left = torch.clamp(-n, min=0, max=32)  # x · 2^32 saturates for every x != 0
    half = torch.where(right > 0, torch.bitwise_left_shift(torch.ones_like(n), 30 + right), torch.zeros_like(n))
    offset = torch.where(flushed, torch.zeros_like(n), (1 << 30) + half)
    below = torch.where(right > 0, half, torch.full_like(n, -(2**63)))
    return FixedPointConstants(m0, offset, 31 + right, left if bool((left > 0).any()) else None, below, rounding)


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.device == like.device else t.to(like.device)


def fixed_point_multiply(x: torch.Tensor, c: FixedPointConstants, *, saturate_input: bool = True,
                         extra_offset: torch.Tensor | None = None, negatives_clamped: bool = False,
                         reuse_input: bool = False) -> torch.Tensor:
    """MBQM of int64 ``x`` with precomputed constants (broadcast against ``x``): a multiply, an add, a shift.

    ``saturate_input=False`` when x is known to fit int32 (a checked accumulator); ``extra_offset`` adds b·M0
    (a bias folded into the rounding constant, valid when x + b fits int32 and there is no left shift);
    ``negatives_clamped`` drops the double rounding's sign correction, which only moves results <= 0 and
    so cannot change a layer whose output clamp starts at or above its zero point (a fused ReLU);
    ``reuse_input`` lets the result overwrite ``x``.
    """
    if c.left is not None:
        x = torch.bitwise_left_shift(x, _on(c.left, x))
    if saturate_input or c.left is not None:
        x = x.clamp_(INT32_MIN, INT32_MAX) if reuse_input else torch.clamp(x, INT32_MIN, INT32_MAX)
        reuse_input = True
    offset = c.offset if extra_offset is None else c.offset + extra_offset
    y = x.mul_(_on(c.multiplier, x)) if reuse_input else torch.mul(x, _on(c.multiplier, x))
    y.add_(_on(offset, x))
    if c.negative_below is not None and not negatives_clamped:
        y.sub_(torch.lt(y, _on(c.negative_below, x)).view(torch.uint8), alpha=1 << 31)
    return y.bitwise_right_shift_(_on(c.shift, x))


def apply_multiplier(x: torch.Tensor, c: FixedPointConstants, *, reuse_input: bool = False) -> torch.Tensor:
    """``MultiplyByQuantizedMultiplier`` with TFLite's saturations for any int64 ``x``: double rounding saturates
    x (· 2^left) to int32 first, single rounding its result."""
    if c.rounding == "single":
        y = fixed_point_multiply(x, c, saturate_input=False, reuse_input=reuse_input)
        return y.clamp_(INT32_MIN, INT32_MAX)
    return fixed_point_multiply(x, c, reuse_input=reuse_input)


def multiply_by_quantized_multiplier(x: torch.Tensor | int, multiplier: torch.Tensor | int,
                                     shift: torch.Tensor | int) -> torch.Tensor:
    """TFLite ``MultiplyByQuantizedMultiplier(x, M0, -n)``: round(x · M0 · 2^-31 · 2^-n) in fixed point.

    ``left = max(-n, 0)``, ``right = max(n, 0)``;
    ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x · 2^left, M0), right)``. ``x · 2^left`` overflows
    int32 in C++ (undefined there); here it saturates, which gives the same clamped layer output because then
    |x · M| >= 2^30 lies far outside every activation grid. A right shift n > 31 (M < 2^-32) gives 0, as TFLite's
    ``QuantizeMultiplier`` flushes such multipliers to zero. ``multiplier``/``shift`` broadcast against ``x``
    (per-channel requantization, Jacob §2.2 eq. 5-6). Computed as :func:`fixed_point_multiply` (one floor
    division; equal to the two primitives above, which the tests check).
    """
    return apply_multiplier(_int64(x), fixed_point_constants(multiplier, shift, "double"))


def check_int32(x: torch.Tensor) -> bool:
    """True when every value fits int32 (gemmlowp assumes accumulators never overflow)."""
    return x.numel() == 0 or (int(x.min()) >= INT32_MIN and int(x.max()) <= INT32_MAX)


def multiply_by_quantized_multiplier_single_rounding(x: torch.Tensor | int, multiplier: torch.Tensor | int,
                                                     shift: torch.Tensor | int) -> torch.Tensor:
    """TFLite ``MultiplyByQuantizedMultiplier`` built with ``TFLITE_SINGLE_ROUNDING``: one rounding, not two.

    ``total = 31 + n; (x · M0 + 2^(total-1)) >> total`` in int64 (ties round up, towards +inf). TFLite allows
    n in [-30, 31]; n > 31 gives 0 as above, and results outside int32 saturate.
    """
    return apply_multiplier(_int64(x), fixed_point_constants(multiplier, shift, "single"))
