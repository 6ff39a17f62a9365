"""Profile: where a simulated-quantization training step spends its time, per op, forward and backward (issue 19
item 1), against the float step of the same model.

Runs ``--steps`` profiled steps (after two warm-ups) of the float model and of qat's prepared model (w8a8
per-channel, ``--bn-fold``; BN frozen as the default schedule runs it unless ``--bn-live``), and prints for each
the kernel launches per step and the top ops by self time on the device (CUDA time on a GPU, CPU time otherwise).

    .venv/bin/python scripts/bench/qat_profile.py --model mobilenet_v2 --resolution 64 --batch 32
    python scripts/bench/qat_profile.py --device cuda --resolution 224 --batch 32
"""

from __future__ import annotations

import argparse
import copy

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

from qat.quant.config import QuantConfig
from qat.quant.prepare import prepare
from qat.quant.schedule import QuantSchedule


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def profile_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, top: int) -> None:
    cuda = x.is_cuda
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    for _ in range(2):
        train_step(model, opt, x, y)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(model, opt, x, y)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda:
        launch_calls = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        launches = sum(e.count for e in events if e.key in launch_calls)
        device_us = sum(e.self_device_time_total for e in events) / steps
        print(f"  kernel launches per step: {launches / steps:.0f}; device time per step {device_us / 1e3:.1f} ms")
    print(events.table(sort_by=key, row_limit=top, max_name_column_width=60))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", help="a torchvision classification model name")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bn-fold", default="jacob", choices=["jacob", "whitepaper", "unfolded"])
    parser.add_argument("--bn-live", action="store_true", help="batch norm not frozen (before bn_freeze_step)")
    parser.add_argument("--top", type=int, default=25, help="rows of the per-op table")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    model = getattr(torchvision.models, args.model)(num_classes=10).to(device).train()
    qat = prepare(copy.deepcopy(model), QuantConfig(bn_fold=args.bn_fold), x[:1]).train()
    if not args.bn_live:
        QuantSchedule(bn_freeze_step=0).apply(qat, 0)
    for m in (model, qat):
        m.to(memory_format=torch.channels_last)
    state = "live" if args.bn_live else "frozen"
    print(f"{args.model}, batch {args.batch} at {args.resolution}x{args.resolution}, {device}, NHWC, "
          f"{args.steps} profiled steps")
    print("float step:")
    profile_steps(model, x, y, args.steps, args.top)
    print(f"QAT step (w8a8 per-channel, bn_fold={args.bn_fold}, BN {state}):")
    profile_steps(qat, x, y, args.steps, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
