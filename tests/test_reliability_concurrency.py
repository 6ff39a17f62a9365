"""Records under concurrency, kills and a full disk (issue 10 items 3 and 5).

Eight writer processes write 50 records each into their own run directories under one tree and rewrite one
shared run directory, while another process collects the tree again and again with
``qat.analysis.records.load_records``: every collected record parses and verifies, nothing is lost, and the
one unreadable record planted in the tree is listed and skipped each time. A writer killed mid-write and a
write that hits the file-size limit leave no partial record.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from qat.analysis.records import load_records
from qat.records import write_record

WRITERS, RECORDS = 8, 50

WRITER = """
import hashlib, json, random, sys
from pathlib import Path
from qat.records import write_record
root, k, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(k)
for i in range(n):
    blob = "".join(rng.choice("abcdef") for _ in range(rng.randrange(10, 20000)))
    record = {"model_id": f"m{k}-{i}", "quant": {"precision": "int8"}, "accuracy": {"top1": 50.0},
              "writer": k, "index": i, "blob": blob, "sha": hashlib.sha256(blob.encode()).hexdigest()}
    write_record(root / f"writer{k}" / f"run{i:03d}", record)
    write_record(root / "shared", record)
"""

COLLECTOR = """
import hashlib, json, sys, time
from pathlib import Path
from qat.analysis.records import load_records
root, stop = Path(sys.argv[1]), Path(sys.argv[2])
passes, bad, sizes, skipped_seen, listed = 0, [], [], set(), 0
Path(sys.argv[3]).touch()  # imports done: the writers may start
while True:
    last = stop.exists()
    frame, skipped = load_records(root)
    passes += 1
    sizes.append(len(frame))
    skipped_seen.update(f"{p}|{reason.split(':')[0]}" for p, reason in skipped)
    listed += any(p.parent.name == "broken" for p, _ in skipped)
    for row in frame.to_dict("records"):
        if row.get("blob") is not None and hashlib.sha256(row["blob"].encode()).hexdigest() != row["sha"]:
            bad.append(row["record_path"])
    if last:
        break
print(json.dumps({"passes": passes, "bad": bad, "sizes": sizes, "skipped": sorted(skipped_seen),
                  "listed": listed}))
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kwargs)


def test_eight_writers_and_a_collector_lose_and_corrupt_nothing(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    broken = root / "broken" / "record.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"schema": "qat.record/1", "model_id": "half a rec')  # a record cut by a crash elsewhere
    stop, ready = tmp_path / "stop", tmp_path / "ready"
    collector = _python(COLLECTOR, str(root), str(stop), str(ready), stdout=subprocess.PIPE)
    deadline = time.time() + 120
    while not ready.exists() and collector.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    writers = [_python(WRITER, str(root), str(k), str(RECORDS)) for k in range(WRITERS)]
    for writer in writers:
        assert writer.wait(timeout=300) == 0
    stop.touch()
    out, _ = collector.communicate(timeout=300)
    assert collector.returncode == 0
    report = json.loads(out)

    assert report["bad"] == []  # every collected record was whole
    assert report["skipped"] == [f"{broken}|invalid JSON"]  # only the planted one, listed every pass
    assert report["listed"] == report["passes"]
    assert report["passes"] >= 2 and report["sizes"] == sorted(report["sizes"])  # records only ever appear
    assert report["sizes"][-1] == WRITERS * RECORDS + 1
    assert any(1 < size < WRITERS * RECORDS + 1 for size in report["sizes"])  # collected while they wrote

    frame, skipped = load_records(root)
    assert [p for p, _ in skipped] == [broken]
    assert len(frame) == WRITERS * RECORDS + 1
    expected = {(k, i) for k in range(WRITERS) for i in range(RECORDS)}
    rows = frame[frame["record_path"].str.contains("/writer")]
    assert set(zip(rows["writer"], rows["index"], strict=True)) == expected
    shared = json.loads((root / "shared" / "record.json").read_text())
    assert shared["index"] == RECORDS - 1  # the shared directory holds one writer's last record, whole
    assert not list(root.rglob("*.tmp"))  # no temporary file left behind


def test_writer_killed_mid_write_leaves_whole_records_only(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    writer = _python(WRITER, str(root), "0", "100000")
    deadline = time.time() + 60
    while time.time() < deadline and len(list(root.glob("writer0/*/record.json"))) < 20:
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    frame, skipped = load_records(root)
    assert skipped == [] and len(frame) >= 21
    for path in root.rglob("record.json"):
        record = json.loads(path.read_text())
        assert record["model_id"].startswith("m0-") and len(record["sha"]) == 64
    # a temporary file of the interrupted write may remain; it is never read as a record
    assert all(p.name.startswith(".record.json.") for p in root.rglob("*.tmp"))


DISK_FULL = """
import json, resource, signal, sys
from pathlib import Path
from qat.records import write_record
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # writes past 4 KiB fail like a full disk (EFBIG)
try:
    write_record(sys.argv[1], {"model_id": "new", "quant": {"precision": "int8"}, "accuracy": {"top1": 1.0},
                               "blob": "x" * 100000})
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
"""


def test_write_past_the_size_limit_keeps_the_old_record_and_no_partial_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    old = write_record(run_dir, {"model_id": "old", "quant": {"precision": "int8"}, "accuracy": {"top1": 2.0}})
    before = old.read_bytes()
    assert resource.RLIMIT_FSIZE  # the limit used below exists on this platform
    proc = _python(DISK_FULL, str(run_dir), stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and json.loads(out)["errno"] in (27, 28)  # EFBIG / ENOSPC
    assert old.read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["record.json"]
