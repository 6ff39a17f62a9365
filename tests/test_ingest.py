"""Ingest of latencies measured elsewhere: each tool's output format -> qat.latency/1 records the analysis joins.

The sample outputs follow the tools' printing code: ExecuTorch's executor_runner (ET_LOG lines
``I hh:mm:ss.uuuuuu executorch:file:line] msg``), ExecuTorch's Android minibench (Gson list of BenchmarkMetric),
onnxruntime_perf_test (console summary and the per-run result file).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pandas as pd
import pytest

from qat.analysis.latency import join_latency, load_latency_records
from qat.errors import QatError
from qat.latency.ingest import ingest_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ingest as ingest_app  # noqa: E402

RUNS_MS = [4.25, 4.0, 4.5, 4.125, 6.0]

RUNNER_LOG = """I 00:00:00.000512 executorch:executor_runner.cpp:203] Resetting threadpool with num threads = 4
I 00:00:00.001833 executorch:executor_runner.cpp:265] Model file mnv2.pte is loaded.
I 00:00:00.001840 executorch:executor_runner.cpp:274] Using method forward
I 00:00:00.001844 executorch:executor_runner.cpp:321] Setting up CPU planned buffer 0, size 3612672.
I 00:00:00.019876 executorch:executor_runner.cpp:352] Model loaded in 18.031000 ms.
""" + "".join(f"I 00:00:00.0{30 + i}000 executorch:executor_runner.cpp:540] Iteration {i + 1} of 5: {ms:f} ms\n"
              for i, ms in enumerate(RUNS_MS)) + f"""\
