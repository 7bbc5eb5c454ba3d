"""Pure functions on logits: penalties, temperature, top-k, top-p, min-p and seeded draws.

Every function takes a batch of rows, logits or probabilities [B, V], with per-row
parameters as tensors, so the trainer's previews (B = 1) and the server's batched
decode share one implementation. After penalties the rows become probabilities once
(softmax at the row's temperature); truncation zeroes some and the draw searches
their cumulative sum. A step is ~20 operations plus one random number per seeded
row, which matters on CPU, where each operation costs microseconds of dispatch.
Draws come from caller-supplied `torch.Generator`s, one per row: a row's sample
depends only on its own logits and generator, never on the other rows. (The logits
themselves may differ by rounding between a row alone and in a batch: the model's
matrix products round per batch shape; README, "seed".)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# top_k 0 (off) as a row's largest kept count: more tokens than any vocabulary has (and
# the cap of any larger top_k, which would overflow the int64 column).
NO_TOP_K = 2**62
# Temperatures below this draw greedily, as in vLLM: fp32 logits divided by a smaller one
# overflow to inf, and their softmax is NaN. At 1e-5 a logit gap of 0.001 is already
# e^100 in probability, so the draw is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; drops tokens below min_p x the likeliest one's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt or output (HF/CTRL)
    presence_penalty: float = 0.0  # subtracted once from every token generated so far (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per time it was generated (OpenAI)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit first)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class BatchParams:
    """SamplingParams of B rows as tensors, in the form each step uses them (built once per
    batch composition, so a step spends no operations on the rows' conventions)."""

    divisor: torch.Tensor  # [B, 1] temperature; 1 for greedy rows (drawn by argmax)
    max_kept: torch.Tensor  # [B, 1] top_k; a number past any vocabulary where top_k is off
    nucleus: torch.Tensor  # [B, 1] top_p; +inf where top_p is off
    min_share: torch.Tensor  # [B, 1] min_p; 0 where it is off
    repetition_penalty: torch.Tensor  # [B]
    presence_penalty: torch.Tensor  # [B]
    frequency_penalty: torch.Tensor  # [B]
    # Each row's logit biases as an index_put: (rows [N], token ids [N], biases [N]);
    # None where no row has any.
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    greedy: torch.Tensor  # [B] bool
    any_penalty: bool
    any_truncation: bool
    any_greedy: bool
    all_greedy: bool

    @classmethod
    def from_rows(
        cls, rows: Sequence[SamplingParams], device: torch.device | str = "cpu"
    ) -> BatchParams:
        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [r.greedy for r in rows]
        biased = [(row, t, value) for row, r in enumerate(rows) for t, value in r.logit_bias]
        bias = None
        if biased:
            biased_rows, ids, values = zip(*biased, strict=True)
            bias = (
                column(list(biased_rows), torch.long),
                column(list(ids), torch.long),
                column(list(values), torch.float32),
            )
        return cls(
            divisor=column([[1.0 if r.greedy else r.temperature] for r in rows], torch.float32),
            max_kept=column([[min(r.top_k or NO_TOP_K, NO_TOP_K)] for r in rows], torch.long),
            nucleus=column([[r.top_p if r.top_p < 1.0 else math.inf] for r in rows], torch.float32),
            min_share=column([[r.min_p] for r in rows], torch.float32),
            repetition_penalty=column([r.repetition_penalty for r in rows], torch.float32),
            presence_penalty=column([r.presence_penalty for r in rows], torch.float32),
            frequency_penalty=column([r.frequency_penalty for r in rows], torch.float32),
            bias=bias,
            greedy=column(greedy, torch.bool),
            any_penalty=any(
                r.repetition_penalty != 1.0 or r.presence_penalty or r.frequency_penalty
                for r in rows
            ),
            any_truncation=any(r.top_k > 0 or r.top_p < 1.0 or r.min_p > 0 for r in rows),
            any_greedy=any(greedy),
            all_greedy=all(greedy),
        )


@dataclass(frozen=True)
class TokenHistory:
    """What the penalties look at in each row's sequence so far."""

    in_prompt: torch.Tensor  # [B, V] bool: the token is in the prompt
    generated: torch.Tensor  # [B, V] float: how many times the token was generated


def apply_penalties(
    logits: torch.Tensor,
    history: TokenHistory,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V] -> logits [B, V] with each row's penalties applied.

    The repetition penalty covers the prompt and the output (HF's rule, as vLLM has it);
    presence and frequency penalties count generated tokens only (OpenAI's rule: a
    long prompt does not steer the output away from its own words).
    """
    was_generated = history.generated > 0
    seen = history.in_prompt | was_generated
    rep = repetition_penalty[:, None]  # [B, 1]
    # CTRL / HF rule: shrink positive logits, grow negative ones, for tokens already seen.
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    presence = presence_penalty[:, None] * was_generated
    return logits - presence - frequency_penalty[:, None] * history.generated


def truncate(
    probs: torch.Tensor, max_kept: torch.Tensor, nucleus: torch.Tensor, min_share: torch.Tensor
) -> torch.Tensor:
    """Zero every probability outside the row's top-k, then outside the top-p nucleus of
    what top-k kept (renormalised: HF's warpers in their order, and vLLM's rule), then
    below min-p times the likeliest token's (HF's order; renormalising changes no ratio).

    probs [B, V]; max_kept [B, 1] (top-k: any number >= V keeps every token); nucleus
    [B, 1] (top-p: +inf keeps every token); min_share [B, 1] (min-p: 0 keeps every
    token). The most likely token is always kept. The filters become one threshold per
    row, the smallest probability kept, so only the sorted values are needed (not the
    order); a token tied with it is kept too, as in HF's top-k.
    """
    sorted_probs = sorted_descending(probs)  # [B, V]
    mass_through = sorted_probs.cumsum(dim=-1)  # [B, V]
    top_k = max_kept.clamp(max=probs.shape[-1])  # [B, 1]
    top_k_mass = mass_through.gather(-1, top_k - 1)  # [B, 1]
    # A token is in the nucleus while the tokens ranked above it hold less than top_p of
    # the top-k's mass.
    mass_before = mass_through - sorted_probs
    in_nucleus = (mass_before < nucleus * top_k_mass).sum(dim=-1, keepdim=True)  # [B, 1]
    kept = torch.minimum(in_nucleus, top_k).clamp_(min=1)  # [B, 1]
    threshold = sorted_probs.gather(-1, kept - 1)  # [B, 1]
    threshold = torch.maximum(threshold, min_share * sorted_probs[:, :1])  # [B, 1]
    return probs.masked_fill(probs < threshold, 0.0)


def sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] with each row sorted, largest first.

    On CPU NumPy's values-only sort takes ~0.3 ms for [32, 2048] where torch.sort,
    which also computes the order, takes ~2 ms (2 cores): a quarter of a decode step.
    """
    if x.device.type != "cpu":
        return x.sort(dim=-1, descending=True).values
    ascending = np.sort(x.detach().float().numpy(), axis=-1)
    return torch.from_numpy(ascending[:, ::-1].copy()).to(x.dtype)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row, drawn from probs [B, V] (rows need not sum to 1) -> [B].

    Inverse CDF: one uniform number per row, from the row's own generator (rows
    without one share a single call of the global generator), located in the row's
    cumulative distribution.
    Per row that is one random number instead of V (an exponential per token costs
    ~2 ms at [32, 2048] on 2 cores). A token of probability 0 adds nothing to the
    cumulative sum, so the search never stops on it.
    """
    cdf = probs.cumsum(dim=-1)  # [B, V]
    seeded = [(row, g) for row, g in enumerate(generators) if g is not None]
    own = [torch.rand(1, generator=g, device=g.device) for _, g in seeded]
    if len(seeded) == len(generators):  # the global generator is left alone
        uniform = torch.cat(own).to(probs.device)  # [B], in [0, 1)
    else:  # one global call for every row; the seeded rows' numbers replace theirs
        uniform = torch.rand(len(generators), device=probs.device)
        if seeded:
            uniform[[row for row, _ in seeded]] = torch.cat(own).to(probs.device)
    # Scaled by the row's total, so rounding in the sum never leaves u past the last bin.
    targets = uniform[:, None] * cdf[:, -1:]  # [B, 1]
    sampled = torch.searchsorted(cdf, targets, right=True)[:, 0]  # first bin with cdf > u
    return sampled.clamp_(max=cdf.shape[-1] - 1)


def sample(
    logits: torch.Tensor,
    params: BatchParams,
    generators: Sequence[torch.Generator | None],
    history: TokenHistory | None = None,
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]: logit biases, penalties, temperature,
    top-k/top-p/min-p, draw. `logits` is left as it was."""
    logits = logits.float()
    if params.bias is not None:
        rows, ids, values = params.bias
        logits = logits.index_put((rows, ids), values, accumulate=True)  # a copy
    if params.any_penalty:
        if history is None:
            raise ValueError("penalties need each row's token history")
        logits = apply_penalties(
            logits,
            history,
            params.repetition_penalty,
            params.presence_penalty,
            params.frequency_penalty,
        )
    if params.all_greedy:
        return logits.argmax(dim=-1)
    probs = (logits / params.divisor).softmax(dim=-1)  # [B, V]
    if params.any_truncation:
        probs = truncate(probs, params.max_kept, params.nucleus, params.min_share)
    sampled = draw(probs, generators)
    if params.any_greedy:
        return torch.where(params.greedy, logits.argmax(dim=-1), sampled)
    return sampled
