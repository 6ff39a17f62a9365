"""The analysis notebook (a jupytext percent script) runs top to bottom on a results store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _record(run: Path, precision: str, width: float, top1: float, ms: float) -> None:
    run.mkdir(parents=True)
    record = {"schema": "qat.record/1", "model_id": f"mnv2-w{width}-{precision}",
              "model": {"arch": "mobilenet_v2", "width_mult": width, "resolution": 32},
              "quant": {"precision": precision, "weight_bits": 8 if precision == "int8" else 32,
                        "act_bits": 8 if precision == "int8" else 32}, "accuracy": {"top1": top1},
              "latency": {"engine": "torch_native_x86", "threads": 1, "batch": 1, "median_ms": ms}}
    (run / "record.json").write_text(json.dumps(record))


def test_notebook_runs_top_to_bottom(tmp_path: Path) -> None:
    records = tmp_path / "runs"
    _record(records / "0", "float", 0.5, 60.0, 2.4)
    _record(records / "1", "int8", 0.5, 59.5, 1.4)
    _record(records / "2", "float", 1.0, 73.0, 3.5)
    _record(records / "3", "int8", 1.0, 72.8, 1.5)
    (records / "4").mkdir()
    (records / "4" / "record.json").write_text("{ truncated")
    out = tmp_path / "out"
    env = {**os.environ, "QAT_RECORDS": str(records), "QAT_REPORT_OUT": str(out), "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(ROOT / "notebooks" / "tradeoff.py")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4 records" in result.stdout and "skipped 1" in result.stdout
    assert "Table 4.7" in result.stdout and "| 8 | 8 | -0.9 | -0.35 ± 0.21 | +0.55 | 2 |" in result.stdout
    assert (out / "tradeoff.png").stat().st_size > 10_000 and (out / "tradeoff.pdf").exists()
