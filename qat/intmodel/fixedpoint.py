"""Fixed-point requantization multipliers (Jacob et al. 2018 §2.2, eq. 5-6; gemmlowp/TFLite).

A real multiplier M = S1·S2 / S3 is expressed as M = M0 · 2^-n with M0 an int32 in [2^30, 2^31) (i.e. the
normalized value in [0.5, 1) scaled by 2^31) and n a right shift. Rounding of M0 follows TFLite's
``QuantizeMultiplier`` (``std::round``: ties away from zero).
"""

from __future__ import annotations

import math

ADD_LEFT_SHIFT_8BIT = 20  # TFLite's ``left_shift`` for uint8/int8 ADD (kernels/add.cc)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Return (M0, n) with real ≈ (M0 / 2^31) · 2^-n and M0 in [2^30, 2^31) (n < 0 is a left shift)."""
    if not real > 0.0 or math.isinf(real):
        raise ValueError(f"requantization multiplier must be positive and finite, got {real}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    m0 = math.floor(mantissa * (1 << 31) + 0.5)  # exact in double; ties away from zero like std::round
    if m0 == 1 << 31:  # rounding reached 1.0: renormalize
        m0 //= 2
        exponent += 1
    return m0, -exponent


def multiplier_value(m0: int, shift: int) -> float:
    """The real number represented by (M0, n)."""
    return m0 / float(1 << 31) * 2.0 ** (-shift)


def add_left_shift(bits: int) -> int:
    """Headroom shift of the quantized ADD: TFLite's 20 for 8-bit grids, less for wider grids.

    |q - Z| < 2^bits, so (q - Z)·2^L < 2^30 keeps the sum of two rescaled inputs inside int32.
    """
    return min(ADD_LEFT_SHIFT_8BIT, 30 - bits)


def add_multipliers(input_scales: list[float], output_scale: float, left_shift: int
                    ) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """TFLite quantized ADD parameters (kernels/add.cc ``PrepareGeneralSubOp``/``Prepare8BitSubOp``).

    With s = 2·max(S_i): input multipliers S_i / s (< 1) and output multiplier s / (2^L · S_out).
    """
    twice_max = 2.0 * max(input_scales)
    inputs = [quantize_multiplier(s / twice_max) for s in input_scales]
    return inputs, quantize_multiplier(twice_max / ((1 << left_shift) * output_scale))
