"""The scheduler as a pure state machine: plain objects in, plain objects out."""

from __future__ import annotations

import pytest

from server.scheduler import QueueFull, ScheduledRequest, Scheduler, SchedulerOutput


def step(scheduler: Scheduler, finished: tuple[str, ...] = ()) -> SchedulerOutput:
    output = scheduler.schedule()
    scheduler.update_from_output(output, finished)
    return output


def test_admits_into_lowest_free_slots_and_prefills_then_decodes():
    scheduler = Scheduler(n_slots=2, max_waiting=4, prefill_budget=100)
    scheduler.add(ScheduledRequest("a", prompt_len=5))
    scheduler.add(ScheduledRequest("b", prompt_len=3))
    first = step(scheduler)
    assert first.admitted == ("a", "b")
    assert [(c.request_id, c.slot, c.start, c.end, c.completes_prompt) for c in first.prefills] == [
        ("a", 0, 0, 5, True),
        ("b", 1, 0, 3, True),
    ]
    assert first.decodes == ()
    second = step(scheduler)
    assert [(r.request_id, r.slot, r.position) for r in second.decodes] == [
        ("a", 0, 5),
        ("b", 1, 3),
    ]
    assert second.prefills == ()
    third = step(scheduler)
    assert [r.position for r in third.decodes] == [6, 4]


def test_long_prompt_is_chunked_to_the_budget_while_others_keep_decoding():
    scheduler = Scheduler(n_slots=2, max_waiting=4, prefill_budget=4)
    scheduler.add(ScheduledRequest("short", prompt_len=2))
    step(scheduler)
    scheduler.add(ScheduledRequest("long", prompt_len=10))
    chunks = []
    for _ in range(3):
        output = step(scheduler)
        assert [r.request_id for r in output.decodes] == ["short"]  # never stalled
        chunks += [(c.start, c.end, c.completes_prompt) for c in output.prefills]
    assert chunks == [(0, 4, False), (4, 8, False), (8, 10, True)]
    assert [r.request_id for r in step(scheduler).decodes] == ["short", "long"]


def test_budget_is_shared_between_prompts_in_admission_order():
    scheduler = Scheduler(n_slots=3, max_waiting=4, prefill_budget=6)
    for name, length in (("a", 4), ("b", 4), ("c", 4)):
        scheduler.add(ScheduledRequest(name, prompt_len=length))
    output = step(scheduler)
    assert [(c.request_id, c.start, c.end) for c in output.prefills] == [("a", 0, 4), ("b", 0, 2)]
    assert output.admitted == ("a", "b")  # c waits: no budget left this step
    output = step(scheduler)
    assert [(c.request_id, c.start, c.end) for c in output.prefills] == [("b", 2, 4), ("c", 0, 4)]


def test_waits_for_a_free_slot_and_takes_it_after_a_finish():
    scheduler = Scheduler(n_slots=1, max_waiting=4, prefill_budget=100)
    scheduler.add(ScheduledRequest("a", prompt_len=2))
    scheduler.add(ScheduledRequest("b", prompt_len=2))
    assert step(scheduler).admitted == ("a",)
    assert scheduler.num_waiting == 1
    step(scheduler, finished=("a",))
    output = step(scheduler)
    assert output.admitted == ("b",)
    assert output.prefills[0].slot == 0
    assert scheduler.num_running == 1 and scheduler.num_waiting == 0


def test_waiting_queue_is_bounded_beyond_the_free_slots():
    scheduler = Scheduler(n_slots=1, max_waiting=2, prefill_budget=100)
    for name in "abc":  # a will take the free slot; b and c wait
        scheduler.add(ScheduledRequest(name, prompt_len=1))
    with pytest.raises(QueueFull):
        scheduler.add(ScheduledRequest("d", prompt_len=1))
    step(scheduler)  # a takes the slot: b and c still fill the queue
    with pytest.raises(QueueFull):
        scheduler.add(ScheduledRequest("d", prompt_len=1))
    step(scheduler, finished=("a",))  # the slot frees: room for one more
    scheduler.add(ScheduledRequest("d", prompt_len=1))


