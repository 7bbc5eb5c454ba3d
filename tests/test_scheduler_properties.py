"""The scheduler driven as the engine drives it, against a reference model kept here.

Rules are what the engine does: `submit` (`add`, which may refuse with QueueFull; n
choices of one prompt together, all but the first copying the first's prefill, and the
first maybe a prefix of an earlier live request's),
`cancel` (a waiting request leaves the queue at once through `cancel_waiting`, even
while a step is in flight; a running one is released by `cancel` before the next
`schedule`), `schedule` and `complete` (each sampled row gets a token; some finish by
length or by a stop, and `update_from_output` hears of them) or `fail_step` (the step
raised: every request in it ends, a prompt still partly prefilled too). Submits and waiting
cancellations may fall between a step's `schedule` and its `complete`, as the event
loop's do between the model thread's. After every rule the scheduler must agree with
the model; at the end the machine keeps stepping, and every request must finish.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from server.scheduler import QueueFull, ScheduledRequest, Scheduler, SchedulerOutput

WAITING, RUNNING, FINISHED, CANCELLED = "waiting", "running", "finished", "cancelled"


@dataclass
class Ref:
    """The reference model's view of one submitted request."""

    prompt_len: int
    max_tokens: int
    source: str | None = None  # an earlier request whose prompt begins as this one's
    shared: int = 0  # the leading prompt positions this one copies from it
    state: str = WAITING
    slot: int = -1
    cached: int = 0  # prompt tokens prefilled, then +1 per decode
    generated: int = 0


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        n_slots=st.integers(1, 4),
        max_waiting=st.integers(0, 3),
        budget=st.integers(1, 8),
    )
    def configure(self, n_slots: int, max_waiting: int, budget: int) -> None:
        self.s = Scheduler(n_slots, max_waiting, budget)
        self.n_slots, self.max_waiting, self.budget = n_slots, max_waiting, budget
        self.refs: dict[str, Ref] = {}
        self.queue: list[str] = []  # waiting, in submission order
        self.slots: list[str | None] = [None] * n_slots
        self.pending_cancels: set[str] = set()  # the engine's _cancelled
        self.in_flight: SchedulerOutput | None = None
        self.next_id = 0

    # ------------------------------------------------------------------ helpers

    def running(self) -> list[str]:
        return [i for i, r in self.refs.items() if r.state == RUNNING]

    def live(self) -> list[str]:
        return [i for i, r in self.refs.items() if r.state in (WAITING, RUNNING)]

    def copied_from(self, ref: Ref) -> Ref | None:
        """The running source whose prompt `ref` (nothing of it cached yet) would copy."""
        if ref.source is None or ref.cached > 0 or ref.shared == 0:
            return None
        source = self.refs[ref.source]
        return source if source.state == RUNNING else None

    def release(self, request_id: str, state: str) -> None:
        ref = self.refs[request_id]
        assert self.slots[ref.slot] == request_id
        self.slots[ref.slot] = None
        ref.state, ref.slot = state, -1

    # ------------------------------------------------------------------ rules

    @rule(
        prompt_len=st.integers(1, 30),
        max_tokens=st.integers(1, 6),
        choices=st.integers(1, 3),
        prefix=st.integers(0, 30),
    )
    def submit(self, prompt_len: int, max_tokens: int, choices: int, prefix: int) -> None:
        # The first request shares `prefix` leading positions (at most its prompt but the
        # last, and the source's prompt) with the latest live request, if any; the other
        # choices all but the last with the first, as the engine marks them.
        ids = [f"r{self.next_id + j}" for j in range(choices)]
        self.next_id += choices
        live = self.live()
        first = Ref(prompt_len, max_tokens)
        if live and min(prefix, prompt_len - 1, self.refs[live[-1]].prompt_len) > 0:
            first.source = live[-1]
            first.shared = min(prefix, prompt_len - 1, self.refs[live[-1]].prompt_len)
        refs = {ids[0]: first}
        for i in ids[1:]:
            refs[i] = (
                Ref(prompt_len, max_tokens, ids[0], prompt_len - 1)
                if prompt_len > 1
                else Ref(prompt_len, max_tokens)
            )
        free = self.slots.count(None)
        at_bound = len(self.queue) + choices > free + self.max_waiting
        try:
            self.s.add(
                *(
                    ScheduledRequest(i, r.prompt_len, r.source, r.shared, r.max_tokens <= 1)
                    for i, r in refs.items()
                )
            )
        except QueueFull:
            assert at_bound, (len(self.queue), free, self.max_waiting)
            return
        assert not at_bound, f"admitted past the bound: {len(self.queue)} waiting, {free} free"
        self.refs.update(refs)
        self.queue += ids

    @precondition(lambda self: self.refs)
    @rule(pick=st.integers(0, 10**6))
    def cancel(self, pick: int) -> None:
        # Any request ever submitted: cancelling a finished one (a stream closed late)
        # must be harmless too.
        ids = list(self.refs)
        self._cancel(ids[pick % len(ids)])

    @precondition(
        lambda self: any(
            r.state == RUNNING and 0 < r.cached < r.prompt_len for r in self.refs.values()
        )
    )
    @rule(pick=st.integers(0, 10**6))
    def cancel_mid_prefill(self, pick: int) -> None:
        ids = [
            i for i, r in self.refs.items() if r.state == RUNNING and 0 < r.cached < r.prompt_len
        ]
        self._cancel(ids[pick % len(ids)])

    def _cancel(self, request_id: str) -> None:
        # Engine.cancel: a waiting request leaves at once, anything else at the next step.
        was_waiting = self.refs[request_id].state == WAITING
        assert self.s.cancel_waiting(request_id) == was_waiting
        if was_waiting:
            self.queue.remove(request_id)
            self.refs[request_id].state = CANCELLED
        else:
            self.pending_cancels.add(request_id)

    @precondition(lambda self: self.in_flight is None)
    @rule()
    def schedule(self) -> None:
        # Engine._apply_cancellations, then schedule().
        for request_id in sorted(self.pending_cancels):
            was_running = self.refs[request_id].state == RUNNING
            assert self.s.cancel(request_id) == was_running, request_id
            if was_running:
                self.release(request_id, CANCELLED)
        self.pending_cancels.clear()
        out = self.s.schedule()
        self.check_output(out)
        # The engine runs (and reports) only a step with rows in it.
        self.in_flight = None if out.is_empty else out

    @precondition(lambda self: self.in_flight is not None)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        out = self.in_flight
        assert out is not None
        self.in_flight = None
        sampled = [row.request_id for row in out.decodes]
        sampled += [c.request_id for c in out.prefills if c.completes_prompt]
        stops = data.draw(st.sets(st.sampled_from(sampled)) if sampled else st.just(set()))
        self._complete(out, stops)

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def fail_step(self) -> None:
        # Engine._fail_step: the step raised, and every request in it ends with an error,
        # prompts still partly prefilled included.
        out = self.in_flight
        assert out is not None
        self.in_flight = None
        self._complete(out, set(), failed=True)

    def _complete(self, out: SchedulerOutput, stops: set[str], failed: bool = False) -> None:
        finished = []
        for row in out.decodes:
            ref = self.refs[row.request_id]
            ref.cached += 1
            ref.generated += 1
        for chunk in out.prefills:
            ref = self.refs[chunk.request_id]
            ref.cached = chunk.end
            if chunk.completes_prompt:
                ref.generated = 1
        if failed:
            finished = [r.request_id for r in out.decodes] + [c.request_id for c in out.prefills]
        for row in [r.request_id for r in out.decodes] + [
            c.request_id for c in out.prefills if c.completes_prompt
        ]:
            ref = self.refs[row]
            if not failed and (row in stops or ref.generated >= ref.max_tokens):
                finished.append(row)
        self.s.update_from_output(out, finished)
        for request_id in finished:
            self.release(request_id, FINISHED)

    # ------------------------------------------------------------------ checks

    def check_output(self, out: SchedulerOutput) -> None:
        # Slot moves: each from a live slot into a free one, carrying what it has cached.
        for move in out.moves:
            mover = self.slots[move.src]
            assert mover is not None, f"moved out of empty slot {move.src}"
            assert self.slots[move.dst] is None, f"move {move} overwrites {self.slots[move.dst]}"
            assert move.length == self.refs[mover].cached, (move, self.refs[mover])
            self.slots[move.src], self.slots[move.dst] = None, mover
            self.refs[mover].slot = move.dst
        occupied = [i for i, r in enumerate(self.slots) if r is not None]
        assert occupied == list(range(len(occupied))), f"not compacted: {self.slots}"

        # Decodes: exactly the requests whose prompt is in, at their next position.
        expect = sorted(
            (r.slot, i, r.cached)
            for i, r in self.refs.items()
            if r.state == RUNNING and r.generated > 0
        )
        got = [(row.slot, row.request_id, row.position) for row in out.decodes]
        assert got == expect, (got, expect)
        for row in out.decodes:
            assert self.refs[row.request_id].cached >= self.refs[row.request_id].prompt_len

        # Admission: a FIFO prefix of the queue, into the lowest free slots.
        admitted = list(out.admitted)
        assert admitted == self.queue[: len(admitted)], (admitted, self.queue)
        del self.queue[: len(admitted)]
        free = [slot for slot, held_by in enumerate(self.slots) if held_by is None]
        assert len(admitted) <= len(free), f"{admitted} admitted into {free}"
        for request_id, slot in zip(admitted, free, strict=False):
            self.slots[slot] = request_id
            self.refs[request_id].state, self.refs[request_id].slot = RUNNING, slot

        # A request waits in its slot while its source, running, has not yet cached the
        # positions they share (held: no chunk); then, in its first chunk, it copies those
        # positions from the source's slot (after this step's moves). Copies run in turn,
        # in admission order: a source that copied this step is a source of them already.
        chunked = {chunk.request_id: chunk for chunk in out.prefills}
        held, expect_copies = set(), []
        for request_id in self.running():  # submission order, which admission keeps
            ref = self.refs[request_id]
            source = self.copied_from(ref)
            if source is None:
                continue
            if source.cached < ref.shared:
                # Not while its source's prompt is completed this step and the source then
                # finishes (max_tokens 1): it prefills its own, as if it had no source.
                last = chunked.get(ref.source or "")
                if not (source.max_tokens <= 1 and last is not None and last.completes_prompt):
                    held.add(request_id)
            elif request_id in chunked:
                expect_copies.append((source.slot, ref.slot, ref.shared))
                ref.cached = ref.shared
        assert [(c.src, c.dst, c.length) for c in out.copies] == expect_copies

        # Prefills: each request at most once, continuing where its prompt stands, within
        # the budget in total; a new request's chunk is in the slot it was given.
        seen: set[str] = set()
        total = 0
        for chunk in out.prefills:
            ref = self.refs[chunk.request_id]
            assert ref.state == RUNNING and ref.generated == 0, (chunk, ref)
            assert chunk.request_id not in seen, f"{chunk.request_id} prefilled twice"
            seen.add(chunk.request_id)
            assert chunk.start == ref.cached < chunk.end <= ref.prompt_len, (chunk, ref)
            assert chunk.completes_prompt == (chunk.end == ref.prompt_len), chunk
            assert chunk.slot == ref.slot, (chunk, ref)
            total += chunk.end - chunk.start
        assert total <= self.budget, f"{total} prompt tokens for a budget of {self.budget}"
        assert set(admitted) - held <= seen, "admitted without a chunk"
        assert not held & seen, f"prefilled before its source's prompt was in: {held & seen}"
        partial = [i for i in self.running() if self.refs[i].generated == 0 and i not in held]
        assert set(partial) == seen or total == self.budget, "a prompt idled with budget left"
        if self.queue and None in self.slots:
            assert total == self.budget, "a request waits by a free slot with budget left"
        occupied = [i for i, r in enumerate(self.slots) if r is not None]
        assert occupied == list(range(len(occupied))), f"admitted out of order: {self.slots}"
        assert out.is_empty == (not self.live()), "an empty step with work, or work from none"

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "s"):
            return
        running = self.running()
        assert self.s.num_running == len(running)
        assert self.s.num_waiting == len(self.queue)
        assert self.s.has_work == bool(self.live())
        # The engine's gauges: running, waiting, KV usage = running / n_slots.
        assert self.s.num_running / self.s.n_slots == len(running) / self.n_slots
        assert [r.request_id for r in self.s.waiting] == self.queue
        slots = {i: r.slot for i, r in self.s.running.items()}
        assert len(set(slots.values())) == len(slots), f"two requests share a slot: {slots}"
        assert slots == {i: self.refs[i].slot for i in running}
        for request_id in running:
            sched, ref = self.s.running[request_id], self.refs[request_id]
            assert (sched.num_cached, sched.num_generated) == (ref.cached, ref.generated)

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        # No starvation: with nothing new arriving, every request finishes by length.
        if self.in_flight is not None:
            self._complete(self.in_flight, set())
            self.in_flight = None
        limit = sum(r.prompt_len + r.max_tokens for r in self.refs.values()) + 2
        for _ in range(limit):
            if not self.s.has_work and not self.pending_cancels:
                break
            self.schedule()
            if self.in_flight is not None:
                self._complete(self.in_flight, set())
                self.in_flight = None
            self.agrees_with_the_model()
        assert not self.s.has_work, f"still unfinished after {limit} steps"
        left = [i for i, r in self.refs.items() if r.state not in (FINISHED, CANCELLED)]
        assert not left, f"starved: {left}"
        for r in self.refs.values():
            if r.state == FINISHED and r.generated:
                assert r.cached >= r.prompt_len and 1 <= r.generated <= r.max_tokens


# Derandomized, without an example database: the same cases every run, so that a run's
# result does not depend on the machine's history (as tests/test_detokenizer_fuzz.py).
SchedulerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)
test_scheduler_state_machine = SchedulerMachine.TestCase
