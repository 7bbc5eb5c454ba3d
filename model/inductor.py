"""Whether torch.compile's default backend (inductor) can build kernels here.

Inductor writes C++ kernels for CPU and compiles them with a C++ compiler; on CUDA
it writes Triton kernels, whose launcher is built with a C compiler. Without one,
torch.compile fails at the first call, mid-run, so callers check first.
"""

from __future__ import annotations

import shutil

import torch

COMPILERS = {"cpu": ("g++", "c++", "clang++"), "cuda": ("gcc", "cc", "clang")}


def has_compiler(device: torch.device) -> bool:
    return any(shutil.which(name) for name in COMPILERS.get(device.type, ()))


def missing_compiler_message(device: torch.device) -> str:
    names = " / ".join(COMPILERS.get(device.type, ()))
    return f"torch.compile on {device.type} needs a compiler on PATH ({names}); none was found"