def test_no_waiting_room_still_admits_into_free_slots():
    scheduler = Scheduler(n_slots=2, max_waiting=0, prefill_budget=100)
    scheduler.add(ScheduledRequest("a", prompt_len=1))
    scheduler.add(ScheduledRequest("b", prompt_len=1))
    with pytest.raises(QueueFull):
        scheduler.add(ScheduledRequest("c", prompt_len=1))
    assert step(scheduler).admitted == ("a", "b")


def test_requests_added_together_are_queued_all_or_none():
    scheduler = Scheduler(n_slots=1, max_waiting=1, prefill_budget=100)
    assert scheduler.capacity == 2
    with pytest.raises(QueueFull):
        scheduler.add(*(ScheduledRequest(name, prompt_len=1) for name in "abc"))
    assert scheduler.num_waiting == 0
    scheduler.add(ScheduledRequest("a", prompt_len=1), ScheduledRequest("b", prompt_len=1))
    assert step(scheduler).admitted == ("a",) and scheduler.num_waiting == 1


def test_cancel_frees_the_slot_or_the_queue_place():
    scheduler = Scheduler(n_slots=1, max_waiting=2, prefill_budget=100)
    scheduler.add(ScheduledRequest("a", prompt_len=3))
    scheduler.add(ScheduledRequest("b", prompt_len=3))
    step(scheduler)
    assert scheduler.cancel("b") and scheduler.num_waiting == 0
    assert scheduler.cancel("a") and scheduler.num_running == 0
    assert not scheduler.cancel("a")
    assert not scheduler.has_work
    assert step(scheduler).is_empty


def test_a_hole_below_a_running_request_is_compacted():
    scheduler = Scheduler(n_slots=3, max_waiting=4, prefill_budget=100)
    for name in "abc":
        scheduler.add(ScheduledRequest(name, prompt_len=4))
    step(scheduler)
    step(scheduler)  # each has 5 tokens cached after one decode
    step(scheduler, finished=("a",))
    output = step(scheduler)
    assert [(m.src, m.dst, m.length) for m in output.moves] == [(2, 0, 6)]
    assert [(r.request_id, r.slot) for r in output.decodes] == [("c", 0), ("b", 1)]
    assert scheduler.schedule().moves == ()


def test_compaction_moves_a_request_still_prefilling():
    scheduler = Scheduler(n_slots=2, max_waiting=4, prefill_budget=3)
    scheduler.add(ScheduledRequest("a", prompt_len=1))
    scheduler.add(ScheduledRequest("b", prompt_len=6))
    step(scheduler)  # a done with its prompt, b has 2 of 6
    step(scheduler, finished=("a",))  # b has 5 of 6
    output = step(scheduler)
    assert [(m.src, m.dst, m.length) for m in output.moves] == [(1, 0, 5)]
    assert [(c.slot, c.start, c.end, c.completes_prompt) for c in output.prefills] == [
        (0, 5, 6, True)
    ]


def test_two_slots_freed_in_turn_compact_once_and_are_each_handed_out_once():
    # A finished request left in the slot map was moved again by compaction, and its slot
    # handed out twice: two live requests on one KV slot.
    s = Scheduler(n_slots=3, max_waiting=4, prefill_budget=100)
    for name in "abc":
        s.add(ScheduledRequest(name, prompt_len=4))
    step(s)
    step(s)
    step(s, finished=("c",))
    step(s, finished=("a",))
    out = step(s)
    assert [(m.src, m.dst, m.length) for m in out.moves] == [(1, 0, 7)]
    for name in "de":
        s.add(ScheduledRequest(name, prompt_len=2))
    out = step(s)
    assert sorted(c.slot for c in out.prefills) == [1, 2]


def test_a_step_never_prefills_more_tokens_than_its_budget():
    # The budget bounds how long running streams wait on a long prompt: continuing
    # chunks count against it as first ones do.
    s = Scheduler(n_slots=2, max_waiting=4, prefill_budget=4)
    s.add(ScheduledRequest("a", prompt_len=10))
    s.add(ScheduledRequest("b", prompt_len=10))
    for _ in range(6):
        out = step(s)
        assert sum(c.end - c.start for c in out.prefills) <= 4


