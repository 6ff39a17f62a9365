"""Describe the machine a latency was measured on (CPU model and flags, cores, OS, library versions)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "neon", "asimddp")


def describe_host() -> dict[str, object]:
    cpu, flags = platform.processor() or platform.machine(), []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu in ("", platform.machine(), platform.processor()):
                cpu = value.strip()
            elif key in ("flags", "Features") and not flags:
                present = set(value.split())
                flags = [f for f in _FLAGS_OF_INTEREST if f in present]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "usable_cores": affinity,
            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__}
