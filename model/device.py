"""`--device auto|cpu|cuda`, as the trainer, the evaluator and the server all take it."""

from __future__ import annotations

import torch


def resolve_device(name: str, source: str = "--device") -> torch.device:
    """auto: CUDA when available, else the CPU. Raises ValueError for cuda without CUDA,
    naming `source` (how the user gave it: the flag or its environment variable)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{source} cuda: CUDA is not available on this machine")
    return torch.device(name)


def cuda_runs_bf16() -> bool:
    """Whether this GPU multiplies bfloat16 natively (Ampere and later). Before Ampere
    torch emulates it, slower than float32."""
    return torch.cuda.is_bf16_supported(including_emulation=False)
