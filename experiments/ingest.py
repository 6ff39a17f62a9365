"""Ingest latencies measured on another device into the results store as ``qat.latency/1`` records.

    python experiments/ingest.py runner.log --format executorch_runner --manifest exports/mnv2_int8 \\
        --device pixel7 --out results/store
    python experiments/ingest.py perf.txt --format onnxruntime_perf_test --model-id mnv2-w1-r224-w8a8-1a2b3c4d \\
        --device rpi5 --threads 4 --batch 1 --out results/store
    python experiments/ingest.py phone.csv --format csv --out results/store  # model_id,device,engine,threads,batch,ms

Formats and what each tool prints: ``qat/latency/ingest.py``. ``--manifest`` (a ``qat.export`` directory) gives the
model id, engine and batch of the exported file that was run. One record file per measurement,
``<out>/latency-<device>-<engine>-<model_id>-t<threads>-b<batch>.json``, which ``experiments/report.py`` joins
with the accuracy records on ``model_id``. Every file is parsed before anything is written; a malformed file
stops the command with one line naming ``file:line`` (exit status 2).
"""

from __future__ import annotations

import argparse
import sys

from qat.errors import ArgumentParser, one_line_errors
from qat.latency.ingest import FORMATS, ingest_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="tool outputs to ingest")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", required=True, help="results-store directory the records are written into")
    parser.add_argument("--manifest", help="export directory whose manifest.json names the model that was run")
    parser.add_argument("--model-id")
    parser.add_argument("--device", help="device name, e.g. pixel7 (minibench files name it themselves)")
    parser.add_argument("--engine", help="engine name (default: executorch_xnnpack / onnxruntime by format)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--batch", type=int)
    return parser.parse_args(argv)


@one_line_errors(exit=False)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    written = ingest_files(args.files, args.format, args.out, manifest=args.manifest, model_id=args.model_id,
                           device=args.device, engine=args.engine, threads=args.threads, batch=args.batch)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
