"""Training batches: each rank's windows come from its own shard, targets shifted by one."""

from __future__ import annotations

import numpy as np
import torch

from training.data import BatchSampler


def test_each_rank_draws_windows_from_its_own_shard_with_targets_shifted() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    for rank in range(2):
        batches = BatchSampler(tokens, block_size=8, batch_size=64, seed=0, rank=rank, world_size=2)
        for _ in range(10):
            x, y = batches.next_batch()
            assert (x >= rank * 500).all() and (y < (rank + 1) * 500).all()
            assert torch.equal(y, x + 1)
