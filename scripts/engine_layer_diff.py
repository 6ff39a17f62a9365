"""Where does a torch_native backend leave the integer-only reference? Layer by layer, on real images.

Runs a saved ``int_model.pt`` on PyTorch's quantized kernels (one backend) and on the reference executor
(gemmlowp/TFLite arithmetic, single rounding) over the same images, and prints, for every node whose output codes
differ by more than one LSB somewhere, the largest difference and the share of values off by more than one.

    .venv/bin/python scripts/engine_layer_diff.py outputs/demo/<sweep>/5 --backend fbgemm --images 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qat.data.imagefolder import build_classification_loaders
from qat.engines.torch_native import TorchNativeModel
from qat.intmodel.graph import IntModel
from qat.intmodel.reference import ReferenceExecutor


def layer_differences(int_model: IntModel, images: torch.Tensor, backend: str) -> list[tuple[str, str, int, float]]:
    """(node, op, max |Δ| in output codes, % of values off by more than 1) for every quantized node."""
    engine = TorchNativeModel(int_model, backend)
    values: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, inputs, fn in engine.steps:
            values[name] = fn(*(values[i] for i in inputs)) if inputs else fn(images)
    reference = ReferenceExecutor(int_model, "single").run_layers(images)
    rows = []
    for node in int_model.nodes:
        value = values.get(node.name)
        if node.out is None or node.name not in reference or value is None or not value.is_quantized:
            continue
        codes = value.int_repr().long() - (128 if node.out.signed else 0)
        diff = (codes - reference[node.name].long()).abs()
        rows.append((node.name, node.op, int(diff.max()), float((diff > 1).float().mean() * 100)))
    return rows


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
    print(f"{'node':<28}{'op':<10}{'max |Δ|':>9}{'% > 1 LSB':>11}")
    for name, op, worst, share in layer_differences(int_model, images, args.backend):
        if worst > 1:
            print(f"{name:<28}{op:<10}{worst:>9}{share:>11.3f}")


if __name__ == "__main__":
    main()
