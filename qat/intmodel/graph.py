"""The canonical integer model: a small, versioned, engine-neutral graph of integer ops (Jacob §2).

Every tensor between ops is quantized with (S, Z) and a bit width; weights are integers with per-channel or
per-tensor scales and zero point 0 (symmetric) or Z; biases are int32 with scale S_in·S_w and zero point 0
(Jacob §2.4); each conv/linear stores its requantization multipliers M = S_in·S_w / S_out as (M0, n)
(Jacob §2.2) and its fused activation as a clamp of the output's integer range (Jacob §2.4). Engines are
built from this one file, so all engines run the same integers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qat.errors import QatError
from qat.records import atomic_write_bytes

FORMAT = "qat.intmodel"
FORMAT_VERSION = 1

OPS = ("quantize", "conv2d", "linear", "add", "avg_pool", "max_pool", "flatten", "cat", "dequantize")


@dataclass
class TensorQ:
    """Quantization of an activation tensor: r = scale · (q - zero_point), q in [qmin, qmax]."""

    scale: float
    zero_point: int
    bits: int
    signed: bool
    qmin: int
    qmax: int


@dataclass
class IntNode:
    name: str
    op: str
    inputs: list[str]
    out: TensorQ | None
    attrs: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class IntModel:
    nodes: list[IntNode]
    input_shape: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def node(self, name: str) -> IntNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def min_bits(self) -> int:
        """The narrowest integer grid of any weight or activation (engines run <8-bit grids in 8-bit containers)."""
        bits = [n.out.bits for n in self.nodes if n.out is not None]
        bits += [int(n.attrs["weight_bits"]) for n in self.nodes if "weight_bits" in n.attrs]
        return min(bits) if bits else 8

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "input_shape": self.input_shape, "meta": self.meta,
                "nodes": [{"name": n.name, "op": n.op, "inputs": n.inputs,
                           "out": asdict(n.out) if n.out else None, "attrs": n.attrs, "tensors": n.tensors}
                          for n in self.nodes]}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model as one file, atomically."""
        import io

        buffer = io.BytesIO()
        torch.save(self.to_dict(), buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IntModel:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise QatError("intmodel", f"{path} does not exist", "give the path of a saved int_model.pt") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise QatError("intmodel", f"{path} is not a qat integer model", "give the path of a saved int_model.pt")
        if data.get("version") != FORMAT_VERSION:
            raise QatError("intmodel", f"{path} has format version {data.get('version')}, "
                           f"this qat reads {FORMAT_VERSION}", "convert the model again with this version")
        unknown = sorted({n["op"] for n in data["nodes"]} - set(OPS))
        if unknown:
            raise QatError("intmodel", f"{path} uses ops this qat does not know: {', '.join(unknown)}",
                           "upgrade qat or convert the model again")
        nodes = [IntNode(name=n["name"], op=n["op"], inputs=list(n["inputs"]),
                         out=TensorQ(**n["out"]) if n["out"] else None, attrs=dict(n["attrs"]),
                         tensors=dict(n["tensors"])) for n in data["nodes"]]
        return cls(nodes=nodes, input_shape=list(data["input_shape"]), meta=dict(data["meta"]))
