"""What the host CPU is good at, and how to keep torch fast on it.

- `bf16_units()`: how the CPU multiplies bfloat16. "amx": Intel AMX tiles, where a
  bf16 product of training-sized matrices runs ~10x faster than fp32 ([4096, 384] x
  [384, 1152] on 2 Sapphire Rapids cores: 4.1 vs 0.43 TFLOP/s). "avx512": AVX512-BF16
  dot products (e.g. AMD Zen 4), ~2-4x faster than fp32 there (the same product on
  2 EPYC vCPUs: 362 vs 96 GFLOP/s). None: emulated, slower than fp32.
  `has_fast_bf16()`: either kind.
- `tune_malloc()`: glibc hands every allocation over 128 KB-32 MB to mmap and
  returns it to the kernel on free, so each step's activations fault their pages in
  afresh. Keeping freed memory in the heap made a CPU training step ~10% faster
  (d256 x 4 layers, bf16: 141-167 -> 128-133 ms), the gain jemalloc/tcmalloc give,
  without a preloaded library. `release_free_memory()` returns what it kept once a
  phase that does not come again (reading and tokenizing a corpus) has freed it.
- `call_in_own_thread()`: each thread that runs a parallel torch op keeps its own
  OpenMP worker team for as long as it lives. With two teams on 2 cores libgomp
  stops spin-waiting, and every parallel region pays a futex wake-up: a d384 decode
  step (2 Sapphire Rapids cores) took 7.8 ms instead of 2.7 ms when the weights were
  loaded in one live thread and decoded in another. Loading in a thread that then
  ends leaves one team. `run_in_own_thread()`: the same, awaited from an event loop,
  on a daemon thread: a server stopped while its model loads exits at once, where a
  pool's worker would hold the process until the loading ended (minutes of compiling).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# mallopt(3) parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP_BYTES = 1 << 30  # serve allocations up to 1 GiB from the heap; trim above 1 GiB free
_TOP_PAD_BYTES = 1 << 28  # grow the heap 256 MiB at a time (address space, not RSS)


@functools.cache
def bf16_units() -> str | None:
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    if capabilities.get("amx_bf16", False):
        return "amx"
    if capabilities.get("avx512_bf16", False):
        return "avx512"
    return None


def has_fast_bf16() -> bool:
    return bf16_units() is not None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (it has mallopt and malloc_trim); else None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # Not glibc (e.g. musl has no mallopt).
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@functools.cache
def tune_malloc() -> bool:
    """Keep freed memory for reuse instead of unmapping it; True when applied (glibc)."""
    libc = _glibc()
    return libc is not None and all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _KEEP_BYTES),
            (_M_TRIM_THRESHOLD, _KEEP_BYTES),
            (_M_TOP_PAD, _TOP_PAD_BYTES),
        )
    )


def release_free_memory() -> None:
    """Hand the heap's free memory back to the system (glibc's malloc_trim): what
    tune_malloc keeps for reuse, once work that does not come again has freed it."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def call_in_own_thread(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """fn(*args, **kwargs) on a new thread that ends, with its OpenMP team, before this returns."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocketgpt-once") as pool:
        return pool.submit(fn, *args, **kwargs).result()


async def run_in_own_thread(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on a new daemon thread that ends, with its OpenMP team, when fn returns;
    awaited without blocking the event loop. Cancelled, the caller stops waiting and fn
    runs on to its end, unless the process exits first."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(settle: Callable[[Any], None], outcome: object) -> None:
        def apply() -> None:
            if not future.done():  # else cancelled: nobody waits for it
                settle(outcome)

        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for it
            loop.call_soon_threadsafe(apply)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting task, whatever it is
            deliver(future.set_exception, e)
        else:
            deliver(future.set_result, result)

    threading.Thread(target=target, name="pocketgpt-once", daemon=True).start()
    return await future
