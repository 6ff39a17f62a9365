"""Benchmark: cost of a simulated-quantization training step relative to a float step (issue: quant core).

Interleaves float and QAT steps in one process (same data, same threads) and prints the ratio per model
and BN-folding mode, with torch.ao's ``prepare_qat`` (deprecated eager API) as the peer; the last line is
qat's worst ratio over both models per BN path.

    .venv/bin/python scripts/bench/qat_overhead.py --resolution 112 --batch 32 --steps 5 [--channels-last]

``--csv results/bench/qat_overhead.csv`` also writes the rows with the host (CPU, flags, cores, threads) and the
command; ``--tables-only --csv <that file> --readme README.md`` regenerates the README's
``<!-- QAT_COST_TABLE -->`` block from it without measuring (README tables are never typed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shlex
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import pandas as pd
import torch
import torchvision
from torch import nn

from qat.analysis.readme import markdown_table, publish
from qat.latency.host import describe_host
from qat.quant import cpu_kernel
from qat.quant.config import QuantConfig
from qat.quant.prepare import prepare
from qat.quant.schedule import QuantSchedule
from qat.train.engine import compiled

WORST_OF = ("bn_fold=whitepaper", "bn_fold=jacob", "bn frozen")
COMPILABLE = ("float", "qat bn_fold=jacob", "qat bn_fold=whitepaper", "qat bn_fold=unfolded", "qat bn frozen")


ATEN_SUFFIX = " (ATen ops)"


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, aten: bool = False) -> float:
    """One SGD step; ``aten``: fake quantization by ATen ops instead of qat's fused CPU kernel."""
    with cpu_kernel.aten_path() if aten else contextlib.nullcontext():
        return _step_time(model, x, y)


def _step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def torch_ao_peer(name: str, model: nn.Module) -> nn.Module | None:
    """torch.ao eager prepare_qat (x86 qconfig, fused conv-bn-relu) on torchvision's quantizable twin of ``name``
    (ResNet-18, MobileNet v2), with ``model``'s weights: the deprecated peer the issue names."""
    try:
        from torch.ao.quantization import get_default_qat_qconfig, prepare_qat
        from torchvision.models import quantization

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer = getattr(quantization, name)(num_classes=10)
            peer.load_state_dict(model.state_dict(), strict=False)
            peer.train()
            peer.fuse_model(is_qat=True)
            peer.qconfig = get_default_qat_qconfig("x86")
            return prepare_qat(peer).to(next(model.parameters()).device)
    except Exception as exc:  # noqa: BLE001 - the peer is optional and deprecated
        print(f"  (torch.ao peer unavailable: {type(exc).__name__}: {exc})")
        return None


MARKER = "QAT_COST_TABLE"


def cost_table(frame: pd.DataFrame) -> str:
    """The README block: ratio to the float step per model (columns) and variant (rows), headed by the host,
    the settings and the command that measured it."""
    first = frame.iloc[0]
    wide = frame.pivot_table(index="variant", columns="model", values="ratio", sort=False).reset_index()
    wide.columns = ["variant", *[f"{m} (× float step)" for m in wide.columns[1:]]]
    floats = {m: frame[(frame.model == m) & (frame.variant == "float")].ms_per_step.iloc[0]
              for m in frame.model.unique()}
    head = (f"Measured by `{first.command}` on {first.cpu} ({first.cores} cores; {first.cpu_flags}), "
            f"{first.threads} thread(s), batch {first.batch} at {first.resolution}×{first.resolution}, {first.layout}, "
            f"torch {first.torch}; float step "
            + ", ".join(f"{m} {ms:.0f} ms" for m, ms in floats.items()) + f". Rows from `{first.csv}`.\n\n")
    return head + markdown_table(wide, default="{:.2f}")


