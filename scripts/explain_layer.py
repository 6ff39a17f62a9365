"""Worked example of the integer arithmetic of one real layer of a saved int_model.pt (Jacob et al. 2018 §2).

Runs the integer-only reference executor on one image, then recomputes one output value of a conv2d or
linear layer step by step: the int32 accumulator with its zero-point terms (Jacob eq. 7), the bias, the
requantization by M = S_in·S_w/S_out = M0·2^-31·2^-n (eq. 5-6) through gemmlowp's
SaturatingRoundingDoublingHighMul and RoundingDivideByPOT, + Z_out and the activation clamp (§2.4), and checks
the result against the executor.

    .venv/bin/python scripts/explain_layer.py outputs/.../int_model.pt --layer features_1_conv_0_0 \\
        --image ~/.cache/qat/data/demo-*/val/<class>/<file>.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from qat.errors import QatError
from qat.intmodel.gemmlowp import rounding_divide_by_pot, saturating_rounding_doubling_high_mul
from qat.intmodel.graph import IntModel, IntNode
from qat.intmodel.reference import ReferenceExecutor


def load_image(path: str | None, shape: list[int], seed: int) -> tuple[torch.Tensor, str]:
    """One image with the demo's validation transform, or seeded N(0, 1) noise when no path is given."""
    resolution = shape[-1] if shape else 32
    if path is None:
        torch.manual_seed(seed)
        return torch.randn(1, 3, resolution, resolution), f"seeded N(0,1) noise (seed {seed})"
    from PIL import Image

    from qat.data.imagefolder import classification_transforms

    file = Path(path).expanduser()
    if not file.is_file():
        raise QatError("--image", f"{file} is not a file", "give the path of a PNG/JPEG image")
    _, val = classification_transforms(resolution)
    return val(Image.open(file).convert("RGB")).unsqueeze(0), str(file)


def pick_layer(model: IntModel, name: str | None) -> IntNode:
    layers = [n for n in model.nodes if n.op in ("conv2d", "linear")]
    if name is None:
        return layers[min(1, len(layers) - 1)]
    for node in layers:
        if node.name == name:
            return node
    raise QatError("--layer", f"no conv2d/linear layer named {name!r}",
                   "layers: " + ", ".join(n.name for n in layers[:6]) + ", ...")


def receptive_field(node: IntNode, q_in: torch.Tensor, z_in: int, channel: int, y: int, x: int) -> torch.Tensor:
    """The raw input integers one output value reads (padding holds Z_in, i.e. real 0.0)."""
    if node.op == "linear":
        return q_in[0].to(torch.int64)
    a = node.attrs
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    c_out, c_in_group, kh, kw = node.tensors["weight"].shape
    group = channel // (c_out // a["groups"])
    padded = F.pad(q_in.to(torch.int64) - z_in, (pw, pw, ph, ph)) + z_in
    rows = slice(y * sh, y * sh + dh * (kh - 1) + 1, dh)
    cols = slice(x * sw, x * sw + dw * (kw - 1) + 1, dw)
    return padded[0, group * c_in_group:(group + 1) * c_in_group, rows, cols]


def _step(label: str, value: int, note: str = "") -> str:
    return f"  {label:<44s} {value:>10d}" + (f"   ({note})" if note else "")


def _show(t: torch.Tensor, limit: int = 12) -> str:
    flat = t.flatten().tolist()
    text = ", ".join(str(v) for v in flat[:limit])
    return f"[{text}{', ...' if len(flat) > limit else ''}] ({len(flat)} values)"


