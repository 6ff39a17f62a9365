"""Fixed-point requantization multipliers (Jacob et al. 2018 §2.2, eq. 5-6; gemmlowp/TFLite).

A real multiplier M = S1·S2 / S3 is expressed as M = M0 · 2^-n with M0 an int32 in [2^30, 2^31) (i.e. the
normalized value in [0.5, 1) scaled by 2^31) and n a right shift.
"""

from __future__ import annotations

import math


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Return (M0, n) with real ≈ (M0 / 2^31) · 2^-n and M0 in [2^30, 2^31) (n < 0 is a left shift)."""
    if real <= 0.0:
        raise ValueError(f"requantization multiplier must be positive, got {real}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    m0 = round(mantissa * (1 << 31))
    if m0 == 1 << 31:  # rounding reached 1.0: renormalize
        m0 //= 2
        exponent += 1
    return m0, -exponent


def multiplier_value(m0: int, shift: int) -> float:
    """The real number represented by (M0, n)."""
    return m0 / float(1 << 31) * 2.0 ** (-shift)
