"""`--device auto|cpu|cuda`, as the trainer, the evaluator and the server all take it."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available, else the CPU. Raises ValueError for cuda without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    return torch.device(name)
