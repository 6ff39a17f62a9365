"""16-bit pair accumulation of x86 int8 kernels without VNNI: prediction and emulation.

On x86 CPUs without VNNI, int8 GEMM kernels (fbgemm, ONNX Runtime's MLAS u8s8) multiply uint8 activations by
int8 weights with ``vpmaddubsw``: it adds each *pair* of adjacent products along the reduction axis in
**saturating 16-bit** arithmetic, and only then widens to int32 (``vpmaddwd`` with ones). A pair of
255 · 127 products reaches 64770 > 32767, so such sums clip and the layer's output leaves the integer model's
(Jacob eq. 7) exact result. With weights on a 7-bit grid (|w| ≤ 64: 2 · 255 · 64 = 32640) or activations in
[0, 127] (2 · 127 · 128 = 32512) no pair can clip (OpenVINO's 7-bit weights; torch.ao's ``reduce_range``).

The kernels form pairs over the reduction axis in their packed order. We model it as fbgemm's and MLAS's
NHWC im2col order: kernel row, kernel column, then input channel innermost, pairs (k, k+1) for even k, an odd
tail paired with zero. Bit-exactness is not claimed (packing details differ); the tests state how closely the
emulation follows fbgemm's AVX2 kernels. Activations are the raw uint8 codes the kernels see (a signed grid is
shifted by 128, as the engines do); zero-point corrections are applied after the saturated sum, in int32.

Depthwise convolutions are left out: the engines run them on kernels that widen to 16 bits first
(qnnpack/XNNPACK, MLAS's depthwise kernel), and ``torch_native`` routes fbgemm's saturating depthwise kernel to
qnnpack (``qat.engines.torch_native``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qat.intmodel.graph import IntModel, IntNode, TensorQ, as_pair

INT16_MIN, INT16_MAX = -32768, 32767
_CHUNK_ELEMENTS = 1 << 24  # pair sums materialised at once (float32: 64 MiB)


def uint8_codes(q: torch.Tensor, grid: TensorQ) -> torch.Tensor:
    """The uint8 codes an x86 kernel reads: signed grids are shifted by 128 (same scale, Z + 128)."""
    return q.to(torch.int64) + grid.uint8_offset


def is_pair16_layer(node: IntNode) -> bool:
    """Layers whose int8 GEMM accumulates in 16-bit pairs on x86 without VNNI (conv with groups 1, linear)."""
    return node.op == "linear" or (node.op == "conv2d" and int(node.attrs["groups"]) == 1)


def conv_columns(x_u8: torch.Tensor, node: IntNode, pad_code: int) -> torch.Tensor:
    """im2col of a conv input in (kh, kw, c) order, c innermost: [N, K, L] with padding by the zero-point code."""
    a = node.attrs
    weight = node.tensors["weight"]
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    pad = as_pair(a["padding"])
    x = x_u8.to(torch.float32)
    if any(pad):
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]), value=float(pad_code))
    cols = F.unfold(x, (kh, kw), dilation=tuple(as_pair(a["dilation"])), stride=tuple(as_pair(a["stride"])))
    # cols: [N, C·kh·kw, L] with c outermost
    n, _, length = cols.shape
    channels = x.shape[1]
    return cols.reshape(n, channels, kh * kw, length).transpose(1, 2).reshape(n, kh * kw * channels, length)


def weight_rows(node: IntNode) -> torch.Tensor:
    """Weights as [OC, K] in the same (kh, kw, c) order as :func:`conv_columns` (linear: as stored)."""
    w = node.tensors["weight"].to(torch.float32)
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w


def _paired(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Pad the reduction axis to even length with zeros and split it into (pairs, 2)."""
    k = t.shape[axis]
    if k % 2:
        pad = [0, 0] * (t.dim() - 1 - axis) + [0, 1]
        t = F.pad(t, pad)
    shape = list(t.shape)
    shape[axis: axis + 1] = [shape[axis] // 2, 2]
    return t.reshape(shape)


def pair_sums(cols: torch.Tensor, rows: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Pair sums u[2p]·w[2p] + u[2p+1]·w[2p+1] (exact in float32) of columns [N, K, L] and weight rows [OC, K],
    yielded per chunk of output channels as (channels, [N, OC_chunk, P, L])."""
    u = _paired(cols, 1)  # [N, P, 2, L], paired once for every chunk
    w = _paired(rows, 1)  # [OC, P, 2]
    n, pairs, _, length = u.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, n * pairs * length))
    for start in range(0, w.shape[0], step):
        oc = slice(start, min(w.shape[0], start + step))
        wc = w[oc]
        yield oc, (u[:, None, :, 0, :] * wc[None, :, :, 0, None]) + (u[:, None, :, 1, :] * wc[None, :, :, 1, None])


def _as_columns(x_codes: torch.Tensor, node: IntNode, grid: TensorQ) -> torch.Tensor:
    """A layer's input codes as the uint8 columns [N, K, L] its x86 kernel multiplies."""
    x_u8 = uint8_codes(x_codes, grid)
    if node.op == "conv2d":
        return conv_columns(x_u8, node, grid.uint8_zero_point)
    return x_u8.to(torch.float32).reshape(x_u8.shape[0], -1, 1)  # linear: [N, K, 1]


def saturated_accumulator(x_codes: torch.Tensor, node: IntNode, grid: TensorQ) -> torch.Tensor:
    """The int32 accumulator an AVX2 kernel returns: Σ_p sat16(pair_p) − Z_in·Σ_k w_k (− Z_w terms) + bias.

    Equals Jacob eq. 7's Σ (q_in − Z_in)(q_w − Z_w) + bias whenever no pair sum leaves int16."""
    cols = _as_columns(x_codes, node, grid)
    rows = weight_rows(node)
    n, k, length = cols.shape
    z_in = grid.uint8_zero_point
    sums = torch.empty(n, rows.shape[0], length, dtype=torch.int64)
    for oc, pairs in pair_sums(cols, rows):
        sums[:, oc] = pairs.clamp_(INT16_MIN, INT16_MAX).sum(2, dtype=torch.float64).to(torch.int64)
    w64 = node.tensors["weight"].to(torch.int64).reshape(rows.shape[0], -1)
    w_zp = node.tensors["weight_zero_point"].to(torch.int64).reshape(-1, 1)
    acc = sums - z_in * w64.sum(1).reshape(1, -1, 1)
    if bool((w_zp != 0).any()):  # asymmetric weights: the kernels subtract Z_w·Σ u and add K·Z_in·Z_w
        acc = acc - w_zp.reshape(1, -1, 1) * cols.sum(1, dtype=torch.float64).to(torch.int64)[:, None, :]
        acc = acc + k * z_in * w_zp.reshape(1, -1, 1)
    acc = acc + node.tensors["bias"].to(torch.int64).reshape(1, -1, 1)
    if node.op == "linear":
        return acc[..., 0]
    weight = node.tensors["weight"]
    oh, ow = _conv_out_hw(x_codes.shape[2:], node, weight.shape[2:])
    return acc.reshape(n, -1, oh, ow)


def _conv_out_hw(hw: torch.Size, node: IntNode, khw: torch.Size) -> tuple[int, int]:
    a = node.attrs
    stride, pad, dil = as_pair(a["stride"]), as_pair(a["padding"]), as_pair(a["dilation"])
    h, w = ((int(hw[i]) + 2 * pad[i] - dil[i] * (int(khw[i]) - 1) - 1) // stride[i] + 1 for i in range(2))
    return h, w


@dataclass
class LayerSaturation:
    """Counts for one layer over the images seen."""

    bound: int = 0  # the largest |pair sum| the layer's grids allow: 2 · max u · max |q_w|
    pair_sums: int = 0
    overflowing: int = 0
    outputs: int = 0
    outputs_affected: int = 0
    max_abs_pair: int | None = None  # observed; None where the bound already rules overflow out

    def as_dict(self) -> dict[str, float | int | None]:
        return {"bound": self.bound, "can_overflow": self.bound > INT16_MAX,
                "pair_sums": self.pair_sums, "overflowing_pair_sums": self.overflowing,
                "overflow_share": self.overflowing / self.pair_sums if self.pair_sums else 0.0,
                "outputs": self.outputs, "outputs_affected": self.outputs_affected,
                "outputs_affected_share": self.outputs_affected / self.outputs if self.outputs else 0.0,
                "max_abs_pair_sum": self.max_abs_pair}


def count_overflows(x_codes: torch.Tensor, node: IntNode, grid: TensorQ, into: LayerSaturation) -> None:
    """Add the overflowing pair sums of one batch of input codes of ``node`` to ``into``."""
    cols = _as_columns(x_codes, node, grid)
    n, _, length = cols.shape
    for _, s in pair_sums(cols, weight_rows(node)):
        over = (s > INT16_MAX) | (s < INT16_MIN)
        into.pair_sums += s.numel()
        into.overflowing += int(over.sum())
        into.outputs += n * s.shape[1] * length
        into.outputs_affected += int(over.any(2).sum())
        observed = int(s.abs().max()) if s.numel() else 0
        into.max_abs_pair = observed if into.max_abs_pair is None else max(into.max_abs_pair, observed)


@dataclass
class SaturationReport:
    """Per-layer 16-bit pair overflow of an integer model on given images (the record's ``saturation`` block)."""

    images: int = 0
    layers: dict[str, LayerSaturation] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        layers = {name: s.as_dict() for name, s in self.layers.items()}
        total = sum(s.pair_sums for s in self.layers.values())
        over = sum(s.overflowing for s in self.layers.values())
        flagged = [name for name, s in self.layers.items() if s.overflowing]
        worst = max(flagged, key=lambda name: layers[name]["overflow_share"], default=None)
        return {"arithmetic": "uint8 x int8 pairs summed in saturating int16 (x86 vpmaddubsw, no VNNI)",
                "images": self.images, "pair_sums": total, "overflowing_pair_sums": over,
                "overflow_share": over / total if total else 0.0, "layers_flagged": flagged,
                "worst_layer": worst, "layers": layers}


def weight_bound(node: IntNode) -> int:
    """max |q_w| of a layer: with u ≤ 255, no pair can overflow when 2 · 255 · max|q_w| ≤ 32767."""
    return int(node.tensors["weight"].abs().max()) if node.tensors["weight"].numel() else 0


def diagnose(int_model: IntModel, batches: list[torch.Tensor]) -> SaturationReport:
    """Run the integer reference on float image ``batches`` and count, per conv/linear layer, the pair sums an
    x86 kernel without VNNI would clip (layers whose weights and inputs cannot overflow are counted exactly
    without materialising pairs)."""
    from qat.intmodel.reference import ReferenceExecutor

    executor = ReferenceExecutor(int_model, rounding="single")
    grid_of = {n.name: n.out for n in int_model.nodes}
    layers = [n for n in int_model.nodes if is_pair16_layer(n)]
    report = SaturationReport(layers={n.name: LayerSaturation(bound=pair_bound(n, grid_of[n.inputs[0]]))
                                      for n in layers})
    for images in batches:
        values = executor.run_layers(images)
        report.images += images.shape[0]
        for node in layers:
            grid, x, stats = grid_of[node.inputs[0]], values[node.inputs[0]], report.layers[node.name]
            if stats.bound > INT16_MAX:
                count_overflows(x, node, grid, stats)
                continue
            weight = node.tensors["weight"]  # cannot overflow: count the pair sums without forming them
            spatial = 1 if node.op == "linear" else _prod(_conv_out_hw(x.shape[2:], node, weight.shape[2:]))
            stats.pair_sums += x.shape[0] * int(weight.shape[0]) * ((int(weight[0].numel()) + 1) // 2) * spatial
            stats.outputs += x.shape[0] * int(weight.shape[0]) * spatial
    return report


def _prod(values: tuple[int, int]) -> int:
    return values[0] * values[1]


def pair_bound(node: IntNode, grid: TensorQ) -> int:
    """The largest |pair sum| a layer's grids allow: 2 · (largest uint8 input code) · max |q_w|."""
    return 2 * (grid.qmax + grid.uint8_offset) * weight_bound(node)
