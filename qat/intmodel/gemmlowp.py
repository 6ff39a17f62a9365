"""gemmlowp / TFLite fixed-point primitives, vectorized over torch int64 tensors (Jacob et al. 2018 §2.2).

Each function is bit-exact to its namesake in gemmlowp ``fixedpoint/fixedpoint.h`` or TFLite
``kernels/internal/common.h`` (the default, double-rounding ``MultiplyByQuantizedMultiplier``). Values are
carried in int64 tensors so that the int32 products of the C++ code are exact; results are int32 values
(checked by :func:`saturating_cast` or by construction) in int64 containers.

Shift convention: this project stores a multiplier as (M0, n) with M = M0 · 2^-31 · 2^-n, so n > 0 is a right
shift; TFLite's ``shift`` argument is -n.
"""

from __future__ import annotations

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


def multiply_by_quantized_multiplier(x: torch.Tensor, multiplier: torch.Tensor | int,
                                     shift: torch.Tensor | int) -> torch.Tensor:
    """TFLite ``MultiplyByQuantizedMultiplier(x, M0, -n)``: round(x · M0 · 2^-31 · 2^-n) in fixed point.

    ``left = max(-n, 0)``, ``right = max(n, 0)``;
    ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x · 2^left, M0), right)``. ``x · 2^left`` overflows
    int32 in C++ (undefined there); here it saturates, which gives the same clamped layer output because then
    |x · M| >= 2^30 lies far outside every activation grid. A right shift n > 31 (M < 2^-32) gives 0, as TFLite's
    ``QuantizeMultiplier`` flushes such multipliers to zero. ``multiplier``/``shift`` broadcast against ``x``
    (per-channel requantization, Jacob §2.2 eq. 5-6).
    """
    x, multiplier, shift = _int64(x), _int64(multiplier), _int64(shift)
    left = torch.clamp(-shift, min=0, max=32)  # x · 2^32 saturates for every x != 0
    right = torch.clamp(shift, min=0)
    shifted = saturating_cast(torch.bitwise_left_shift(x, left), INT32_MIN, INT32_MAX)
    high = saturating_rounding_doubling_high_mul(shifted, multiplier)
    result = rounding_divide_by_pot(high, torch.clamp(right, max=31))
    return torch.where(right > 31, torch.zeros_like(result), result)


def check_int32(x: torch.Tensor) -> bool:
    """True when every value fits int32 (gemmlowp assumes accumulators never overflow)."""
    return x.numel() == 0 or (int(x.min()) >= INT32_MIN and int(x.max()) <= INT32_MAX)


def multiply_by_quantized_multiplier_single_rounding(x: torch.Tensor, multiplier: torch.Tensor | int,
                                                     shift: torch.Tensor | int) -> torch.Tensor:
    """TFLite ``MultiplyByQuantizedMultiplier`` built with ``TFLITE_SINGLE_ROUNDING``: one rounding, not two.

    ``total = 31 + n; (x · M0 + 2^(total-1)) >> total`` in int64 (ties round up, towards +inf). TFLite allows
    n in [-30, 31]; n > 31 gives 0 as above, and results outside int32 saturate.
    """
    x, multiplier, shift = _int64(x), _int64(multiplier), _int64(shift)
    if bool((shift < -30).any()):
        raise ValueError(f"single-rounding requantization needs n >= -30, got {shift.min().item()}")
    total = 31 + torch.clamp(shift, max=31)
    rounding = torch.bitwise_left_shift(torch.ones_like(total), total - 1)
    result = saturating_cast(torch.bitwise_right_shift(x * multiplier + rounding, total), INT32_MIN, INT32_MAX)
    return torch.where(shift > 31, torch.zeros_like(result), result)
