"""The canonical integer model: a small, versioned, engine-neutral graph of integer ops (Jacob §2).

Every tensor between ops is quantized with (S, Z) and a bit width; weights are integers with per-channel or
per-tensor scales and zero point 0 (symmetric) or Z; biases are int32 with scale S_in·S_w and zero point 0
(Jacob §2.4); each conv/linear stores its requantization multipliers M = S_in·S_w / S_out as (M0, n)
(Jacob §2.2) and its fused activation as a clamp of the output's integer range (Jacob §2.4); add and cat
store their input/output multipliers too (format version 2), mul its M = S_a·S_b/S_out (TFLite MUL);
hardswish and hardsigmoid need only their two grids (:mod:`qat.intmodel.elementwise`). Engines are built
from this one file, so all engines run the same integers.
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
FORMAT_VERSION = 2  # 2: add/cat carry their requantization multipliers, avg_pool its full torch attributes

# hardswish, hardsigmoid and mul joined version 2 as new ops: a reader without them names the op and asks for
# an upgrade (IntModel.validate), so the files of older versions still load unchanged
OPS = ("quantize", "conv2d", "linear", "add", "avg_pool", "max_pool", "flatten", "cat", "hardswish", "hardsigmoid",
       "mul", "dequantize")

_MATMUL_TENSORS = ("weight", "weight_zero_point", "bias", "multiplier", "shift")
REQUIRED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # op -> (tensors, attrs) an executor needs
    "quantize": ((), ()),
    "conv2d": (_MATMUL_TENSORS, ("stride", "padding", "dilation", "groups", "clamp_min", "clamp_max")),
    "linear": (_MATMUL_TENSORS, ("clamp_min", "clamp_max")),
    "add": (("input_multiplier", "input_shift", "multiplier", "shift"), ("left_shift", "clamp_min", "clamp_max")),
    "cat": (("input_multiplier", "input_shift"), ("dim", "left_shift", "clamp_min", "clamp_max")),
    "avg_pool": ((), ("adaptive",)),
    "max_pool": ((), ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "flatten": ((), ("start_dim",)),
    "hardswish": ((), ()),
    "hardsigmoid": ((), ()),
    "mul": (("multiplier", "shift"), ("clamp_min", "clamp_max")),
    "dequantize": ((), ()),
}


@dataclass
class TensorQ:
    """Quantization of an activation tensor: r = scale · (q - zero_point), q in [qmin, qmax]."""

    scale: float
    zero_point: int
    bits: int
    signed: bool
    qmin: int
    qmax: int

    @property
    def uint8_offset(self) -> int:
        """What x86/quint8 kernels add to this grid's codes: 128 for signed grids (same scale, Z + 128), else 0."""
        return 128 if self.signed else 0

    @property
    def uint8_zero_point(self) -> int:
        """The zero point in those kernels' uint8 container."""
        return self.zero_point + self.uint8_offset


def as_pair(value: int | list[int] | tuple[int, ...]) -> list[int]:
    """A 2-d attribute (stride, padding, kernel size, ...) stored as an int or a pair, as ``[h, w]``."""
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


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

    def validate(self, where: str = "integer model") -> None:
        """Raise a QatError naming ``where`` and the node when the graph is not executable as stored."""
        seen: set[str] = set()
        for n in self.nodes:
            if n.op not in OPS:
                raise QatError("intmodel", f"{where}: node {n.name} uses op {n.op!r}, which this qat does not know",
                               "upgrade qat or convert the model again")
            tensors, attrs = REQUIRED[n.op]
            missing = [k for k in tensors if not isinstance(n.tensors.get(k), torch.Tensor)]
            missing += [k for k in attrs if k not in n.attrs]
            if n.op not in ("dequantize",) and n.out is None:
                missing.append("out")
            if missing:
                raise QatError("intmodel", f"{where}: node {n.name} ({n.op}) lacks {', '.join(missing)}",
                               "the file is damaged or was not written by qat.intmodel.convert; convert again")
            unknown = [i for i in n.inputs if i not in seen]
            if unknown or (n.op != "quantize" and not n.inputs):
                raise QatError("intmodel", f"{where}: node {n.name} reads {unknown or 'nothing'}, not earlier nodes",
                               "the file is damaged; convert the model again")
            seen.add(n.name)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IntModel:
        """Read a file written by :meth:`save`; any damage is a QatError naming the file, never a partial model."""
        fix = "give the path of an int_model.pt written by qat (convert the model again if it was damaged)"
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise QatError("intmodel", f"{path} does not exist", "give the path of a saved int_model.pt") from exc
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types on truncated or garbage files
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise QatError("intmodel", f"{path} is not a readable integer-model file ({reason})", fix) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise QatError("intmodel", f"{path} is not a qat integer model", "give the path of a saved int_model.pt")
        if data.get("version") != FORMAT_VERSION:
            raise QatError("intmodel", f"{path} has format version {data.get('version')}, "
                           f"this qat reads {FORMAT_VERSION}", "convert the model again with this version")
        try:
            nodes = [IntNode(name=str(n["name"]), op=str(n["op"]), inputs=[str(i) for i in n["inputs"]],
                             out=TensorQ(**n["out"]) if n["out"] else None, attrs=dict(n["attrs"]),
                             tensors=dict(n["tensors"])) for n in data["nodes"]]
            model = cls(nodes=nodes, input_shape=list(data["input_shape"]), meta=dict(data["meta"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise QatError("intmodel", f"{path} has a damaged node list ({type(exc).__name__}: {exc})", fix) from exc
        model.validate(str(path))
        return model