def write_csv(rows: list[dict[str, object]], args: argparse.Namespace) -> pd.DataFrame:
    host = describe_host()
    command = shlex.join(["python", "scripts/bench/qat_overhead.py", *sys.argv[1:]])
    frame = pd.DataFrame([{**row, "cpu": host["cpu"], "cpu_flags": " ".join(host["cpu_flags"]),  # type: ignore[arg-type]
                           "cores": host["cores"], "threads": args.threads, "batch": args.batch,
                           "resolution": args.resolution, "layout": "NHWC" if args.channels_last else "NCHW",
                           "device": args.device, "torch": host["torch"], "command": command, "csv": str(args.csv)}
                          for row in rows])
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.csv, index=False)
    return frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--channels-last", action="store_true",
                        help="every model and the batch in NHWC (train.channels_last, the pipeline's default)")
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"],
                        help="also time torch.compile'd copies of the --compiled variants in this mode (as "
                             "train.compile_mode); reduce-overhead replays CUDA graphs on a GPU")
    parser.add_argument("--compiled", nargs="+", default=["float", "qat bn frozen"], choices=COMPILABLE,
                        metavar="VARIANT", help=f"the variants --compile times compiled, of: {', '.join(COMPILABLE)}")
    parser.add_argument("--aten", action="store_true",
                        help="also time each eager qat variant on ATen ops alone (QAT_CPU_KERNEL=aten: the path "
                             "without qat's C++ kernel, the same numbers)")
    parser.add_argument("--csv", type=Path, help="also write the rows, with the host, to this CSV")
    parser.add_argument("--readme", type=Path, help=f"replace the README's <!-- {MARKER} --> block (needs --csv)")
    parser.add_argument("--marker", default=MARKER,
                        help="the README block --readme replaces (another run's table keeps its own marker)")
    parser.add_argument("--tables-only", action="store_true", help="regenerate the table from --csv; no measuring")
    args = parser.parse_args()
    if (args.readme or args.tables_only) and args.csv is None:
        parser.error("--readme and --tables-only need --csv")
    if args.tables_only:
        return publish({args.marker: (args.csv.with_suffix(".md"), cost_table(pd.read_csv(args.csv)))}, args.readme)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device).to(memory_format=layout)
    y = torch.randint(0, 10, (args.batch,), device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU thread(s)"
    layout_name = "NHWC" if args.channels_last else "NCHW"
    print(f"batch {args.batch}, {args.resolution}x{args.resolution}, {where}, {layout_name}, w8a8 per-channel; "
          f"median of {args.steps} interleaved steps")
    print(f"qat fake quantization on the CPU: {cpu_kernel.describe()}")
    print(f"{'model':<14}{'variant':<38}{'ms/step':>10}{'ratio':>8}")
    worst: dict[str, float] = {}
    rows: list[dict[str, object]] = []
    for name in args.models:
        model = getattr(torchvision.models, name)(num_classes=10).to(device).train()
        variants: dict[str, nn.Module] = {"float": model}
        for mode in ("jacob", "whitepaper", "unfolded"):
            variants[f"qat bn_fold={mode}"] = prepare(copy.deepcopy(model), QuantConfig(bn_fold=mode), x[:1]).train()
        frozen = prepare(copy.deepcopy(model), QuantConfig(), x[:1]).train()
        QuantSchedule(bn_freeze_step=0).apply(frozen, 0)  # BN frozen: one convolution with the running-σ fold
        variants["qat bn frozen"] = frozen
        for variant in variants.values():
            variant.to(memory_format=layout)
        if args.aten and device.type == "cpu":
            for key in [k for k in variants if k.startswith("qat ")]:
                variants[key + ATEN_SUFFIX] = variants[key]  # the same module, stepped under cpu_kernel.aten_path
        peer = torch_ao_peer(name, copy.deepcopy(model))
        if peer is not None:
            variants["torch.ao prepare_qat (fused obs+fq)"] = peer
        if args.compile != "none":
            for key in args.compiled:
                # its own copy: the eager variant re-binds its quantizers' buffers each step, which would make
                # CUDA graphs re-record every step
                variants[f"{key} compiled"] = compiled(copy.deepcopy(variants[key]), args.compile)
        for k, m in list(variants.items()):  # warm-up (compilation for the compiled variants)
            started = time.perf_counter()
            try:
                for _ in range(4 if k.endswith("compiled") else 1):  # eager, warm-up, CUDA graphs recorded
                    step_time(m, x, y, k.endswith(ATEN_SUFFIX))
            except Exception as exc:  # noqa: BLE001 - a variant the compiler cannot run is reported, not fatal
                print(f"  ({name} {k}: dropped, {type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                traceback.print_exc(limit=-6)  # where it failed (in the log; the table goes on without it)
                del variants[k]
                continue
            if k.endswith("compiled"):
                print(f"  ({name} {k}: compiled and warmed up in {time.perf_counter() - started:.0f} s)")
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.steps):
            for k, m in variants.items():
                times[k].append(step_time(m, x, y, k.endswith(ATEN_SUFFIX)))
        base = statistics.median(times["float"])
        for k, values in times.items():
            med = statistics.median(values)
            print(f"{name:<14}{k:<38}{med * 1e3:>10.1f}{med / base:>8.2f}")
            rows.append({"model": name, "variant": k, "ms_per_step": round(med * 1e3, 1),
                         "ratio": round(med / base, 3)})
            mode = k.removeprefix("qat ")
            if mode in WORST_OF:
                worst[mode] = max(worst.get(mode, 0.0), med / base)
    # the summary: qat's worst ratio over both models, per path (the default schedule's is "bn frozen")
    last = "worst ratio: " + " ".join(f"{mode.split('=')[-1].replace(' ', '_')}={worst[mode]:.2f}" for mode in WORST_OF)
    if args.csv is not None:
        frame = write_csv(rows, args)
        if args.readme is not None:
            publish({args.marker: (args.csv.with_suffix(".md"), cost_table(frame))}, args.readme)
    print(last)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
