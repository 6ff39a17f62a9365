"""The Hydra run app end to end on a tiny generated dataset, and its handling of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSIFICATION, overrides

from qat.engines.torch_native import build
from qat.intmodel.graph import IntModel
from qat.quant import cpu_kernel

ROOT = Path(__file__).resolve().parents[1]
TINY = overrides(TINY_CLASSIFICATION, {"latency.repeats": 20, "latency.warmup": 3, "train.threads": None})


def run_app(args: list[str], tmp_path: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QAT_CACHE": str(tmp_path / "cache")}
    env.pop("QAT_DEBUG", None)
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), *args, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_int8_run_writes_record_and_integer_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    engines = ["reference", "onnxruntime", "executorch_xnnpack"]
    result = run_app([*TINY, "quant=w8a8", f"latency.eval_engines=[{','.join(engines)}]"], tmp_path, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["schema"] == "qat.record/1" and record["quant"]["precision"] == "int8"
    assert record["quant"]["bn_fold"] == "whitepaper"  # read back from the folded conv modules
    assert record["training"] == {"device": "cpu", "world_size": 1, "batch_size_per_process": 16, "autocast": "none",
                                  "memory_format": "channels_last", "checkpoint_every_steps": 0, "compiled": False,
                                  "compile_mode": None, **cpu_kernel.describe()}  # fused_cpu where it builds
    acc = record["accuracy"]
    assert {"float_top1", "sim_top1", "int_top1", "top1"} <= set(acc) and acc["top1"] == acc["int_top1"]
    assert acc["top5"] == acc["int_top5"] >= acc["int_top1"] and acc["float_top5"] >= acc["float_top1"]
    assert record["latency"]["engine"] == "torch_native_x86" and record["latency"]["n"] >= 20
    assert record["latency"]["median_ms"] > 0 and record["latency_float"]["median_ms"] > 0
    assert record["fidelity"]["sim_vs_int_top1_agreement"] >= 90.0
    fidelity = record["fidelity"]["engines"]
    assert set(fidelity) == {"torch_native_x86", *engines}
    for name, result in fidelity.items():  # every engine ran the integer model and was compared LSB by LSB
        assert result["status"] == "ok" and result["agreement_with_sim"] >= 90.0, name
        assert result["logits_within_1lsb"] > 0 and result["engine_version"], name
    assert fidelity["reference"]["engine"] == "reference_single_rounding"
    # the deployment target of this host, the recipe it ran (read back from the model) and its saturation
    target, saturation = record["target"], record["saturation"]
    assert target["name"] in ("x86_vnni", "x86_avx2", "arm", "generic") and target["host_flags"] == \
        record["host"]["cpu_flags"]
    assert record["quant"]["weight_bits"] == (7 if target["name"] == "x86_avx2" else 8)
    assert record["quant"]["weight_quantizers"] > 0 and record["quant"]["calibration_batches"] == 4
    if target["constraints"]:
        assert record["quant"]["config_differences"]["weight_bits"] == {"config": 8, "ran": 7}
    assert saturation["images"] == 32 and saturation["pair_sums"] > 0 and saturation["layers"]
    if target["accumulation"] == "pair16":
        assert saturation["overflowing_pair_sums"] == 0 and saturation["predicted_to_disagree_here"] == []
    # the saved integer model runs on the int8 engine and reproduces the recorded predictions' accuracy class
    int_model = IntModel.load(run_dir / "int_model.pt")
    logits = build(int_model)(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 4)
    assert (run_dir / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.full  # a run resuming in make test: the preempted submitit job of test_launchers resumes to its
# twin's record, and test_detection_pipeline resumes mid-epoch on the same training engine
def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    """Kill a run after its first float epoch; the same command in the same run directory resumes and ends
    with the metrics of an uninterrupted run."""
    args = [*TINY, "quant=w8a8", "train.float_epochs=3", "train.threads=1"]
    reference = tmp_path / "reference"
    reference.mkdir()
    assert run_app(args, reference, reference / "run").returncode == 0
    expected = json.loads((reference / "run" / "record.json").read_text())

    work = tmp_path / "work"
    work.mkdir()
    run_dir = work / "run"
    env = {**os.environ, "QAT_CACHE": str(work / "cache")}
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "[float] epoch 1/3" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    assert not (run_dir / "record.json").exists() and (run_dir / "checkpoints" / "float_last.pt").exists()
    resumed = run_app(args, work, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    record = json.loads((run_dir / "record.json").read_text())
    assert record["accuracy"] == expected["accuracy"]
    assert record["fidelity"]["sim_vs_int_top1_agreement"] == expected["fidelity"]["sim_vs_int_top1_agreement"]


@pytest.mark.slow
def test_mobilenet_v3_run_writes_an_integer_record_and_best_checkpoint(tmp_path: Path) -> None:
    """MobileNet v3 converts (issue 18): int_model.pt, int8 latency on torch_native, fidelity on the reference and
    on ONNX Runtime, whose record says which of the v3 ops it runs in float between DequantizeLinear/QuantizeLinear."""
    run_dir = tmp_path / "run"
    result = run_app([*TINY, "model=mobilenet_v3_small", "model.resolution=32", "quant=w8a8", "train.keep_best=true"],
                     tmp_path, run_dir)  # the demo preset (TINY's) validates only after the last epoch
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "ok" and (run_dir / "int_model.pt").exists()
    assert record["latency"]["median_ms"] > 0 and record["latency"]["engine"].startswith("torch_native")
    engines = record["fidelity"]["engines"]
    assert engines["reference"]["agreement_with_sim"] >= 0.9
    assert engines["onnxruntime"]["status"] == "ok" and engines["onnxruntime"]["agreement_with_sim"] >= 0.9
    assert "hardswish: float HardSigmoid, Mul between DequantizeLinear and QuantizeLinear" in \
        engines["onnxruntime"]["elementwise_kernels"]
    for phase in ("float", "qat"):  # the best-validation checkpoint of each phase is kept beside the last
        assert (run_dir / "checkpoints" / f"{phase}_best.pt").exists()


@pytest.mark.slow
@pytest.mark.full  # 77 s on 2 cores (two XNNPACK lowerings of v3); make test covers target=arm end to end in
# test_torchvision_mbv3_qat and ExecuTorch on v3 in test_mobilenet_v3_engines
def test_mobilenet_v3_on_the_arm_target_runs_executorch(tmp_path: Path) -> None:
    """On target=arm ExecuTorch-XNNPACK is the primary engine: a v3 run measures its latency and records how it
    runs hardswish, hardsigmoid and the SE mul (issue 18)."""
    run_dir = tmp_path / "run"
    result = run_app([*TINY, "model=mobilenet_v3_small", "model.resolution=32", "quant=w8a8", "target=arm",
                      "latency.eval_engines=[reference,executorch_xnnpack]"], tmp_path, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "ok" and record["latency"]["engine"] == "executorch_xnnpack"
    assert record["latency"]["median_ms"] > 0
    executorch = record["fidelity"]["engines"]["executorch_xnnpack"]
    assert executorch["status"] == "ok" and executorch["agreement_with_sim"] >= 0.9
    assert executorch["elementwise_kernels"].startswith(
        "hardswish: delegated to XNNPACK in fp32 (XNNHardswish(fp32->fp32)")
    assert "hardsigmoid: delegated to XNNPACK in fp32" in executorch["elementwise_kernels"]
