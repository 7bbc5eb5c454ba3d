"""One phrase naming the hardware a benchmark ran on, for its result line."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from model.cpu import bf16_units


def describe(device: torch.device) -> str:
    """ "NVIDIA H100 80GB HBM3", or the CPU's model name, core count and its bf16 units
    (AMX, AVX512-BF16 or none): what CPU numbers differ most by."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    units = {"amx": "AMX", "avx512": "AVX512-BF16", None: "no bf16 units"}[bf16_units()]
    return f"{name}, {torch.get_num_threads()} threads, {units}"