def test_refuses_a_budget_or_a_prompt_that_could_never_make_progress():
    # A zero prefill budget would never prefill a prompt, and an empty prompt has no
    # position to sample its first token from: both would hang or corrupt a stream.
    with pytest.raises(ValueError):
        Scheduler(n_slots=1, max_waiting=0, prefill_budget=0)
    with pytest.raises(ValueError):
        Scheduler(n_slots=0, max_waiting=0, prefill_budget=4)
    with pytest.raises(ValueError):
        Scheduler(n_slots=1, max_waiting=-1, prefill_budget=4)
    s = Scheduler(n_slots=1, max_waiting=1, prefill_budget=4)
    with pytest.raises(ValueError):
        s.add(ScheduledRequest("empty", prompt_len=0))
    assert not s.has_work


def chunks(output: SchedulerOutput) -> list[tuple[str, int, int, int]]:
    return [(c.request_id, c.slot, c.start, c.end) for c in output.prefills]


def test_choices_of_one_prompt_copy_its_prefill_and_compute_only_its_last_token():
    scheduler = Scheduler(n_slots=4, max_waiting=4, prefill_budget=4)
    scheduler.add(
        ScheduledRequest("a", prompt_len=10),
        ScheduledRequest("a1", prompt_len=10, prompt_source="a", shared=9),
        ScheduledRequest("a2", prompt_len=10, prompt_source="a", shared=9),
        ScheduledRequest("other", prompt_len=2),
    )
    assert chunks(step(scheduler)) == [("a", 0, 0, 4)]  # the whole budget
    assert chunks(step(scheduler)) == [("a", 0, 4, 8)]
    # Admitted in their turn, the choices wait in their slots: "a" has cached 8 of the 9
    # positions before its last token. What the budget leaves goes to "other".
    third = step(scheduler)
    assert third.admitted == ("a1", "a2", "other") and third.copies == ()
    assert chunks(third) == [("a", 0, 8, 10), ("other", 3, 0, 2)]
    fourth = step(scheduler)  # "a" decodes; each choice copies its 9 positions
    assert [(c.src, c.dst, c.length) for c in fourth.copies] == [(0, 1, 9), (0, 2, 9)]
    assert chunks(fourth) == [("a1", 1, 9, 10), ("a2", 2, 9, 10)]
    assert all(c.completes_prompt for c in fourth.prefills)
    assert [(r.request_id, r.position) for r in fourth.decodes] == [("a", 10), ("other", 2)]
    assert [(r.request_id, r.position) for r in step(scheduler).decodes] == [
        ("a", 11),
        ("a1", 10),
        ("a2", 10),
        ("other", 3),
    ]


def test_a_choice_whose_source_is_gone_prefills_its_prompt_itself():
    scheduler = Scheduler(n_slots=2, max_waiting=4, prefill_budget=4)
    scheduler.add(
        ScheduledRequest("a", prompt_len=6),
        ScheduledRequest("a1", prompt_len=6, prompt_source="a", shared=5),
    )
    assert chunks(step(scheduler)) == [("a", 0, 0, 4)]
    assert scheduler.cancel("a")  # its client left mid-prefill
    output = step(scheduler)
    assert (output.admitted, output.copies) == (("a1",), ())
    assert chunks(output) == [("a1", 0, 0, 4)]


def test_a_choice_of_a_source_that_ends_with_its_prompt_prefills_beside_it_not_after():
    # max_tokens 1: "a" finishes in the step its prompt is in, so nothing is ever copied
    # from it (nor from "a1", copying from "a"): the choices prefill in that step too.
    scheduler = Scheduler(n_slots=3, max_waiting=4, prefill_budget=16)
    scheduler.add(
        ScheduledRequest("a", prompt_len=5, ends_with_prompt=True),
        ScheduledRequest("a1", prompt_len=5, prompt_source="a", shared=4, ends_with_prompt=True),
        ScheduledRequest("a2", prompt_len=5, prompt_source="a1", shared=4, ends_with_prompt=True),
    )
    output = scheduler.schedule()
    assert output.copies == ()
    assert chunks(output) == [("a", 0, 0, 5), ("a1", 1, 0, 5), ("a2", 2, 0, 5)]


