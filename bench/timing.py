"""What every timed section of a benchmark shares: the device synchronised at its ends,
the heap frozen during it, and the event loop the server runs on."""

from __future__ import annotations

import asyncio
import gc
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
    the loop spends is taken from the engine's cores)."""
    return uvloop.run(main) if uvloop is not None else asyncio.run(main)
