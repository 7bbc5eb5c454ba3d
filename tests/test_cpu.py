"""model/cpu.py: running torch work on a thread that ends with it."""

from __future__ import annotations

import threading

import pytest
import torch

from model.cpu import call_in_own_thread


def test_call_in_own_thread_returns_and_the_thread_is_gone() -> None:
    seen: list[threading.Thread] = []

    def work(a: torch.Tensor, *, scale: float) -> torch.Tensor:
        seen.append(threading.current_thread())
        return (a @ a.T) * scale  # a parallel op: this thread gets an OpenMP team

    a = torch.randn(256, 256)
    out = call_in_own_thread(work, a, scale=2.0)

    torch.testing.assert_close(out, (a @ a.T) * 2.0)
    assert seen and seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_call_in_own_thread_raises_what_the_call_raised() -> None:
    def fail() -> None:
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        call_in_own_thread(fail)
