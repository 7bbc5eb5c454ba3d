"""CUDA graphs of the batched decode forward.

Eager, a `base` decode step is ~400 small kernels, each launched from Python: the GPU
waits on the host for most of the step. A CUDA graph launches a captured step's kernels
in one call. A graph has fixed shapes and fixed buffers, so `StaticDecode` runs the
decode forward in fixed *buckets*: b rows (a power of two, or the slot count) reading
keys 0..L-1 (a power of two from 128, or max_len), its inputs copied into static
buffers first, and `DecodeGraphs` captures one graph per (b, L) and replays the smallest
bucket that holds a step.

Row r of a bucket is slot r of the cache (read as the slice 0..b-1, a view), so a step
fits bucket b when all its rows' slots are below b; the scheduler's compaction keeps
running requests in the lowest slots. Rows of slots that decode nothing this step (free,
or holding a prompt still being prefilled) are padding: token 0 at position max_len - 1.
That entry is harmless to write whoever holds the slot: an entry at max_len - 1 is only
ever read by a query at that position, which writes it first, in the same forward
(kv_cache.py's invariant). Keys between a row's position and L are masked as in any
batch of rows at different lengths.

`--compile-decode` compiles the forward each graph captures (torch.compile, not its
"reduce-overhead" mode: these graphs are ours, one set per bucket, captured at start-up).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence

import torch

from model.kv_cache import KVCache, as_slots
from model.transformer import Transformer

log = logging.getLogger(__name__)

SHORTEST_KEY_BUCKET = 128


def buckets(smallest: int, largest: int) -> list[int]:
    """Powers of two from `smallest` below `largest`, then `largest`."""
    sizes = []
    size = smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, largest]


class StaticDecode:
    """The decode forward over static buffers, in fixed (rows, key length) buckets."""

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.max_len = cache.max_len
        self.batch_sizes = buckets(1, cache.n_slots)
        self.key_lengths = buckets(min(SHORTEST_KEY_BUCKET, self.max_len), self.max_len)
        device = cache.k[0].device
        self.tokens = torch.zeros(cache.n_slots, 1, dtype=torch.long, device=device)  # [S, 1]
        self.positions = torch.full_like(self.tokens, self.max_len - 1)  # [S, 1]

    def load(
        self, token_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int]
    ) -> tuple[int, int]:
        """Copy one step's rows into the buffers, each at its slot's row, the other rows
        below b padding -> the step's bucket (b, L)."""
        b = self.batch_sizes[bisect.bisect_left(self.batch_sizes, max(slots) + 1)]
        length = self.key_lengths[bisect.bisect_left(self.key_lengths, max(positions) + 1)]
        bucket_tokens, bucket_positions = [0] * b, [self.max_len - 1] * b
        for token, position, slot in zip(token_ids, positions, slots, strict=True):
            bucket_tokens[slot], bucket_positions[slot] = token, position
        # From pageable host memory: the copies are staged before copy_ returns.
        self.tokens[:b, 0].copy_(torch.tensor(bucket_tokens), non_blocking=True)
        self.positions[:b, 0].copy_(torch.tensor(bucket_positions), non_blocking=True)
        return b, length

    @staticmethod
    def rows(logits: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """A bucket's logits [b, V] -> the step's rows [B, V], row r being slot r: indexed as
        the cache indexes slots (a view for a contiguous run)."""
        return logits[as_slots(slots, logits.device)]

    def forward(self, b: int, length: int) -> torch.Tensor:
        """The first b buffered rows, attending over keys 0..length-1 -> logits [b, V]."""
        logits = self.model(
            self.tokens[:b], self.positions[:b], self.cache, slice(0, b), length=length
        )  # [b, 1, V]
        return logits[:, 0]


class DecodeGraphs:
    """One captured CUDA graph of `StaticDecode.forward` (compiled, or eager) per bucket,
    replayed per step."""

    def __init__(self, model: Transformer, cache: KVCache, *, compile: bool = False) -> None:
        self.static = StaticDecode(model, cache)
        self.compiled = compile
        # Compiled, the captured step is fewer, fused kernels (1.3 ms instead of 2.4 ms
        # per `base` step on an H200). dynamic=True keeps rows and key length symbolic:
        # four builds in all (one row or more, x the last key bucket or another).
        self._forward = (
            torch.compile(self.static.forward, dynamic=True) if compile else self.static.forward
        )
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self) -> None:
        """Capture every bucket (inside `torch.inference_mode()`, as replays run). Largest
        first, into one memory pool: the smaller graphs reuse the largest one's blocks."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.static.batch_sizes):
            for length in reversed(self.static.key_lengths):
                self._graphs[b, length] = self._capture(b, length, pool)
        log.info(
            "captured %d CUDA graphs of the decode step (%s) in %.1f s",
            len(self._graphs),
            "compiled" if self.compiled else "eager kernels",
            time.perf_counter() - started,
        )

    def _capture(
        self, b: int, length: int, pool: tuple[int, int]
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # One run first, on a side stream as capture uses: lazy set-up (cuBLAS handles
        # and workspaces; compiled, the build and its kernel tuning) must not happen
        # inside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(b, length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._forward(b, length)
        return graph, logits

    @property
    def ready(self) -> bool:
        return bool(self._graphs)

    def decode(
        self, token_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int]
    ) -> torch.Tensor:
        """One token per row at its position in its slot -> logits [B, V]: read from the
        graph's output, valid until the next replay (the engine samples within the step)."""
        b, length = self.static.load(token_ids, positions, slots)
        graph, logits = self._graphs[b, length]
        graph.replay()
        return self.static.rows(logits, slots)
