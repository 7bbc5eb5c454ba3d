"""ModelRunner: the model and its KV cache; prefill and decode forwards.

Called from the engine thread only, inside `torch.inference_mode()`. Inputs are
Python lists from the scheduler; outputs are logits [rows, V]: a decode row's, a prefill
chunk's last position's (or each of its positions', for a request scoring its prompt).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx.experimental import _config as fx_config

from model.kv_cache import KVCache, as_slots, cache_dtype
from model.transformer import Transformer
from server.cuda_graphs import DecodeGraphs

# Inductor settings for the compiled decode step on CPU. Frozen weights are graph
# constants, so inductor's own C++ GEMM template (the CPP backend of max_autotune) packs
# each one once, at build time, for the CPU's vector or AMX units; an eager bf16 product
# of one row is ~2.8x slower than fp32's on AMX. A bare `small` step on 2 AMX Xeon cores:
# bf16 2.8 -> 1.26 ms, fp32 1.87 -> 1.75 ms (BENCHMARKS.md). The cost: a frozen copy of
# the weights and a longer first build (~50 s instead of ~25 s).
CPU_DECODE_INDUCTOR = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    # Not the autotuner's timing tables and stats on the server's stderr.
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


def quiet_inductor_warnings() -> None:
    """Keep torch's warning about its own deprecated API off the server's stderr.

    Inductor's autotuner reads `Tensor.storage()` while it builds a compiled step (torch
    2.13), and the first --compile-decode start (caches cold) printed `UserWarning:
    TypedStorage is deprecated ...` with a path into torch: nothing a user can act on.
    Only that warning, and only from inductor.
    """
    warnings.filterwarnings(
        "ignore",
        message="TypedStorage is deprecated",
        category=UserWarning,
        module=r"torch\._inductor",
    )


@dataclass(frozen=True)
class PrefillInput:
    slot: int
    token_ids: Sequence[int]  # the chunk's tokens
    start: int  # position of the first one
    every_position: bool = False  # logits at each of the chunk's positions, not only its last


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        n_slots: int,
        *,
        compile_decode: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = model.config.max_seq_len
        self.cache = KVCache.for_model(
            model.config, n_slots, device=self.device, dtype=cache_dtype(self.device, self.dtype)
        )
        if self.device.type == "cuda":
            # cuDNN's attention rebuilds its plan for every new key length, i.e. every
            # decode step: 4.9 ms of CPU per attention call on an H100 (bench/decode.py),
            # 50x the flash/efficient kernels. Process-wide, but this process only serves.
            torch.backends.cuda.enable_cudnn_sdp(False)
        # On CUDA, decode steps replay captured graphs (captured in warm_up()), compiled
        # when asked; the compile below is for the other cases.
        self._graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self._graphs = DecodeGraphs(model, self.cache, compile=compile_decode)
        # A decode step is ~300 small eager ops around ~40 matrix products; compiled,
        # their dispatch overhead goes and inductor's own C++ kernels read the weights
        # packed once (freezing): a bf16 `small` step on 2 Zen 4 cores 4.8 -> 1.5 ms for
        # a lone stream, 12.2 -> 8.0 ms for 32 rows. Compiled for rows in slots 0..B-1
        # (where compaction keeps the running requests); a step with a row elsewhere (a
        # prompt still prefilling in a lower slot) runs eagerly. Two graphs in all:
        # dynamo specialises batch 1, and dynamic=True makes any larger batch size and
        # the key length symbolic (warm_up builds both).
        self._compiled_decode = None
        if compile_decode:
            quiet_inductor_warnings()
        if compile_decode and self._graphs is None:
            compiled = torch.compile(self._forward_first_slots, dynamic=True)
            # Without duck shaping: dynamo otherwise ties sizes that are equal when it
            # traces, and warm_up's batch of n_slots rows tied the batch size to the
            # cache's slot count, so the first batch of another size built again, for
            # seconds (a minute with cold caches) while every stream waited.
            compiled = fx_config.patch(use_duck_shape=False)(compiled)
            if self.device.type == "cpu":
                # Patched around every call, not only the build: dynamo reads `freezing`
                # when it traces, and a rebuild would otherwise lose it.
                compiled = torch._inductor.config.patch(CPU_DECODE_INDUCTOR)(compiled)
            self._compiled_decode = compiled

    def device_lost(self) -> bool:
        """Whether the device is unusable from now on: after a CUDA error such as an
        illegal address, every later call fails the same way (an out-of-memory error
        leaves it usable)."""
        if self.device.type != "cuda":
            return False
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError:
            return True
        return False

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_slot(src, dst, length)

    def prefill(self, chunks: Sequence[PrefillInput]) -> torch.Tensor:
        """Write every chunk's K/V -> logits [N, V], chunk after chunk: at each position of
        a chunk `every_position`, else at its last. Chunks run in padded forwards, each of
        chunks of like lengths (longest first) computing at most twice its chunks' tokens:
        in one forward, a long prompt's chunk beside a step's new short prompts padded
        each to its width, a step computed up to (rows) x the --prefill-chunk budget."""
        groups: list[list[int]] = []  # chunk indices; a group's first is its widest
        tokens = 0  # in the last group
        for i in sorted(range(len(chunks)), key=lambda i: -len(chunks[i].token_ids)):
            length = len(chunks[i].token_ids)
            width = len(chunks[groups[-1][0]].token_ids) if groups else 0
            if not groups or (len(groups[-1]) + 1) * width > 2 * (tokens + length):
                groups.append([])
                tokens = 0
            groups[-1].append(i)
            tokens += length
        if len(groups) == 1:
            return self._prefill(chunks)
        pieces: dict[int, torch.Tensor] = {}
        for group in groups:
            logits = self._prefill([chunks[i] for i in group])
            counts = [len(chunks[i].token_ids) if chunks[i].every_position else 1 for i in group]
            pieces.update(zip(group, logits.split(counts), strict=True))
        return torch.cat([pieces[i] for i in range(len(chunks))])

    def _prefill(self, chunks: Sequence[PrefillInput]) -> torch.Tensor:
        """Every chunk's K/V in one forward, each row padded to the longest's width."""
        width = max(len(c.token_ids) for c in chunks)
        tokens = torch.zeros(len(chunks), width, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            tokens[row, : len(chunk.token_ids)] = torch.tensor(chunk.token_ids)
        starts = torch.tensor([c.start for c in chunks])
        # Padding continues each row's positions (clamped to the cache): harmless, as
        # positions past a row's end are rewritten before any query reads them. The clamp
        # lands on the cache's last position, past every prompt's end: a prompt leaves at
        # least one position to generate into (server/validation.py).
        positions = (starts[:, None] + torch.arange(width)).clamp_(max=self.max_len - 1)
        rows: list[int] = []
        picked: list[int] = []
        for row, chunk in enumerate(chunks):
            length = len(chunk.token_ids)
            ts = range(length) if chunk.every_position else [length - 1]
            rows += [row] * len(ts)
            picked += ts
        logits = self.model(
            tokens.to(self.device),
            positions.to(self.device),
            self.cache,
            as_slots([c.slot for c in chunks], self.device),
            logits_at=(
                torch.tensor(rows, device=self.device),
                torch.tensor(picked, device=self.device),
            ),
            length=min(max(c.start for c in chunks) + width, self.max_len),
        )  # [N, 1, V]
        return logits[:, 0]

    def decode(
        self, token_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int]
    ) -> torch.Tensor:
        """One token per row at its position in its slot -> logits [B, V]."""
        if self._graphs is not None and self._graphs.ready:
            return self._graphs.decode(token_ids, positions, slots)
        tokens = torch.tensor(token_ids, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(positions, device=self.device)[:, None]  # [B, 1]
        length = max(positions) + 1
        slots_index = as_slots(slots, self.device)
        first_slots = isinstance(slots_index, slice) and slots_index.start == 0
        # A step at the cache's last position runs eagerly: its keys are the whole cache,
        # which the graphs were built assuming they are not (dynamo guards on it), so
        # the first stream to reach the context's end built a graph again, every stream
        # waiting (seconds; a minute with cold caches).
        below_end = length < self.cache.max_len
        if self._compiled_decode is not None and first_slots and below_end:
            logits = self._compiled_decode(tokens, pos, length)
        else:
            logits = self.model(tokens, pos, self.cache, slots_index, length=length)
        return logits[:, 0]

    def _forward_first_slots(
        self, tokens: torch.Tensor, pos: torch.Tensor, length: int
    ) -> torch.Tensor:
        """The decode forward of B rows in slots 0..B-1: tokens, pos [B, 1] -> logits [B, 1, V]."""
        return self.model(tokens, pos, self.cache, slice(0, tokens.shape[0]), length=length)

    def warm_up(self) -> None:
        """Run each kind of forward once so the first request does not pay for setup
        (nor, with compilation, for the build)."""
        n = self.cache.n_slots
        self.prefill([PrefillInput(0, [0] * min(16, self.max_len), 0)])
        # Position 1, not 0: compiled, a key length of 1 would be specialised as a
        # constant and the first real step would build again. (The entries written
        # here are stale data, rewritten before any query reads them: kv_cache.py.)
        position = min(1, self.max_len - 1)
        # Compiled, the larger batches' graph is built here at n rows: inductor tunes its
        # products for the rows it is built with (32 rows of `small` on 2 Zen 4 cores:
        # 8.0-9.1 ms a step built at 16 or 31 rows, 15.5 ms built at 2).
        self.decode([0] * n, [position] * n, range(n))
        if self._compiled_decode is not None and n > 1:
            self.decode([0], [position], [0])  # batch 1's graph
        if self._graphs is not None:
            self._graphs.capture()
