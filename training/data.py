"""Batches from a token stream: random training windows and sequential evaluation windows.

Under DDP each rank samples only from its own contiguous shard of the training
tokens, with its own generator, so ranks see different data (of conversations, those
that start in its shard, a window reaching past its end as in one process). The generator's state
is the whole "data position": saving and restoring it resumes the exact sequence
of batches.

Conversations (a loss mask beside the tokens, prepare.py) are sampled from the start
of one, so that a window holds each answer's prompt where it fits, and their targets
are IGNORED but where the model learns the token (an assistant's). A window starts at
the conversation's first token, past its <|endoftext|>, as the server's chat prompt
does: a model fine-tuned on windows that all began with that token would meet prompts
without it. The conversations that follow it in the window (packed, so that no step
is spent on padding) start their positions at 0 again, each past its <|endoftext|>:
the model attends within each alone (`Transformer.forward(packed=True)`), as it sees
a chat prompt. A conversation too near the end of the tokens for a whole window gets one
that starts earlier, in the conversation before, whose answers are then cut from their
prompt: those are not learned there.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from training.prepare import CONVERSATION_START, LEARNED

IGNORED = -100  # a target no loss counts (cross_entropy's ignore_index)


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
        loss_mask: np.ndarray | None = None,
    ) -> None:
        n = len(tokens)
        self.start, self.end = rank * n // world_size, (rank + 1) * n // world_size
        if self.end - self.start < block_size + 1:
            raise ValueError(
                f"{self.end - self.start} training tokens per rank cannot fill one "
                f"block of {block_size} + 1"
            )
        self.tokens, self.loss_mask = tokens, loss_mask
        self.block_size, self.batch_size = block_size, batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        self.conversation_starts: np.ndarray | None = None
        if loss_mask is not None:
            # Where this rank's conversations start (after their separator): those whose
            # separator is in its shard, each in the window one process gives it, reaching
            # into the next shard (cut at the shard's end, the answers there were learned
            # by no rank). One too near the end of the tokens for a whole window starts
            # the window earlier.
            shard = loss_mask[self.start : self.end]
            starts = np.flatnonzero(shard == CONVERSATION_START) + self.start + 1
            starts = np.minimum(starts, n - block_size - 1)
            self.conversation_starts = starts if len(starts) else np.array([self.start])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs, targets, positions: [B, T] int64 on the device; targets are inputs
        shifted by one (IGNORED where a loss mask says the model does not learn the
        token); positions run 0..T-1, or with a loss mask from 0 at each conversation."""
        T = self.block_size
        if self.conversation_starts is None:
            starts = torch.randint(
                self.start, self.end - T, (self.batch_size,), generator=self.generator
            ).tolist()
        else:
            picks = torch.randint(
                len(self.conversation_starts), (self.batch_size,), generator=self.generator
            )
            starts = self.conversation_starts[picks.numpy()].tolist()
        rows = np.stack([self.tokens[s : s + T + 1] for s in starts]).astype(np.int64)
        inputs, targets = rows[:, :-1], rows[:, 1:]  # [B, T] each
        columns = np.arange(T)
        positions = np.broadcast_to(columns, inputs.shape)  # [B, T]
        if self.loss_mask is not None:
            mask = np.stack([self.loss_mask[s : s + T + 1] for s in starts])  # [B, T + 1]
            # A separator's target is the next conversation's first token: learned there
            # (a template that writes no prompt before an assistant's first message), it
            # would be learned from the conversation before, which the separator ends.
            learned = (mask[:, 1:] == LEARNED) & (mask[:, :-1] != CONVERSATION_START)
            targets = np.where(learned, targets, IGNORED)
            # A conversation starts at the window's start and after each separator.
            starts_here = np.concatenate(
                [np.ones((len(starts), 1), bool), mask[:, : T - 1] == CONVERSATION_START], 1
            )  # [B, T]
            first = np.maximum.accumulate(np.where(starts_here, columns, 0), axis=1)
            positions = columns - first  # [B, T]
            # A window started before its conversation (one too near the end for a whole
            # window) begins inside another, cut from its prompt: none of that one learned.
            whole = [s > 0 and self.loss_mask[s - 1] == CONVERSATION_START for s in starts]
            cut = (np.cumsum(starts_here, axis=1) == 1) & ~np.array(whole)[:, None]  # [B, T]
            targets = np.where(cut, IGNORED, targets)
        batch = torch.from_numpy(np.stack([inputs, targets, positions]))  # [3, B, T]
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[0], batch[1], batch[2]


def eval_windows(tokens: np.ndarray, block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows covering the stream: (inputs [T'], targets [T']), T' <= T.

    Every token but the first is a target exactly once; the last window may be short.
    """
    for start in range(0, len(tokens) - 1, block_size):
        window = np.asarray(tokens[start : start + block_size + 1], dtype=np.int64)
        yield window[:-1], window[1:]


def conversation_windows(
    tokens: np.ndarray, loss_mask: np.ndarray, block_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One window per conversation, from its first token as a chat prompt starts and as
    training's windows start: (inputs [T'], targets [T']), T' <= T, the targets IGNORED
    but the conversation's own LEARNED tokens. Those past T tokens from its start are
    not scored: no training window reaches them either (`unreachable_answers`)."""
    separators = np.flatnonzero(np.asarray(loss_mask) == CONVERSATION_START)
    for separator, end in zip(separators, [*separators[1:], len(tokens)], strict=True):
        first, stop = separator + 1, min(end, separator + 2 + block_size)
        if stop - first < 2:
            continue  # nothing to predict (a conversation is never this short)
        window = np.asarray(tokens[first:stop], dtype=np.int64)
        learned = np.asarray(loss_mask[first + 1 : stop]) == LEARNED
        yield window[:-1], np.where(learned, window[1:], IGNORED)


def scored_answers(tokens: np.ndarray, loss_mask: np.ndarray, block_size: int) -> int:
    """How many LEARNED tokens `conversation_windows` scores (0: nothing to score)."""
    windows = conversation_windows(tokens, loss_mask, block_size)
    return sum(int(np.count_nonzero(y != IGNORED)) for _, y in windows)


def unreachable_answers(loss_mask: np.ndarray, block_size: int) -> tuple[int, int]:
    """(unreachable, all): the LEARNED tokens more than `block_size` tokens after their
    conversation's first token, which no window starting there holds, and all of them."""
    mask = np.asarray(loss_mask)
    learned = mask == LEARNED
    firsts = np.flatnonzero(mask == CONVERSATION_START) + 1
    positions = np.arange(len(mask))
    # Each position's conversation's first token (0 before the first: none is learned).
    first_of = firsts[np.maximum(np.searchsorted(firsts, positions, side="right") - 1, 0)]
    unreachable = learned & (positions > first_of + block_size)
    return int(np.count_nonzero(unreachable)), int(np.count_nonzero(learned))