I 00:00:00.060000 executorch:executor_runner.cpp:552] Model executed successfully 5 time(s) in {sum(RUNS_MS):f} ms.
I 00:00:00.060010 executorch:executor_runner.cpp:560] 1 outputs:
OutputX 0: tensor(sizes=[1, 1000], [-0.21, 0.13, ...])
"""

MINIBENCH = [
    {"benchmarkModel": {"name": "mnv2-w1-r224-w8a8-1a2b3c4d", "backend": "", "quantization": ""},
     "metric": "avg_inference_latency(ms)", "actualValue": 7.5, "targetValue": 0.0,
     "deviceInfo": {"device": "google", "arch": "Pixel 7", "os": "Android 14", "totalMem": 0, "availMem": 0}},
    {"benchmarkModel": {"name": "mnv2-w1-r224-w8a8-1a2b3c4d", "backend": "", "quantization": ""},
     "metric": "trimmean_inference_latency(ms)", "actualValue": 7.25, "targetValue": 0.0,
     "deviceInfo": {"device": "google", "arch": "Pixel 7", "os": "Android 14", "totalMem": 0, "availMem": 0}},
    {"benchmarkModel": {"name": "mnv2-w1-r224-w8a8-1a2b3c4d", "backend": "", "quantization": ""},
     "metric": "model_load_time(ms)", "actualValue": 35.1, "targetValue": 0.0, "deviceInfo": {}},
    {"benchmarkModel": {"name": "mnv2-w1-r224-w8a8-1a2b3c4d", "backend": "", "quantization": ""},
     "metric": "load_status", "actualValue": 0.0, "targetValue": 0.0, "deviceInfo": {}},
]

ORT_CONSOLE = """Session creation time cost: 0.0731 s
First inference time cost: 9 ms
Total inference time cost: 0.2 s
Total inference requests: 40
Average inference time cost: 5 ms
Total inference run time: 0.2012 s
Number of inferences per second: 198.8
Avg CPU usage: 97 %
Peak working set size: 61349888 bytes
Min Latency: 0.0041 s
Max Latency: 0.0071 s
P50 Latency: 0.0048 s
P90 Latency: 0.0056 s
P95 Latency: 0.006 s
P99 Latency: 0.0069 s
P999 Latency: 0.0071 s
"""

ORT_RESULT = "".join(f"mnv2_int8,{ms / 1e3},61349888,97,{i}\n" for i, ms in enumerate(RUNS_MS)) + """
Min Latency: 0.004 s
Max Latency: 0.006 s
P50 Latency: 0.00425 s
P90 Latency: 0.006 s
P95 Latency: 0.006 s
P99 Latency: 0.006 s
P999 Latency: 0.006 s
"""

CSV = "model_id,device,engine,threads,batch,ms\n" + "".join(
    f"m-a,rpi5,onnxruntime,4,1,{ms}\n" for ms in RUNS_MS) + "m-b,rpi5,onnxruntime,4,1,9.5\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def accuracy_records(*model_ids: str) -> pd.DataFrame:
    return pd.DataFrame({"model_id": list(model_ids), "accuracy.top1": [70.0 + i for i in range(len(model_ids))]})


def run_app(argv: list[str]) -> int:
    return ingest_app.main(argv)


def test_executorch_runner_log_round_trip(tmp_path: Path) -> None:
    log = write(tmp_path, "runner.log", RUNNER_LOG)
    store = tmp_path / "store"
    assert run_app([str(log), "--format", "executorch_runner", "--model-id", "m-a", "--device", "pixel7",
                    "--batch", "1", "--out", str(store)]) == 0
    frame, skipped = load_latency_records(store)
    assert not skipped and len(frame) == 1
    row = frame.iloc[0]
    assert row["latency.median_ms"] == pytest.approx(statistics.median(RUNS_MS))
    assert row["latency.mean_ms"] == pytest.approx(statistics.fmean(RUNS_MS))
    assert row["latency.n"] == 5 and row["latency.threads"] == 4  # from "Resetting threadpool ... = 4"
    assert row["latency.engine"] == "executorch_xnnpack" and row["latency.device"] == "pixel7"
    joined = join_latency(accuracy_records("m-a", "m-other"), frame)
    assert joined.loc[joined["model_id"] == "m-a", "latency.median_ms"].item() == pytest.approx(4.25)
    assert joined.loc[joined["model_id"] == "m-other", "latency.median_ms"].isna().all()


def test_executorch_runner_summary_only_is_flagged_as_mean(tmp_path: Path) -> None:
    summary_only = "\n".join(line for line in RUNNER_LOG.splitlines() if "Iteration" not in line)
    (record,) = ingest_file(write(tmp_path, "old.log", summary_only), "executorch_runner", model_id="m",
                            device="d")
    assert record["median_ms"] == pytest.approx(sum(RUNS_MS) / 5) and record["median_is_mean"] is True


def test_minibench_json_round_trip_names_model_and_device(tmp_path: Path) -> None:
    path = write(tmp_path, "benchmark_results.json", json.dumps(MINIBENCH))
    store = tmp_path / "store"
    assert run_app([str(path), "--format", "executorch_minibench", "--threads", "4", "--batch", "1",
                    "--out", str(store)]) == 0
    frame, skipped = load_latency_records(store)
    assert not skipped and frame["model_id"].tolist() == ["mnv2-w1-r224-w8a8-1a2b3c4d"]
    assert frame["latency.device"].item() == "google Pixel 7" and frame["latency.median_ms"].item() == 7.5
    record = json.loads(Path(frame["latency.source"].item()).read_text())
    assert record["trimmean_ms"] == 7.25 and record["median_is_mean"] is True


def test_onnxruntime_console_and_result_file_round_trip(tmp_path: Path) -> None:
    (console,) = ingest_file(write(tmp_path, "perf.txt", ORT_CONSOLE), "onnxruntime_perf_test", model_id="m",
                             device="rpi5", threads=2, batch=1)
    assert console["median_ms"] == pytest.approx(4.8) and console["p90_ms"] == pytest.approx(5.6)
    assert console["mean_ms"] == pytest.approx(5.0) and console["n"] == 40 and "median_is_mean" not in console
    assert console["engine"] == "onnxruntime" and console["threads"] == 2
    (result,) = ingest_file(write(tmp_path, "result.csv", ORT_RESULT), "onnxruntime_perf_result", device="rpi5")
    assert result["model_id"] == "mnv2_int8"  # the model name the tool writes on every run line
    assert result["median_ms"] == pytest.approx(4.25) and result["n"] == 5
    assert result["p90_ms"] == pytest.approx(statistics.quantiles(RUNS_MS, n=10, method="inclusive")[-1])


def test_plain_csv_groups_rows_into_records(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert run_app([write(tmp_path, "phone.csv", CSV).as_posix(), "--format", "csv", "--out", str(store)]) == 0
    frame, _ = load_latency_records(store)
    by_model = frame.set_index("model_id")
    assert by_model.loc["m-a", "latency.median_ms"] == pytest.approx(4.25) and by_model.loc["m-a", "latency.n"] == 5
    assert by_model.loc["m-b", "latency.median_ms"] == 9.5 and by_model.loc["m-b", "latency.threads"] == 4
    joined = join_latency(accuracy_records("m-a", "m-b"), frame)
    assert joined["latency.median_ms"].notna().all() and len(joined) == 2


@pytest.mark.parametrize(("fmt", "text", "where"), [
    ("csv", CSV.replace("4,1,4.0\n", "4,1,fast\n"), "phone.txt:3"),
    ("csv", "model,device,engine,threads,batch,ms\nm,d,e,1,1,3\n", "phone.txt:1"),
    ("csv", CSV.replace("rpi5,onnxruntime,4,1,4.5", "rpi5,onnxruntime,four,1,4.5"), "phone.txt:4"),
    ("executorch_runner", RUNNER_LOG.replace("Iteration 2 of 5: 4.000000", "Iteration 2 of 5: -1"),
     "phone.txt:7"),
    ("executorch_runner", RUNNER_LOG.replace("Model executed successfully 5", "Model executed successfully 6"),
     "phone.txt:11"),
    ("executorch_runner", "I 00:00:00.000512 executorch:executor_runner.cpp:203] Model file x.pte is loaded.\n",
     "phone.txt"),
    ("onnxruntime_perf_test", ORT_CONSOLE.replace("Average inference time cost: 5 ms",
                                                  "Average inference time cost: n/a ms"), "phone.txt:5"),
    ("onnxruntime_perf_result", ORT_RESULT.replace("mnv2_int8,0.0045,", "mnv2_int8;0.0045;"), "phone.txt:3"),
    ("executorch_minibench", json.dumps(MINIBENCH, indent=1)[:-40], "phone.txt:"),
])
def test_malformed_files_name_file_and_line_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              fmt: str, text: str, where: str) -> None:
    path = write(tmp_path, "phone.txt", text)
    store = tmp_path / "store"
    assert run_app([str(path), "--format", fmt, "--model-id", "m", "--device", "d", "--out", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and f"{where}" in err
    assert not store.exists()


def test_missing_device_and_failed_load_are_errors(tmp_path: Path) -> None:
    with pytest.raises(QatError, match="does not say the device"):
        ingest_file(write(tmp_path, "perf.txt", ORT_CONSOLE), "onnxruntime_perf_test", model_id="m")
    failed = [dict(MINIBENCH[3], actualValue=34.0)]
    with pytest.raises(QatError, match="failed to load"):
        ingest_file(write(tmp_path, "b.json", json.dumps(failed)), "executorch_minibench")
    with pytest.raises(QatError, match="unknown value 'tflite'"):
        ingest_file(tmp_path / "b.json", "tflite")
