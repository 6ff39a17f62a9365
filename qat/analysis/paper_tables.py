"""The papers' tables (``results/reference/*.csv``) and how our records are matched to their rows.

Each :class:`PaperTable` names its reference CSV, the paper columns that identify a row, and for each
compared column the record column holding our value. A row's matcher turns the paper row into conditions
on record columns (``{"model.arch": "resnet50", "method": "qat", ...}``; a tuple means "any of", a
callable is a predicate); ``None`` means no model or setting of ours corresponds, so the cell stays
missing. ``dataset`` conditions (ImageNet-1k: 1000 classes; COCO) are added unless switched off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "results" / "reference"

Conditions = dict[str, Any]
Matcher = Callable[[pd.Series], Conditions | None]

IMAGENET: Conditions = {"task": "classification", "data.num_classes": 1000}
COCO: Conditions = {"task": "detection", "data.name": ("coco", "coco2017")}

GRANULARITY: dict[str, Conditions] = {  # whitepaper §2.1-2.3, Tables 2-6
    "asym_per_layer": {"quant.weight_per_channel": False, "quant.weight_symmetric": False},
    "sym_per_channel": {"quant.weight_per_channel": True, "quant.weight_symmetric": True},
    "asym_per_channel": {"quant.weight_per_channel": True, "quant.weight_symmetric": False},
}

WHITEPAPER_MODELS: dict[str, Conditions | None] = {
    "mobilenet_v1_1.0_224": {"model.arch": "mobilenet_v1", "model.width_mult": 1.0, "model.resolution": 224},
    "mobilenet_v2_1.0_224": {"model.arch": "mobilenet_v2", "model.width_mult": 1.0, "model.resolution": 224},
    "mobilenet_v2_1.4_224": {"model.arch": "mobilenet_v2", "model.width_mult": 1.4, "model.resolution": 224},
    "inception_v3": {"model.arch": "inception_v3", "model.resolution": 299},
    "resnet_v1_50": {"model.arch": "resnet50", "model.resolution": 224},  # torchvision's is v1.5
    "resnet_v1_152": {"model.arch": "resnet152", "model.resolution": 224},
    "resnet_v2_50": None,  # pre-activation ResNets and NASNet are not in our registry
    "resnet_v2_152": None,
    "nasnet_mobile": None,
    "mobilenet_v1_1.0_224_ssd": None,
}
PTQ_METHODS = ("ptq_minmax",)  # the whitepaper's post-training quantization: min/max ranges


@dataclass(frozen=True)
class Compared:
    """One compared quantity: ``paper`` column of the CSV against record column ``ours``."""

    paper: str
    ours: str
    label: str
    paper_scale: float = 1.0  # paper value x scale = our unit (whitepaper top-1 fractions -> percent)
    delta: bool = True  # ours - paper is meaningful (same quantity, same conditions)
    match: Matcher | None = None  # overrides the table's matcher for this column


@dataclass(frozen=True)
class PaperTable:
    name: str
    csv: str
    title: str
    keys: tuple[str, ...]
    compared: tuple[Compared, ...]
    match: Matcher
    matching: str  # how records are matched to rows, in words (printed with the table)
    dataset: Conditions = field(default_factory=dict)
    shown: tuple[str, ...] = ()  # further paper columns shown as they are (e.g. the paper's std)

    def reference(self, directory: Path = REFERENCE_DIR) -> pd.DataFrame:
        return pd.read_csv(directory / self.csv)


def _bits(w: Any, a: Any) -> Conditions:
    return {"quant.weight_bits": int(w), "quant.act_bits": int(a)}


def _jacob_resnet(row: pd.Series) -> Conditions | None:
    if row["model"] != "resnet50":
        return None  # Jacob's ResNet-100/150 are not torchvision's ResNet-101/152
    base = {"model.arch": "resnet50", "model.resolution": 224}
    if row["scheme"] == "float":
        return {**base, "method": "float"}
    return {**base, "method": "qat", **_bits(row["weight_bits"], row["act_bits"])}


def _jacob_schemes(row: pd.Series) -> Conditions | None:
    if not str(row["scheme"]).startswith("integer-only"):
        return None  # BWN, TWN, INQ, FGQ: other papers' methods
    return {"model.arch": "resnet50", "model.resolution": 224, "method": "qat", **_bits(8, 8)}


def _jacob_inception(row: pd.Series) -> Conditions | None:
    base = {"model.arch": "inception_v3", "model.resolution": 299}
    if row["scheme"] == "float":  # torchvision's Inception v3 uses ReLU; we have no float ReLU6 variant
        return {**base, "method": "float"} if row["activation"] == "relu" else None
    return {**base, "method": "qat", "quant.activation": row["activation"], **_bits(row["bits"], row["bits"])}


def _jacob_coco(row: pd.Series) -> Conditions | None:
    base = {"model.width_mult": float(row["depth_multiplier"])}
    return {**base, "method": "float"} if row["scheme"] == "float" else {**base, "method": "qat", **_bits(8, 8)}


def _jacob_bit_grid(row: pd.Series) -> Conditions | None:
    return {"method": "qat", **_bits(row["weight_bits"], row["act_bits"])}


def _whitepaper_ptq(row: pd.Series) -> Conditions | None:
    model = WHITEPAPER_MODELS.get(row["model"])
    if model is None:
        return None
    what, scheme = row["quantized"], row["granularity_symmetry"]
    if what == "float":
        return {**model, "method": "float"}
    if what == "activations":
        return {**model, "method": PTQ_METHODS, **_bits(32, 8)}
    bits = _bits(8, 8) if what == "weights+activations" else _bits(8, 32)
    return {**model, "method": PTQ_METHODS, **bits, **GRANULARITY[scheme]}


def _whitepaper_qat(row: pd.Series) -> Conditions | None:
    model = WHITEPAPER_MODELS.get(row["model"])
    if model is None:
        return None
    method = "qat" if row["method"] == "qat" else PTQ_METHODS
    return {**model, "method": method, **_bits(row["weight_bits"], row["act_bits"]),
            **GRANULARITY[row["granularity_symmetry"]]}


def _whitepaper_latency(kind: str) -> Matcher:
    def match(row: pd.Series) -> Conditions | None:
        model = WHITEPAPER_MODELS.get(row["model"])
        if model is None:
            return None
        return {**model, "method": "float"} if kind == "float" else {**model, "quant.precision": "int8",
                                                                     **_bits(8, 8)}

    return match


def _torchvision_mbv3(row: pd.Series) -> Conditions | None:
    base = {"model.arch": "mobilenet_v3_large", "model.width_mult": 1.0, "model.resolution": 224}
    if row["scheme"] == "float":
        return {**base, "method": "float"}
    # torch.ao's qnnpack QAT qconfig: per-tensor symmetric int8 weights (configs/experiment/torchvision_mbv3_qat)
    return {**base, "method": "qat", **_bits(row["weight_bits"], row["act_bits"]),
            "quant.weight_per_channel": False, "quant.weight_symmetric": True}


TOP1 = "accuracy.top1"

TABLES: dict[str, PaperTable] = {t.name: t for t in (
    PaperTable(
        "jacob2018_table4_1", "jacob2018_table4_1_resnet_imagenet.csv",
        "Jacob et al. 2018, Table 4.1: ResNet on ImageNet, float vs integer-quantized (top-1 %)",
        ("model", "scheme", "weight_bits", "act_bits"), (Compared("top1", TOP1, "top-1"),), _jacob_resnet,
        "ResNet-50 at 224 (torchvision, v1.5); float = method float, int8_qat = method qat with those bits. "
        "ResNet-100/150: no such model here.", IMAGENET),
    PaperTable(
        "jacob2018_table4_2", "jacob2018_table4_2_resnet50_schemes.csv",
        "Jacob et al. 2018, Table 4.2: ResNet-50 on ImageNet against other low-bit schemes (top-1 %)",
        ("scheme", "weight_bits", "act_bits"), (Compared("top1", TOP1, "top-1"),), _jacob_schemes,
        "Only the integer-only row: ResNet-50 at 224, method qat, w8a8. The other schemes are other papers'.",
        IMAGENET),
    PaperTable(
        "jacob2018_table4_3", "jacob2018_table4_3_inception_v3.csv",
        "Jacob et al. 2018, Table 4.3: Inception v3 on ImageNet, ReLU vs ReLU6, 8 and 7 bits (%)",
        ("activation", "scheme", "bits"),
        (Compared("top1", TOP1, "top-1"), Compared("recall5", "accuracy.top5", "recall@5")), _jacob_inception,
        "Inception v3 at 299; qat rows: method qat, weight and activation bits = bits, quant.activation = "
        "activation; float ReLU row: method float (ReLU6 float has no counterpart).", IMAGENET,
        ("top1_std", "recall5_std")),
    PaperTable(
        "jacob2018_table4_4", "jacob2018_table4_4_coco_ssd_mobilenet.csv",
        "Jacob et al. 2018, Table 4.4: COCO MobileNet-SSD, mAP (%) and latency (ms)",
        ("depth_multiplier", "scheme"),
        (Compared("mAP", "accuracy.map", "mAP"),
         Compared("latency_ms_sd835_big", "latency.median_ms", "latency ms", delta=False)),
        _jacob_coco,
        "Detection records on COCO with model.width_mult = depth multiplier; float = method float, int8 = "
        "method qat w8a8. The paper's latency is on a Snapdragon 835 big core, ours on our engine and device "
        "(latency.*), so no delta.", COCO),
    PaperTable(
        "jacob2018_table4_7", "jacob2018_table4_7_face_attr_bitdepth_avg_precision_delta.csv",
        "Jacob et al. 2018, Table 4.7: bit-depth ablation, change vs float (points)",
        ("weight_bits", "act_bits"),
        (Compared("delta_avg_precision_pct", "delta_vs_float", "change vs float"),), _jacob_bit_grid,
        "Method qat at those weight/activation bits, any model and dataset (the paper's face-attribute data is "
        "not public): ours = run accuracy − its float baseline. Restrict with where= to one model.", {}),
    PaperTable(
        "whitepaper2018_table2_3", "whitepaper2018_table2_3_ptq_8bit.csv",
        "Krishnamoorthi 2018, Tables 2-3: 8-bit post-training quantization on ImageNet (top-1 %)",
        ("model", "quantized", "granularity_symmetry"),
        (Compared("top1", TOP1, "top-1", paper_scale=100.0),), _whitepaper_ptq,
        "Model by name (mobilenet_v1/v2 width and resolution, inception_v3 at 299, resnet_v1_* = torchvision "
        "resnet*); method ptq_minmax; weights = w8 with float activations (act_bits 32), activations = a8 with "
        "float weights; granularity from quant.weight_per_channel and quant.weight_symmetric.", IMAGENET),
    PaperTable(
        "whitepaper2018_table4_5_6", "whitepaper2018_table4_5_6_qat.csv",
        "Krishnamoorthi 2018, Tables 4-6: QAT vs PTQ at 8 and 4 bits on ImageNet (top-1 %)",
        ("model", "method", "weight_bits", "act_bits", "granularity_symmetry"),
        (Compared("top1", TOP1, "top-1", paper_scale=100.0),), _whitepaper_qat,
        "Model by name as for Tables 2-3; qat = method qat, ptq = method ptq_minmax; bits and granularity as "
        "in the row.", IMAGENET),
    PaperTable(
        "whitepaper2018_table7", "whitepaper2018_table7_latency.csv",
        "Krishnamoorthi 2018, Table 7: latency (ms), float vs 8-bit",
        ("model",),
        (Compared("float_cpu_ms", "latency.median_ms", "float ms", delta=False,
                  match=_whitepaper_latency("float")),
         Compared("int8_cpu_ms", "latency.median_ms", "int8 ms", delta=False,
                  match=_whitepaper_latency("int8"))),
        _whitepaper_latency("float"),
        "Model by name; float = method float, int8 = any w8a8 integer run. The paper's times are on one Pixel 2 big "
        "core, ours on our engines and devices (latency.*), so no delta.", IMAGENET),
    PaperTable(
        "torchvision_mbv3_qat", "torchvision_mobilenet_v3_large_qat.csv",
        "torchvision: MobileNetV3-Large on ImageNet, float IMAGENET1K_V1 vs int8 QAT on qnnpack (%)",
        ("model", "scheme"),
        (Compared("top1", TOP1, "top-1"), Compared("top5", "accuracy.top5", "top-5")), _torchvision_mbv3,
        "mobilenet_v3_large x1.0 at 224; float = method float (the IMAGENET1K_V1 weights evaluated), "
        "int8_qat_qnnpack = method qat w8a8 with per-tensor symmetric weights (experiment=torchvision_mbv3_qat). "
        "torchvision's int8 top-1 is of its own qnnpack model; ours is the run's primary engine's.", IMAGENET),
)}  # fmt: skip


__all__ = ["COCO", "IMAGENET", "TABLES", "Compared", "PaperTable"]