def explain(model: IntModel, node: IntNode, image: torch.Tensor, where: str, channel: int,
            position: tuple[int, int] | None) -> str:
    reference = ReferenceExecutor(model)
    values = reference.run_layers(image)
    in_q, out_q = model.node(node.inputs[0]).out, node.out
    q_in, q_out = values[node.inputs[0]], values[node.name]
    if node.op == "conv2d":
        y, x = position if position is not None else (q_out.shape[2] // 2, q_out.shape[3] // 2)
        index: tuple[int, ...] = (0, channel, y, x)
    else:
        y = x = 0
        index = (0, channel)
    patch = receptive_field(node, q_in, in_q.zero_point, channel, y, x)
    w = node.tensors["weight"][channel].to(torch.int64)
    z_in, z_w = in_q.zero_point, int(node.tensors["weight_zero_point"][channel])
    s_w = float(node.tensors["weight_scale"][channel])
    m0, n = int(node.tensors["multiplier"][channel]), int(node.tensors["shift"][channel])
    bias = int(node.tensors["bias"][channel])
    k = patch.numel()
    sum_qq, sum_q_in, sum_q_w = int((patch * w).sum()), int(patch.sum()), int(w.sum())
    acc_no_bias = sum_qq - z_w * sum_q_in - z_in * sum_q_w + k * z_in * z_w
    acc = acc_no_bias + bias
    high = int(saturating_rounding_doubling_high_mul(acc, m0))
    shifted = int(rounding_divide_by_pot(high, n)) if n >= 0 else None
    lo, hi = int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"])
    assert shifted is not None, "left-shift multipliers (M > 1) are not covered by this walkthrough"
    result = min(max(shifted + out_q.zero_point, lo), hi)
    executor = int(q_out[index])
    real_m = in_q.scale * s_w / out_q.scale
    a = node.attrs
    kind = node.op
    if node.op == "conv2d":
        kind += f" {list(w.shape[1:])} kernel, stride {a['stride']}, groups {a['groups']}"
    lines = [
        f"layer {node.name}: {kind}, activation {a.get('activation', 'none')}; input image: {where}",
        f"input  (S_in, Z_in)   = ({in_q.scale:.6g}, {z_in}), {in_q.bits}-bit [{in_q.qmin}, {in_q.qmax}]",
        f"weight (S_w, Z_w)     = ({s_w:.6g}, {z_w}) for output channel {channel}, "
        f"{a['weight_bits']}-bit [{a['weight_qmin']}, {a['weight_qmax']}]",
        f"output (S_out, Z_out) = ({out_q.scale:.6g}, {out_q.zero_point}), clamp [{lo}, {hi}]",
        f"M = S_in·S_w/S_out = {real_m:.9g} = M0·2^-31·2^-n with M0 = {m0}, n = {n} "
        f"(M0·2^-31 = {m0 / 2**31:.9f})",
        f"output value at index {list(index)}:",
        f"  q_in  {_show(patch)}",
        f"  q_w   {_show(w)}",
        _step("Σ q_in·q_w", sum_qq),
        _step(f"- Z_w·Σ q_in = -{z_w}·({sum_q_in})", -z_w * sum_q_in),
        _step(f"- Z_in·Σ q_w = -{z_in}·({sum_q_w})", -z_in * sum_q_w),
        _step(f"+ K·Z_in·Z_w = {k}·{z_in}·{z_w}", k * z_in * z_w),
        _step("= Σ (q_in - Z_in)(q_w - Z_w)", acc_no_bias),
        _step("+ bias (int32, scale S_in·S_w)", bias),
        _step("= int32 accumulator acc", acc),
        _step("SaturatingRoundingDoublingHighMul(acc, M0)", high, "round(acc·M0 / 2^31)"),
        _step(f"RoundingDivideByPOT(·, n={n})", shifted, f"round(· / 2^{n})"),
        _step(f"+ Z_out ({out_q.zero_point})", shifted + out_q.zero_point),
        _step(f"clamp to [{lo}, {hi}]", result),
        _step("reference executor's value", executor, "same" if executor == result else "DIFFERENT"),
        f"  in real numbers: S_out·(q - Z_out) = {out_q.scale * (result - out_q.zero_point):.6g}; before rounding "
        f"acc·S_in·S_w = {acc * in_q.scale * s_w:.6g} (acc·M = {acc * real_m:.4f} output LSBs)",
    ]
    if executor != result:
        raise RuntimeError("\n".join(lines))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("int_model", help="path of a saved int_model.pt")
    parser.add_argument("--layer", help="conv2d/linear node name (default: the second such layer)")
    parser.add_argument("--image", help="image file (demo validation transform); default: seeded noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channel", type=int, default=0, help="output channel")
    parser.add_argument("--position", type=int, nargs=2, metavar=("Y", "X"), help="output pixel (default centre)")
    args = parser.parse_args(argv)
    try:
        model = IntModel.load(args.int_model)
        node = pick_layer(model, args.layer)
        if not 0 <= args.channel < node.tensors["weight"].shape[0]:
            raise QatError("--channel", f"{args.channel} is not a channel of {node.name}",
                           f"choose 0..{node.tensors['weight'].shape[0] - 1}")
        image, where = load_image(args.image, model.input_shape, args.seed)
        print(explain(model, node, image, where, args.channel, tuple(args.position) if args.position else None))
    except QatError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
