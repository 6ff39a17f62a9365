"""experiment=torchvision_mbv3_qat (torchvision's MobileNetV3-Large QAT recipe): its demo twist runs end to end
into an integer record, and the paper table torchvision_mbv3_qat matches records to torchvision's rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import TINY_CLASSIFICATION, overrides
from test_run_app import run_app

from qat.analysis import build_table, load_records
from qat.analysis.paper_tables import TABLES

# 4 classes x 24 images at batch 16: 6 steps per epoch; one float and one QAT epoch, with BN statistics frozen
# after 2 QAT steps and ranges after 4 (the recipe's order: BN first, then ranges)
TINY = overrides(TINY_CLASSIFICATION, {
    "experiment": "torchvision_mbv3_qat_demo", "model.width_mult": None, "train.float_epochs": 1,
    "schedule.bn_freeze_step": 2, "schedule.range_freeze_step": 4, "latency.repeats": 5, "train.threads": 1,
    "target.diagnostic_images": 0})


@pytest.mark.slow
def test_demo_twist_writes_an_integer_record_with_engine_fidelity(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_app(TINY, tmp_path, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert (run_dir / "int_model.pt").exists()
    assert record["experiment"] == "torchvision_mbv3_qat_demo" and record["method"] == "qat"
    assert record["model"]["arch"] == "mobilenet_v3_small" and record["quant"]["precision"] == "int8"
    q = record["quant"]
    assert (q["weight_per_channel"], q["weight_symmetric"], q["weight_narrow_range"]) == (False, True, False)
    assert record["schedule"]["bn_freeze_step"] == 2 and record["schedule"]["range_freeze_step"] == 4
    assert record["target"]["name"] == "arm" and record["latency"]["engine"] == "torch_native_qnnpack"
    fidelity = record["fidelity"]["engines"]
    assert {"reference", "torch_native_qnnpack"} <= set(fidelity)
    for name in ("reference", "torch_native_qnnpack"):
        assert fidelity[name]["status"] == "ok", (name, fidelity[name])
        assert fidelity[name]["agreement_with_sim"] >= 90.0, (name, fidelity[name])
    assert record["accuracy"]["top1"] == record["accuracy"]["int_top1"]


def _record(method: str, top1: float, top5: float, per_channel: bool = False, **model: Any) -> dict[str, Any]:
    quant = ({"precision": "float", "weight_bits": 32, "act_bits": 32} if method == "float" else
             {"precision": "int8", "weight_bits": 8, "act_bits": 8, "weight_per_channel": per_channel,
              "weight_symmetric": True})
    arch = {"arch": "mobilenet_v3_large", "width_mult": 1.0, "resolution": 224, "num_classes": 1000, **model}
    return {"schema": "qat.record/1", "model_id": f"{method}-{per_channel}-{arch['arch']}", "seed": 0,
            "method": method, "experiment": "torchvision_mbv3_qat", "task": "classification", "model": arch,
            "data": {"name": "imagefolder", "num_classes": 1000}, "quant": quant,
            "accuracy": {"top1": top1, "top5": top5}}


def test_paper_table_matches_float_and_per_tensor_qat_rows(tmp_path: Path) -> None:
    runs = {"float": _record("float", 74.0, 91.3), "qat": _record("qat", 72.5, 90.5),
            "per_channel": _record("qat", 99.0, 99.0, per_channel=True),  # not torchvision's qnnpack scheme
            "small": _record("qat", 99.0, 99.0, arch="mobilenet_v3_small")}
    for name, content in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "record.json").write_text(json.dumps(content))
    records, _ = load_records(tmp_path)
    table = build_table(records, "torchvision_mbv3_qat").set_index("scheme")
    reference = TABLES["torchvision_mbv3_qat"].reference()
    assert isinstance(reference, pd.DataFrame) and list(reference["scheme"]) == ["float", "int8_qat_qnnpack"]
    assert table.loc["float", "top-1 paper"] == 74.042 and table.loc["int8_qat_qnnpack", "top-5 paper"] == 90.858
    assert table.loc["float", "top-1 ours"] == pytest.approx(74.0)
    assert table.loc["int8_qat_qnnpack", "top-1 n"] == 1
    assert table.loc["int8_qat_qnnpack", "top-1 ours"] == pytest.approx(72.5)
    assert table.loc["int8_qat_qnnpack", "top-5 Δ"] == pytest.approx(90.5 - 90.858)
