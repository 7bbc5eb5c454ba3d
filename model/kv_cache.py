"""Preallocated key/value cache shared by every request the server runs.

Layout: [layers, slots, kv_heads, max_len, head_dim]. A *slot* belongs to one
sequence at a time; row b of a batch names its slot in `slots[b]` and writes its
keys/values at its own `positions[b]`, so rows of different lengths share a step.

Invariant: a slot's entries past its current length hold stale data from an
earlier occupant (or padding). They are never read, because a query at position p
attends only to keys at positions <= p, and every position <= p was written
before (prefill) or in the same step as (decode) that query.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig


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
        shape = (n_layers, n_slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_slots = n_slots
        self.max_len = max_len

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        n_slots: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """A cache sized for `config` with `n_slots` concurrent sequences."""
        return cls(
            config.n_layers,
            n_slots,
            config.n_kv_heads,
            config.max_seq_len,
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
        k, v: [B, T, kv_heads, head_dim]. Returns two [B, kv_heads, length, head_dim].
        """
        if isinstance(slots, slice):
            k_rows, v_rows = (
                self.k[layer, slots],
                self.v[layer, slots],
            )  # views [B, kvh, max_len, hd]
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
            # Advanced indices in dims 0 and 2 around a slice: the indexed view is
            # [B, T, kv_heads, head_dim], the same layout as k and v.
            k_rows[rows, :, positions] = k
            v_rows[rows, :, positions] = v
        else:
            self.k[layer][slots[:, None], :, positions] = k
            self.v[layer][slots[:, None], :, positions] = v
            k_rows, v_rows = self.k[layer, slots], self.v[layer, slots]  # gathered copies
        return k_rows[:, :, :length], v_rows[:, :, :length]


def slot_index(slots: torch.Tensor) -> torch.Tensor | slice:
    """`slots` as a slice when they are a contiguous ascending run (cheaper to read)."""
    first = int(slots[0])
    if bool((slots == torch.arange(first, first + slots.numel(), device=slots.device)).all()):
        return slice(first, first + slots.numel())
    return slots
