"""Average pooling of integer codes: one implementation for the reference executor and the simulation.

Average pooling keeps its input's (S, Z) (Jacob §2.4): the output code is Z + round(T / N), with T the window's
sum of centred codes q − Z and N its element count (padded positions hold real 0.0, i.e. q = Z). Exact ties
round **half to even on the centred mean** T / N, as the simulation's fake quantizer rounds ``r/S`` and as
torch's quantized average pools do on the channels-last tensors its convolutions produce (x86, fbgemm) and
always (qnnpack). Measured in ``tests/test_pooling.py``: torch's x86 kernel on contiguous NCHW tensors and ONNX
Runtime's QDQ pools round the mean code Σq / N half to even instead, the same rule wherever Z is even; TFLite's
reference ``AveragePool`` rounds half away from zero. With 2×2 windows a quarter of all values are ties and a
squeeze-excite gate carries each into the logits, so the rule matters: it is the simulation's and most engines'.

The simulation (:class:`qat.quant.pooling.GridAveragePool`) calls :func:`average_pool_centred` on its own
codes, so simulation and integer model agree exactly at every pool, ties included.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

FLOAT32_EXACT = 2**24  # float32 holds every integer of magnitude <= 2^24 (24-bit significand)


def divide_half_even(total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """round(total / count) for int64 tensors, exact ties to even (``nearbyint`` of the exact quotient)."""
    count = torch.as_tensor(count, dtype=torch.int64, device=total.device)
    quotient = torch.div(total, count, rounding_mode="floor")
    twice_rest = 2 * (total - quotient * count)  # in [0, 2·count)
    up = (twice_rest > count) | ((twice_rest == count) & (quotient % 2 == 1))
    return quotient + up.to(torch.int64)


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows: [floor(i·size/out), ceil((i+1)·size/out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """PyTorch's ``pooling_output_shape`` (the last window must start inside the padded input)."""
    span = size + 2 * pad - kernel
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def window_counts(size: int, kernel: int, stride: int, pad: int, out: int, include_pad: bool) -> torch.Tensor:
    """Per-output-position element count of PyTorch's avg_pool2d along one axis."""
    counts = []
    for i in range(out):
        start = i * stride - pad
        end = min(start + kernel, size + pad)
        counts.append(end - start if include_pad else min(end, size) - max(start, 0))
    return torch.tensor(counts, dtype=torch.int64)


def _pair(value: Any) -> list[Any]:
    return [value, value] if value is None or isinstance(value, int) else list(value)


def _adaptive(centred: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    x64 = centred.to(torch.int64)
    size = [s if s is not None else centred.shape[2 + i] for i, s in enumerate(_pair(attrs["output_size"]))]
    rows = []
    for h0, h1 in adaptive_bins(centred.shape[2], size[0]):
        cols = [divide_half_even(x64[:, :, h0:h1, w0:w1].sum((2, 3)), (h1 - h0) * (w1 - w0))
                for w0, w1 in adaptive_bins(centred.shape[3], size[1])]
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def _windowed(centred: torch.Tensor, attrs: dict[str, Any], largest: int) -> torch.Tensor:
    (kh, kw), (sh, sw), (ph, pw) = _pair(attrs["kernel_size"]), _pair(attrs["stride"]), _pair(attrs["padding"])
    h, w = centred.shape[2], centred.shape[3]
    ceil_mode = attrs.get("ceil_mode", False)
    oh, ow = pool_output_size(h, kh, sh, ph, ceil_mode), pool_output_size(w, kw, sw, pw, ceil_mode)
    extra_h, extra_w = max(0, (oh - 1) * sh + kh - h - 2 * ph), max(0, (ow - 1) * sw + kw - w - 2 * pw)
    exact = torch.float32 if kh * kw * largest < FLOAT32_EXACT else torch.float64
    padded = F.pad(centred.to(exact), (pw, pw + extra_w, ph, ph + extra_h))
    sums = F.avg_pool2d(padded, (kh, kw), (sh, sw), 0, divisor_override=1).to(torch.int64)  # exact sums
    if attrs.get("divisor_override"):
        count = torch.full((oh, ow), int(attrs["divisor_override"]), dtype=torch.int64)
    else:
        include = attrs.get("count_include_pad", True)
        count = torch.outer(window_counts(h, kh, sh, ph, oh, include), window_counts(w, kw, sw, pw, ow, include))
    return divide_half_even(sums, count.to(centred.device))


def average_pool_centred(centred: torch.Tensor, attrs: dict[str, Any], largest: int) -> torch.Tensor:
    """Pooled centred codes round(T / N) (int64) of centred input codes q − Z (integer values in any dtype).

    ``attrs`` are the integer model's ``avg_pool`` attributes; ``largest`` bounds |q − Z| (float32 window sums
    below 2^24 are exact, else float64)."""
    return _adaptive(centred, attrs) if attrs["adaptive"] else _windowed(centred, attrs, largest)


def float_average_pool(x: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    """The float op the ``avg_pool`` attributes describe (the simulation's pool before rounding)."""
    if attrs["adaptive"]:
        return F.adaptive_avg_pool2d(x, attrs["output_size"])
    return F.avg_pool2d(x, attrs["kernel_size"], attrs["stride"], attrs["padding"], attrs.get("ceil_mode", False),
                        attrs.get("count_include_pad", True), attrs.get("divisor_override"))


def functional_pool_attrs(node: Any) -> dict[str, Any] | None:
    """The ``avg_pool`` attributes of an FX call to ``F.adaptive_avg_pool2d``; None for any other function
    (``F.avg_pool2d`` has no integer form yet)."""
    if node.target is not F.adaptive_avg_pool2d:
        return None
    size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
    return {"adaptive": True, "output_size": _pair(size)}


def pool_attrs(module: torch.nn.Module) -> dict[str, Any]:
    """The ``avg_pool`` attributes of an ``nn.AdaptiveAvgPool2d`` or ``nn.AvgPool2d``."""
    if isinstance(module, torch.nn.AdaptiveAvgPool2d):
        return {"adaptive": True, "output_size": _pair(module.output_size)}
    assert isinstance(module, torch.nn.AvgPool2d)
    return {"adaptive": False, "kernel_size": _pair(module.kernel_size),
            "stride": _pair(module.stride if module.stride is not None else module.kernel_size),
            "padding": _pair(module.padding), "ceil_mode": bool(module.ceil_mode),
            "count_include_pad": bool(module.count_include_pad), "divisor_override": module.divisor_override}


__all__ = ["FLOAT32_EXACT", "adaptive_bins", "average_pool_centred", "divide_half_even", "float_average_pool",
           "functional_pool_attrs", "pool_attrs", "pool_output_size", "window_counts"]
