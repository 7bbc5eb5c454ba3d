"""Continuous-batching scheduler: a pure state machine (no torch, no asyncio).

One engine step is `schedule()` -> execute on the model -> `update_from_output()`.
Each step every request whose prompt is cached decodes one token, and waiting or
partly-prefilled requests get prompt chunks up to a token budget, so a long prompt
costs running streams at most one chunk of latency per step.

A request owns one KV-cache slot from admission to finish. Slots are handed out
lowest-first, and when a request leaves a hole below an occupied slot the highest
occupant is moved down into it (a `SlotCopy` the runner makes): running requests
then hold a contiguous run of slots, which the model reads as a view, not a gather.

Token accounting per request: `num_cached` tokens have K/V in the slot and
`num_generated` tokens have been sampled. A decode feeds the newest sampled token at
position `num_cached`; the chunk that completes the prompt samples the first token.

A request whose prompt begins as an earlier one's does (n choices of one prompt, or a
system prompt many requests begin with) shares that one's prefill: its `prompt_source`
names the earlier request and `shared` how many leading prompt positions they have in
common (all but the last for n choices). Admitted in its turn, it waits in its slot until
the source's slot holds those positions, copies them into its own
(`SchedulerOutput.copies`) and prefills the rest of its prompt. If the source is gone by
then (finished, at its first token too, or cancelled), it prefills its prompt itself; and
it does not wait for a source that ends with its prompt (`ends_with_prompt`: max_tokens 1)
once that prompt is completed this step, as nothing could be copied from it after.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass
class ScheduledRequest:
    request_id: str
    prompt_len: int  # >= 1
    prompt_source: str | None = None  # an earlier request whose prompt begins as this one's
    shared: int = 0  # < prompt_len: the leading prompt positions it copies from that one
    # It finishes as its prompt is in (max_tokens 1, or 0): nothing is copied from it then.
    ends_with_prompt: bool = False
    slot: int = -1  # -1 while waiting
    num_cached: int = 0
    num_generated: int = 0

    @property
    def decoding(self) -> bool:
        return self.num_generated > 0


@dataclass(frozen=True)
class PrefillChunk:
    request_id: str
    slot: int
    start: int  # prompt positions [start, end) are written this step
    end: int
    completes_prompt: bool  # sample the first token from position end - 1


@dataclass(frozen=True)
class DecodeRow:
    request_id: str
    slot: int
    position: int  # where the newest sampled token is written


@dataclass(frozen=True)
class SlotCopy:
    """Cached positions copied from one slot to another: a move where `src` is vacated
    (compaction), a shared prompt prefix where it is not."""

    src: int
    dst: int
    length: int  # cached positions [0, length) to copy


@dataclass(frozen=True)
class SchedulerOutput:
    moves: tuple[SlotCopy, ...]  # apply before running this step
    decodes: tuple[DecodeRow, ...]  # ordered by slot
    prefills: tuple[PrefillChunk, ...]
    admitted: tuple[str, ...]  # left the waiting queue this step
    # After the moves, in order: the positions a request shares with its source's prompt,
    # into the request's slot, before it prefills the rest of its prompt this step.
    copies: tuple[SlotCopy, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.decodes or self.prefills)


class Scheduler:
    def __init__(self, n_slots: int, max_waiting: int, prefill_budget: int) -> None:
        if n_slots < 1 or max_waiting < 0 or prefill_budget < 1:
            raise ValueError("n_slots and prefill_budget must be >= 1, max_waiting >= 0")
        self.n_slots = n_slots
        self.max_waiting = max_waiting
        self.prefill_budget = prefill_budget
        self.waiting: deque[ScheduledRequest] = deque()
        self.running: dict[str, ScheduledRequest] = {}  # in admission order
        self._free: list[int] = list(range(n_slots))  # a min-heap
        self._by_slot: list[ScheduledRequest | None] = [None] * n_slots

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def capacity(self) -> int:
        """The most requests this scheduler holds at once: running and waiting."""
        return self.n_slots + self.max_waiting

    def add(self, *requests: ScheduledRequest) -> None:
        """Queue `requests`, all of them or (QueueFull) none."""
        if any(request.prompt_len < 1 for request in requests):
            raise ValueError("a request needs at least one prompt token")
        # Waiting requests take the free slots first; beyond them, max_waiting may wait.
        if len(self.waiting) + len(requests) > len(self._free) + self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        self.waiting.extend(requests)

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request; False if it is not (or no longer) here."""
        request = self.running.get(request_id)
        if request is not None:
            self._release(request)
            return True
        return self.cancel_waiting(request_id)

    def cancel_waiting(self, request_id: str) -> bool:
        """Drop a request still waiting for a slot; False if it is not waiting."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return True
        return False

    def schedule(self) -> SchedulerOutput:
        moves = self._compact()
        decodes = sorted(
            (
                DecodeRow(r.request_id, r.slot, r.num_cached)
                for r in self.running.values()
                if r.decoding
            ),
            key=lambda row: row.slot,
        )
        budget = self.prefill_budget
        prefills: list[PrefillChunk] = []
        copies: list[SlotCopy] = []
        for request in self.running.values():
            if budget == 0:
                break
            if not request.decoding:
                budget -= self._prefill(request, budget, prefills, copies)
        admitted: list[str] = []
        while budget > 0 and self.waiting and self._free:
            request = self.waiting.popleft()
            request.slot = heapq.heappop(self._free)
            self._by_slot[request.slot] = request
            self.running[request.request_id] = request
            admitted.append(request.request_id)
            budget -= self._prefill(request, budget, prefills, copies)
        return SchedulerOutput(
            tuple(moves), tuple(decodes), tuple(prefills), tuple(admitted), tuple(copies)
        )

    def update_from_output(self, output: SchedulerOutput, finished: Collection[str]) -> None:
        """Account for the step `output` described; then free the requests in `finished`."""
        for row in output.decodes:
            request = self.running[row.request_id]
            request.num_cached += 1
            request.num_generated += 1
        for chunk in output.prefills:
            request = self.running[chunk.request_id]
            request.num_cached = chunk.end
            if chunk.completes_prompt:
                request.num_generated = 1
        for request_id in finished:
            request = self.running.get(request_id)
            if request is not None:
                self._release(request)

    def _prefill(
        self,
        request: ScheduledRequest,
        budget: int,
        prefills: list[PrefillChunk],
        copies: list[SlotCopy],
    ) -> int:
        """The prompt tokens `request` prefills this step (its chunk in `prefills`): none
        while its source is still prefilling the positions they share; once it has cached
        them, they are copied (into `copies`) and the rest of the prompt is prefilled."""
        source = self.running.get(request.prompt_source or "")
        if request.num_cached == 0 and source is not None and request.shared > 0:
            if source.num_cached >= request.shared:
                copies.append(SlotCopy(source.slot, request.slot, request.shared))
                request.num_cached = request.shared
            elif not (source.ends_with_prompt and _completes(source, prefills)):
                return 0
            # Else its source's prompt is in this step and it finishes then, before any
            # step could copy those positions: waiting would only put this prompt off a
            # step (and the next request's, waiting on this one's, in turn).
        return self._chunk(request, budget, prefills)

    def _chunk(self, request: ScheduledRequest, budget: int, out: list[PrefillChunk]) -> int:
        end = min(request.prompt_len, request.num_cached + budget)
        out.append(
            PrefillChunk(
                request.request_id,
                request.slot,
                request.num_cached,
                end,
                end == request.prompt_len,
            )
        )
        return end - request.num_cached

    def _release(self, request: ScheduledRequest) -> None:
        del self.running[request.request_id]
        self._by_slot[request.slot] = None
        heapq.heappush(self._free, request.slot)

    def _compact(self) -> list[SlotCopy]:
        """Move the highest occupied slot into the lowest hole until none is below it."""
        moves = []
        top = max((r.slot for r in self.running.values()), default=-1)
        while self._free and self._free[0] < top:
            dst = heapq.heappop(self._free)
            request = self._by_slot[top]
            assert request is not None
            moves.append(SlotCopy(top, dst, request.num_cached))
            self._by_slot[top], self._by_slot[dst] = None, request
            request.slot = dst
            heapq.heappush(self._free, top)
            top = max(i for i, r in enumerate(self._by_slot) if r is not None)
        return moves


def _completes(request: ScheduledRequest, prefills: list[PrefillChunk]) -> bool:
    """Whether `request`'s prompt is completed by one of this step's chunks so far."""
    return any(c.request_id == request.request_id and c.completes_prompt for c in prefills)
