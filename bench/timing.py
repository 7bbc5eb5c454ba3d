"""What every timed section of a benchmark shares: the device synchronised at its ends,
the heap frozen during it, and the event loop the server runs on."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

try:
    import uvloop
except ImportError:  # not installed on Windows or PyPy (pyproject.toml)
    uvloop = None

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Run the block with every object alive at its start out of the collector's sight.

    The server freezes its heap once the model is loaded (server/app.py), and so runs
    without full collections. A benchmark process holds far more (transformers, HF's
    model, every earlier measurement: ~700k objects), and one full collection of it
    stops whatever is being timed for 0.2-0.4 s: a raw engine round of ~1.3 s came out
    25% slower, or HTTP clients read late. Frozen, both sides are timed as served.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on uvloop where installed, as uvicorn runs the server: the
    clients and the raw engine get the same lean loop (on a small machine every cycle
    the loop spends is taken from the engine's cores). SIGINT and SIGTERM cancel `main`,
    so that its clients close as they would on an error, then exit 128 + the signal's
    number (bench.cli.exit_on_signals' exit raised inside the loop's callbacks left
    aiohttp's tracebacks and exit status 1)."""
    run = uvloop.run if uvloop is not None else asyncio.run
    return run(_cancelled_by_signals(main))


async def _cancelled_by_signals(main: Coroutine[Any, Any, T]) -> T:
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    signals = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in signals}
    received: list[int] = []

    def cancel(signum: int) -> None:
        received.append(signum)
        task.cancel()

    for s in signals:
        loop.add_signal_handler(s, cancel, s)
    try:
        return await main
    except asyncio.CancelledError:
        if received:
            raise SystemExit(128 + received[0]) from None
        raise
    finally:
        for s, handler in before.items():  # remove_signal_handler would leave the default
            loop.remove_signal_handler(s)
            signal.signal(s, handler)
