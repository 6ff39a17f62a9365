"""Where does a torch_native backend leave the integer-only reference? Layer by layer, on real images.

Runs a saved ``int_model.pt`` on PyTorch's quantized kernels (one backend) and on the reference executor
(gemmlowp/TFLite arithmetic, single rounding) over the same images. Each node of the engine is fed the reference's
own input codes, so a difference is that layer's own, not one inherited from upstream. For every node whose output
codes differ by more than one LSB somewhere, or whose 16-bit pair sums overflow (the saturation diagnostic,
``qat.intmodel.saturation``), it prints the largest difference, the share of values off by more than one, and the
share of pair sums that overflow: on x86 without VNNI the layers that leave the reference are flagged ones.

    .venv/bin/python scripts/engine_layer_diff.py outputs/demo/<sweep>/5 --backend fbgemm --images 200
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python scripts/engine_layer_diff.py <run>   # AVX2 kernels anywhere
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qat.compat.torch_private import make_per_tensor_quantized_tensor
from qat.data.imagefolder import build_classification_loaders
from qat.engines.torch_native import TorchNativeModel
from qat.intmodel.graph import IntModel, TensorQ
from qat.intmodel.reference import ReferenceExecutor
from qat.intmodel.saturation import diagnose


def layer_differences(int_model: IntModel, images: torch.Tensor, backend: str
                      ) -> list[tuple[str, str, int, float, float | None]]:
    """(node, op, max |Δ| in output codes, % of values off by more than 1, % of 16-bit pair sums overflowing or
    None for a layer without u8·s8 pair sums) for every quantized node, each fed the reference's input codes."""
    engine = TorchNativeModel(int_model, backend)
    reference = ReferenceExecutor(int_model, "single").run_layers(images)
    saturation = diagnose(int_model, [images]).layers
    grid = {n.name: n.out for n in int_model.nodes}
    rows = []
    with torch.inference_mode():
        for (name, inputs, fn), node in zip(engine.steps, int_model.nodes, strict=True):
            if node.out is None or name not in reference:
                continue
            value = fn(*(as_quantized(reference[i], grid[i]) for i in inputs)) if inputs else fn(images)
            if not value.is_quantized:
                continue
            diff = (value.int_repr().long() - node.out.uint8_offset - reference[name].long()).abs()
            layer = saturation.get(name)
            overflow = 100 * layer.overflowing / layer.pair_sums if layer and layer.pair_sums else None
            rows.append((name, node.op, int(diff.max()), float((diff > 1).float().mean() * 100), overflow))
    return rows


def as_quantized(codes: torch.Tensor, grid: TensorQ) -> torch.Tensor:
    """The reference's integer codes as the quint8 tensor torch_native runs on (signed grids shifted to uint8)."""
    return make_per_tensor_quantized_tensor((codes.to(torch.int64) + grid.uint8_offset).to(torch.uint8), grid.scale,
                                            grid.uint8_zero_point)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding int_model.pt and record.json")
    parser.add_argument("--backend", default="fbgemm", choices=["x86", "fbgemm", "qnnpack", "onednn"])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = json.loads((args.run_dir / "record.json").read_text())
    int_model = IntModel.load(args.run_dir / "int_model.pt")
    val = build_classification_loaders(record["data"]["root"], resolution=record["model"]["resolution"],
                                       batch_size=args.images).val
    images, _ = next(iter(val))
    print(f"{'node':<28}{'op':<10}{'max |Δ|':>9}{'% > 1 LSB':>11}{'% pairs overflowing':>21}")
    for name, op, worst, share, overflow in layer_differences(int_model, images, args.backend):
        if worst > 1 or overflow:
            shown = "—" if overflow is None else f"{overflow:.4f}"
            print(f"{name:<28}{op:<10}{worst:>9}{share:>11.3f}{shown:>21}")


if __name__ == "__main__":
    main()