def test_a_copy_goes_where_this_steps_compaction_moved_the_choice():
    scheduler = Scheduler(n_slots=3, max_waiting=4, prefill_budget=8)
    scheduler.add(
        ScheduledRequest("x", prompt_len=2),
        ScheduledRequest("a", prompt_len=5),
        ScheduledRequest("a1", prompt_len=5, prompt_source="a", shared=4),
    )
    first = step(scheduler, finished=("x",))  # x ends at its first token: slot 0 is free
    assert first.admitted == ("x", "a", "a1") and first.copies == ()
    assert chunks(first) == [("x", 0, 0, 2), ("a", 1, 0, 5)]  # a1 waits in slot 2
    second = step(scheduler)  # a1 moves down into slot 0, then copies "a" there
    assert [(m.src, m.dst, m.length) for m in second.moves] == [(2, 0, 0)]
    assert [(c.src, c.dst, c.length) for c in second.copies] == [(1, 0, 4)]
    assert chunks(second) == [("a1", 0, 4, 5)]


def test_a_request_copies_the_prefix_it_shares_with_a_running_one_and_prefills_the_rest():
    scheduler = Scheduler(n_slots=2, max_waiting=4, prefill_budget=16)
    scheduler.add(ScheduledRequest("system", prompt_len=12))
    step(scheduler)
    step(scheduler)  # "system" decodes: its prompt's positions are all cached
    scheduler.add(ScheduledRequest("user", prompt_len=15, prompt_source="system", shared=10))
    output = step(scheduler)  # the source has them: copied at once
    assert output.admitted == ("user",)
    assert [(c.src, c.dst, c.length) for c in output.copies] == [(0, 1, 10)]
    assert chunks(output) == [("user", 1, 10, 15)]


def test_a_choice_still_waits_on_a_source_that_ends_with_its_prompt_but_is_not_done_this_step():
    # "s" ends with its prompt, but only the step that completes that prompt lets "c"
    # give up waiting: here "s" itself waits on "a", so "c" waits too and copies from
    # "s" the step after, instead of prefilling its whole prompt at once.
    scheduler = Scheduler(n_slots=3, max_waiting=4, prefill_budget=100)
    scheduler.add(
        ScheduledRequest("a", prompt_len=8),
        ScheduledRequest("s", prompt_len=8, prompt_source="a", shared=7, ends_with_prompt=True),
        ScheduledRequest("c", prompt_len=8, prompt_source="s", shared=7),
    )
    first = step(scheduler)
    assert first.admitted == ("a", "s", "c") and first.copies == ()
    assert chunks(first) == [("a", 0, 0, 8)]
    second = step(scheduler)
    assert [(c.src, c.dst, c.length) for c in second.copies] == [(0, 1, 7), (1, 2, 7)]
    assert chunks(second) == [("s", 1, 7, 8), ("c", 2, 7, 8)]


def test_slots_freed_around_compactions_are_still_handed_out_lowest_first():
    # The free slots are a heap: compaction must take its lowest hole in a way that keeps
    # it one, or a later admission takes a slot above a hole and the running slots stop
    # being contiguous (one more move a step later).
    scheduler = Scheduler(n_slots=8, max_waiting=4, prefill_budget=100)
    scheduler.add(*(ScheduledRequest(f"r{i}", prompt_len=1) for i in range(8)))
    step(scheduler)
    step(scheduler, finished=("r0", "r2", "r4", "r6"))
    compacted = step(scheduler, finished=("r1", "r5"))
    assert [(m.src, m.dst) for m in compacted.moves] == [(7, 0), (5, 2)]
    scheduler.add(ScheduledRequest("r8", prompt_len=1))
    output = step(scheduler)
    assert [(m.src, m.dst) for m in output.moves] == [(3, 1)]
    assert chunks(output) == [("r8", 2, 0, 1)]  # slots 0, 1, 2: no hole
    assert step(scheduler).moves == ()
