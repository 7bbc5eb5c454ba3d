"""Batches from a token stream: random training windows and sequential evaluation windows.

Under DDP each rank samples only from its own contiguous shard of the training
tokens, with its own generator, so ranks see different data. The generator's state
is the whole "data position": saving and restoring it resumes the exact sequence
of batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class BatchSampler:
    def __init__(
        self,
        tokens: np.ndarray,
        *,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        n = len(tokens)
        self.start, self.end = rank * n // world_size, (rank + 1) * n // world_size
        if self.end - self.start < block_size + 1:
            raise ValueError(
                f"{self.end - self.start} training tokens per rank cannot fill one "
                f"block of {block_size} + 1"
            )
        self.tokens = tokens
        self.block_size, self.batch_size = block_size, batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs, targets: [B, T] int64 on the device; targets are inputs shifted by one."""
        T = self.block_size
        starts = torch.randint(
            self.start, self.end - T, (self.batch_size,), generator=self.generator
        ).tolist()
        rows = np.stack([self.tokens[s : s + T + 1] for s in starts])  # [B, T + 1]
        batch = torch.from_numpy(rows.astype(np.int64))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


def eval_windows(tokens: np.ndarray, block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows covering the stream: (inputs [T'], targets [T']), T' <= T.

    Every token but the first is a target exactly once; the last window may be short.
    """
    for start in range(0, len(tokens) - 1, block_size):
        window = np.asarray(tokens[start : start + block_size + 1], dtype=np.int64)
        yield window[:-1], window[1:]
