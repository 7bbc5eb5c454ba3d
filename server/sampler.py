"""Batched sampling over rows with their own parameters, generators and token counts.

model/sampling.py does the maths; this keeps what it needs across steps: a
`SamplingBatch` (the [B] parameter tensors, built once per batch composition, and
each row's generator) and each slot's token history for the penalties: which tokens its
prompt holds and how many times each was generated, [slots, V] each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.sampling import BatchParams, SamplingParams, TokenHistory, sample


@dataclass(frozen=True)
class SamplingBatch:
    slots: torch.Tensor  # [B] KV-cache slot of each row, on the device
    params: BatchParams
    generators: list[torch.Generator | None]
    # The most alternatives' log-probabilities a row asks for (Sampler.logprobs); None:
    # no row asks for log-probabilities.
    top_logprobs: int | None = None


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A row's own generator: its draws depend on no other row's."""
    if seed is None:
        return None  # the global generator: unseeded draws need no reproducibility
    if device.type == "cpu" and seed >= 2**32:
        # The CPU generator (mt19937) keeps a seed's low 32 bits: seeds 1 and 2**32 + 1
        # drew the same text. A larger seed is hashed to 32 bits instead (a collision now
        # as likely as any two); smaller ones seed it as they are, as before.
        seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


# [B, V] float32 rows a step holds at once for each row it samples (step_bytes_per_row).
STEP_ROWS = 12


class Sampler:
    def __init__(self, n_slots: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.in_prompt = torch.zeros(n_slots, vocab_size, dtype=torch.bool, device=device)
        self.generated = torch.zeros(n_slots, vocab_size, device=device)  # [slots, V]

    @staticmethod
    def bytes_per_slot(vocab_size: int) -> int:
        """What one slot's rows of `in_prompt` and `generated` take."""
        return vocab_size * (torch.bool.itemsize + torch.float32.itemsize)

    @staticmethod
    def step_bytes_per_row(vocab_size: int) -> int:
        """What a step may hold at once for one row it samples: the model's logits row
        and the float32 rows sampling and log-probabilities make of it (a bias,
        penalties, top-k, top-p and log-probabilities peaked at 9 rows, the logits'
        own and top-p's int64 sort indices among them)."""
        return vocab_size * torch.float32.itemsize * STEP_ROWS

    def batch(
        self,
        slots: Sequence[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        logprobs: Sequence[int | None],
    ) -> SamplingBatch:
        """logprobs: each row's wish (GenerationRequest.logprobs)."""
        return SamplingBatch(
            torch.tensor(slots, device=self.device),
            BatchParams.from_rows(params, self.device),
            list(generators),
            max((k for k in logprobs if k is not None), default=None),
        )

    def start(self, slot: int, prompt_ids: Sequence[int]) -> None:
        """Reset `slot`'s history to the prompt's."""
        self.generated[slot].zero_()
        self.in_prompt[slot].zero_()
        self.in_prompt[slot, torch.tensor(prompt_ids, device=self.device)] = True

    def move(self, src: int, dst: int) -> None:
        self.in_prompt[dst] = self.in_prompt[src]
        self.generated[dst] = self.generated[src]

    def logprobs(
        self, logits: torch.Tensor, ids: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's log-probabilities (its own distribution: before logit biases,
        temperature, penalties or truncation, as vLLM reports them) of the sampled `ids`
        [B], and the k likeliest tokens' ids and log-probabilities [B, k], over the
        tokenizer's ids."""
        log_probs = torch.log_softmax(logits[:, : self.generated.shape[1]].float(), dim=-1)
        top = log_probs.topk(k, dim=-1)  # [B, k] each, likeliest first
        return log_probs.gather(1, ids[:, None])[:, 0], top.indices, top.values

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
