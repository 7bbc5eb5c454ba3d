"""One phrase naming the hardware a benchmark ran on, for its result line."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from model.cpu import has_fast_bf16


def describe(device: torch.device) -> str:
    """ "NVIDIA H100 80GB HBM3", or the CPU's model name, core count and whether it has
    AMX (bf16 matrix units): the two kinds of CPU these numbers differ most on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    units = "AMX" if has_fast_bf16() else "no AMX"
    return f"{name}, {torch.get_num_threads()} threads, {units}"
