"""Preallocated key/value cache shared by every request the server runs.

Layout: one [slots, kv_heads, max_len, head_dim] tensor per layer for keys and one
for values, indexed [layer][slot]. Separate tensors, not views of one stacked
[layers, ...] tensor: torch.compile turns a write through a view into a copy of the
whole base tensor, every step, while a whole tensor is written in place.

A *slot* belongs to one sequence at a time; row b of a batch names its slot in
`slots[b]` and writes its keys/values at its own `positions[b]`, so rows of
different lengths share a step.

On a CPU the cache is fp32 whatever the weights' dtype (`cache_dtype`).

Invariant: a slot's entries past its current length hold stale data from an
earlier occupant (or padding). They are never read, because a query at position p
attends only to keys at positions <= p, and every position <= p was written
before (prefill) or in the same step as (decode) that query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.config import ModelConfig


def cache_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a model of `dtype` on `device` keeps its keys and values in: its own,
    except fp32 on a CPU. There PyTorch's attention is 2-4x slower in bf16 than in fp32
    and the model attends in fp32 (transformer.py): a bf16 cache would be cast up, all
    of it, in every layer of every step. A batch-32 bf16 decode step of `small` at ~120
    positions on 2 Zen 4 cores: 14.5 ms with a bf16 cache read by bf16 attention, 25 ms
    with it cast up each step, 12.9 ms with an fp32 cache (twice the memory)."""
    return torch.float32 if device.type == "cpu" else dtype


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_slots, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.n_slots = n_slots
        self.max_len = max_len

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """What one slot's keys and values take per token of context, over every layer."""
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype.itemsize

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        n_slots: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_len: int | None = None,
    ) -> KVCache:
        """A cache sized for `config` with `n_slots` concurrent sequences of up to
        `max_len` positions (default: the model's context)."""
        return cls(
            config.n_layers,
            n_slots,
            config.n_kv_heads,
            config.max_seq_len if max_len is None else max_len,
            config.head_dim,
            device=device,
            dtype=dtype,
        )

    def update(
        self,
        layer: int,
        slots: torch.Tensor | slice,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v of each row at its `positions`; return every row's first `length` entries.

        slots: [B] slot of each row, or a slice when the rows use a contiguous run of
        slots (then reading is a view, not a copy). positions: [B, T].
        k, v: [B, T, kv_heads, head_dim], written in the cache's dtype. Returns two
        [B, kv_heads, length, head_dim] in the cache's dtype.
        """
        k_cache, v_cache = self.k[layer], self.v[layer]
        if isinstance(slots, slice):
            rows = torch.arange(slots.start, slots.stop, device=k.device)
        else:
            rows = slots
        # Advanced indices in dims 0 and 2 around a slice: the indexed view is
        # [B, T, kv_heads, head_dim], the same layout as k and v.
        k_cache[rows[:, None], :, positions] = k.to(k_cache.dtype)
        v_cache[rows[:, None], :, positions] = v.to(v_cache.dtype)
        if isinstance(slots, slice):
            return k_cache[slots, :, :length], v_cache[slots, :, :length]  # views
        # Gather only the first `length` positions of each row's slot: copies.
        return k_cache[:, :, :length][slots], v_cache[:, :, :length][slots]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of slot `src` into slot `dst`, in every layer."""
        for layer in (*self.k, *self.v):
            layer[dst, :, :length] = layer[src, :, :length]


def as_slots(slots: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor | slice:
    """A batch's slot list as the cache indexes it: a slice when the slots are a
    contiguous ascending run (read as a view, no copy), else a [B] tensor.
    Decided on the host from Python ints, so no forward waits on the device for it."""
    first = slots[0]
    if list(slots) == list(range(first, first + len(slots))):
        return slice(first, first + len(slots))
    return torch.tensor(slots, device=device)
