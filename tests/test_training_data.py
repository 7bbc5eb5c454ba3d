"""Training batches: each rank's windows come from its own shard, targets shifted by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import IGNORED, BatchSampler, eval_windows
from training.prepare import CONVERSATION_START, LEARNED


def test_each_rank_draws_windows_from_its_own_shard_with_targets_shifted() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    for rank in range(2):
        batches = BatchSampler(tokens, block_size=8, batch_size=64, seed=0, rank=rank, world_size=2)
        for _ in range(10):
            x, y, positions = batches.next_batch()
            assert positions.tolist() == [list(range(8))] * 64
            assert (x >= rank * 500).all() and (y < (rank + 1) * 500).all()
            assert torch.equal(y, x + 1)


def test_every_window_of_the_shard_is_drawn_the_last_included() -> None:
    tokens = np.arange(20, dtype=np.uint16)
    batches = BatchSampler(tokens, block_size=8, batch_size=256, seed=0)
    x, y, _ = batches.next_batch()
    assert set(x[:, 0].tolist()) == set(range(12))  # starts 0 .. 20 - 8 - 1
    # A shard of exactly one window: that window, every row.
    x, y, _ = BatchSampler(tokens[:9], block_size=8, batch_size=2, seed=0).next_batch()
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2


def rank_batches(tokens: np.ndarray, rank: int) -> BatchSampler:
    return BatchSampler(tokens, block_size=8, batch_size=16, seed=0, rank=rank, world_size=2)


def test_each_rank_draws_its_own_offsets_not_the_same_ones_shifted() -> None:
    # Ranks seeded alike would draw the same windows of their shards in step: data
    # correlated across ranks, which their own generators (seed * 1000 + rank) avoid.
    tokens = np.arange(1000, dtype=np.uint16)
    x0, _, _ = rank_batches(tokens, 0).next_batch()
    x1, _, _ = rank_batches(tokens, 1).next_batch()
    assert not torch.equal(x1 - 500, x0)


@pytest.mark.parametrize("n", [2, 9, 17, 20])
def test_eval_windows_make_every_token_but_the_first_a_target_once(n: int) -> None:
    tokens = np.arange(n, dtype=np.uint16)
    windows = list(eval_windows(tokens, 8))
    assert np.concatenate([y for _, y in windows]).tolist() == list(range(1, n))
    for x, y in windows:
        assert 0 < len(x) == len(y) <= 8 and (y == x + 1).all()


def test_a_shard_one_token_short_of_a_block_and_its_target_is_refused_with_the_reason() -> None:
    tokens = np.arange(16, dtype=np.uint16)
    with pytest.raises(ValueError, match="8 training tokens per rank cannot fill one block of 8"):
        BatchSampler(tokens, block_size=8, batch_size=2, seed=0, rank=1, world_size=2)
    # One more token is enough: the single window is the whole shard.
    sampler = BatchSampler(tokens[:9], block_size=8, batch_size=2, seed=0)
    inputs, targets, _ = sampler.next_batch()
    assert inputs.tolist() == [list(range(8))] * 2
    assert targets.tolist() == [list(range(1, 9))] * 2


def test_a_rank_whose_shard_starts_no_conversation_draws_from_its_own_shard() -> None:
    # One long conversation from token 11 to the end: rank 1's shard (50-99) starts none.
    # Its windows stay in its shard (inside that conversation, cut from its prompt: not
    # learned), not at the first conversation, which rank 0 learns.
    tokens = np.arange(100, dtype=np.uint16)
    mask = np.full(100, LEARNED, dtype=np.uint8)
    mask[[0, 10]] = CONVERSATION_START
    for rank in range(2):
        sampler = BatchSampler(
            tokens, block_size=8, batch_size=4, seed=0, rank=rank, world_size=2, loss_mask=mask
        )
        x, y, _ = sampler.next_batch()
        assert (x >= rank * 50).all() and (x < (rank + 1) * 50).all()
        if rank == 1:
            assert (y == IGNORED).all()
