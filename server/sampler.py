"""Batched sampling over rows with their own parameters, generators and token counts.

model/sampling.py does the maths; this keeps what it needs across steps: a
`SamplingBatch` (the [B] parameter tensors, built once per batch composition, and
each row's generator) and each slot's token history for the penalties: which tokens its
prompt holds and how many times each was generated, [slots, V] each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.sampling import BatchParams, SamplingParams, TokenHistory, sample


@dataclass(frozen=True)
class SamplingBatch:
    slots: torch.Tensor  # [B] KV-cache slot of each row, on the device
    params: BatchParams
    generators: list[torch.Generator | None]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A row's own generator: its draws depend on no other row's."""
    if seed is None:
        return None  # the global generator: unseeded draws need no reproducibility
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    def __init__(self, n_slots: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.in_prompt = torch.zeros(n_slots, vocab_size, dtype=torch.bool, device=device)
        self.generated = torch.zeros(n_slots, vocab_size, device=device)  # [slots, V]

    def batch(
        self,
        slots: Sequence[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> SamplingBatch:
        return SamplingBatch(
            torch.tensor(slots, device=self.device),
            BatchParams.from_rows(params, self.device),
            list(generators),
        )

    def start(self, slot: int, prompt_ids: Sequence[int]) -> None:
        """Reset `slot`'s history to the prompt's."""
        self.generated[slot].zero_()
        self.in_prompt[slot].zero_()
        self.in_prompt[slot, torch.tensor(prompt_ids, device=self.device)] = True

    def move(self, src: int, dst: int) -> None:
        self.in_prompt[dst] = self.in_prompt[src]
        self.generated[dst] = self.generated[src]

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits [B, >= V] -> token ids [B] (on the device), each below V."""
        logits = logits[:, : self.generated.shape[1]]  # [B, V]
        if not batch.params.any_penalty:
            return sample(logits, batch.params, batch.generators)
        history = TokenHistory(self.in_prompt[batch.slots], self.generated[batch.slots])
        ids = sample(logits, batch.params, batch.generators, history)
        ones = torch.ones(len(ids), device=self.device)
        self.generated.index_put_((batch.slots, ids), ones, accumulate=True)
        return ids
