"""Re-run finished runs' integer models on int8 engines here, against the integer-only reference.

    python scripts/replay_engines.py RUN [RUN ...] --engines torch_native_x86 onnxruntime --out results/x.csv
    qemu-x86_64 -cpu Haswell .venv/bin/python scripts/replay_engines.py RUN ... --host-label "qemu Haswell"

For each run directory (``int_model.pt`` and ``record.json``) the run's validation images are evaluated on the
reference executor and on each engine; per engine the CSV row has top-1, top-1 agreement with the reference
(strict and tie-aware, :func:`qat.fidelity.tie_aware_agreement`) and the max/mean logit difference in output LSBs.
Use it to see what another CPU's kernels make of a model, e.g. under qemu's Haswell CPU (AVX2, no VNNI), where
fbgemm and ONNX Runtime take their saturating 16-bit pair kernels (``/proc/cpuinfo`` there still describes the
real host, hence ``--host-label``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from qat.analysis.readme import markdown_table, publish
from qat.data.imagefolder import build_classification_loaders
from qat.fidelity import build_engine, output_lsb, tie_aware_agreement
from qat.intmodel.graph import IntModel
from qat.latency.host import describe_host
from qat.records import atomic_write_bytes
from qat.train.loop import predict, top1


def replay(run_dir: Path, engines: list[str], images: int | None) -> list[dict[str, object]]:
    """One row per engine of ``engines`` for the run in ``run_dir`` (reference first)."""
    record = json.loads((run_dir / "record.json").read_text())
    int_model = IntModel.load(run_dir / "int_model.pt")
    loader = build_classification_loaders(record["data"]["root"], resolution=record["model"]["resolution"],
                                          batch_size=100).val
    batches = list(itertools.islice(loader, None if images is None else -(-images // 100)))
    lsb = output_lsb(int_model) or 1.0
    logits_of: dict[str, torch.Tensor] = {}
    rows = []
    for name in ["reference", *engines]:
        engine, _ = build_engine(name, int_model, 1)
        logits, pred, targets = predict(engine, batches, desc=f"{run_dir.name} {name}")
        logits_of[name] = logits
        ref = logits_of["reference"]
        diff = (logits - ref).abs() / lsb
        rows.append({"run": str(run_dir), "width": record["model"]["width_mult"],
                     "weight_bits": record["quant"].get("weight_bits"), "act_bits": record["quant"].get("act_bits"),
                     "target": record.get("target", {}).get("name"), "engine": name, "top1": top1(pred, targets),
                     "agreement_with_reference": top1(ref.argmax(1), pred),
                     "agreement_with_reference_tie_aware": tie_aware_agreement(ref, logits),
                     "logit_max_abs_diff_lsb": float(diff.max()), "logit_mean_abs_diff_lsb": float(diff.mean())})
        print(f"{run_dir}  {name:<20} top-1 {rows[-1]['top1']:.2f}%  agreement with reference "
              f"{rows[-1]['agreement_with_reference']:.2f}%  max |Δ| {rows[-1]['logit_max_abs_diff_lsb']:.0f} LSB",
              flush=True)
    return rows


MARKER = "REPLAY_TABLE"
SHOWN = {"width": "width", "target": "target", "bits": "bits", "engine": "engine", "top1": "top-1",
         "agreement_with_reference": "agreement with reference (%)",
         "agreement_with_reference_tie_aware": "ties as agreement (%)", "logit_max_abs_diff_lsb": "max Δ logit (LSB)",
         "host": "ran on"}


def markdown(table: pd.DataFrame) -> str:
    """The rows as the README shows them (one host label per table, in the last column)."""
    shown = table.assign(bits="w" + table["weight_bits"].astype(str) + "a" + table["act_bits"].astype(str))
    return markdown_table(shown[list(SHOWN)].rename(columns=SHOWN), {"width": "{:g}", SHOWN["logit_max_abs_diff_lsb"]:
                                                                      "{:.0f}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--engines", nargs="+", default=["torch_native_x86", "onnxruntime"])
    parser.add_argument("--images", type=int, default=None,
                        help="only the first N validation images (whole batches of 100)")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument("--host-label", default="", help="what ran the engines, when /proc/cpuinfo cannot tell")
    parser.add_argument("--readme", type=Path, help="also replace the README block <!-- REPLAY_TABLE --> ... with it")
    parser.add_argument("--tables-only", action="store_true",
                        help="replay nothing: rewrite the .md and the README block from the CSV at --out")
    args = parser.parse_args(argv)
    if args.tables_only:
        if not args.out.is_file():
            print(f"error: {args.out} does not exist (replay runs into it first)", file=sys.stderr)
            return 2
        return _write_tables(pd.read_csv(args.out), args.out, args.readme)
    if not args.runs:
        print("error: runs: give the run directories of int8 runs to replay (or --tables-only)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    for run in args.runs:
        if not (run / "int_model.pt").is_file():
            print(f"error: {run}/int_model.pt does not exist (pass run directories of int8 runs)", file=sys.stderr)
            return 2
    host = describe_host()
    rows = [row for run in args.runs for row in replay(run, args.engines, args.images)]
    table = pd.DataFrame(rows).assign(host=args.host_label or f"{host['cpu']} ({' '.join(host['cpu_flags'])})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, table.to_csv(index=False).encode())
    return _write_tables(table, args.out, args.readme)


def _write_tables(table: pd.DataFrame, out: Path, readme: Path | None) -> int:
    """The Markdown table beside the CSV (``.md``) and, with ``readme``, in its REPLAY_TABLE block."""
    text = (f"Replayed runs: {', '.join(dict.fromkeys(map(str, table['run'])))}. Regenerated from `{out}` by "
            f"`python scripts/replay_engines.py --out {out} --tables-only --readme README.md`.\n\n" + markdown(table))
    return publish({MARKER: (out.with_suffix(".md"), text)}, readme)


if __name__ == "__main__":
    raise SystemExit(main())
