"""model/cpu.py: running torch work on a thread that ends with it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from model.cpu import call_in_own_thread, run_in_own_thread

REPO = Path(__file__).resolve().parents[1]


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


def test_run_in_own_thread_returns_raises_and_the_thread_is_gone() -> None:
    seen: list[threading.Thread] = []

    def work(a: torch.Tensor) -> torch.Tensor:
        seen.append(threading.current_thread())
        return a @ a.T

    def fail() -> None:
        raise ValueError("no such checkpoint")

    a = torch.randn(256, 256)
    torch.testing.assert_close(asyncio.run(run_in_own_thread(work, a)), a @ a.T)
    seen[0].join(timeout=30)  # it ends right after handing its result over
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(ValueError, match="no such checkpoint"):
        asyncio.run(run_in_own_thread(fail))


def test_a_process_stopped_while_run_in_own_thread_works_exits_at_once() -> None:
    # A server stopped while its model loads: with the loop's executor (asyncio.to_thread)
    # the process lived on until the loading ended, minutes when it compiles.
    script = (
        "import asyncio, threading\n"
        "from model.cpu import run_in_own_thread\n"
        "async def main():\n"
        "    loading = asyncio.create_task(run_in_own_thread(threading.Event().wait))\n"
        "    await asyncio.sleep(0)\n"  # the task starts the thread
        "    loading.cancel()\n"
        "asyncio.run(main())\n"
        "print('stopped')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "stopped\n", "")


def test_release_free_memory_returns_what_tune_malloc_kept() -> None:
    # The trainer frees its corpus's text once tokenized; kept for reuse, it stayed in
    # the process's memory for the whole run (a 150 MB file: 1.2 GB instead of 0.7).
    script = (
        "from model.cpu import release_free_memory, tune_malloc\n"
        "def rss():\n"
        "    status = open('/proc/self/status').read().split('VmRSS:')[1]\n"
        "    return int(status.split()[0]) * 1024\n"
        "assert tune_malloc()\n"
        "block = bytearray(256 << 20)\n"  # zeroed: its pages are touched
        "before = rss()\n"
        "del block\n"
        "kept = rss()\n"
        "release_free_memory()\n"
        "print(before - kept >> 20, before - rss() >> 20)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    freed_kept, freed_released = map(int, done.stdout.split())
    assert freed_kept < 64, "tune_malloc gave the block back itself: nothing to release"
    assert freed_released > 200, done.stdout
