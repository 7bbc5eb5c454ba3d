"""The learning-rate schedule: linear warmup, then wsd (hold, then a linear cooldown) or a
cosine, driven by steps or, with --max-time, by the clock."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import pytest

from training.args import TrainArgs
from training.trainer import lr_at

# 10 warmup steps (0-9), then 100 steps of schedule (10-109): step s ends at progress
# (s + 1 - 10) / 100, so the run's last step, 109, trains at the floor.
SCHEDULE = {"lr": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 10, "max_steps": 110}


def lrs(schedule: str, steps: Iterable[int], **overrides: float) -> list[float]:
    args = TrainArgs(**{**SCHEDULE, "lr_schedule": schedule, **overrides})
    return [lr_at(args, step, elapsed=0.0) for step in steps]


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_warmup_rises_linearly_to_the_peak(schedule: str) -> None:
    assert lrs(schedule, range(10)) == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_wsd_holds_the_peak_then_decays_linearly_to_the_floor() -> None:
    assert lrs("wsd", range(10, 60)) == [1.0] * 50  # the first half after warmup
    assert lrs("wsd", [84, 109, 200]) == pytest.approx([0.55, 0.1, 0.1])
    cooldown = lrs("wsd", range(59, 110))
    steps = [b - a for a, b in itertools.pairwise(cooldown)]
    assert steps == pytest.approx([-0.9 / 50] * 50)  # one straight line


def test_wsd_cooldown_fraction_sets_where_the_decay_starts() -> None:
    assert lrs("wsd", [84, 85], cooldown_fraction=0.25) == pytest.approx([1.0, 1.0 - 0.9 / 25])
    # The whole run: a straight line from warmup's peak down to the floor.
    line = lrs("wsd", [9, 10, 59, 109], cooldown_fraction=1.0)
    assert line == pytest.approx([1.0, 1.0 - 0.9 / 100, 0.55, 0.1])


def test_cosine_falls_from_the_peak_to_the_floor() -> None:
    quarter = 0.1 + 0.45 * (1 + math.cos(math.pi / 4))
    assert lrs("cosine", [9, 34, 59, 109]) == pytest.approx([1.0, quarter, 0.55, 0.1])


def test_with_max_time_the_clock_drives_the_cooldown() -> None:
    args = TrainArgs(**SCHEDULE, max_time=100.0)
    assert args.lr_schedule == "wsd"
    # Step 20 alone is 11% of the way; 75 of 100 seconds puts the run halfway down.
    assert lr_at(args, 20, elapsed=75.0) == pytest.approx(0.55)
    assert lr_at(args, 20, elapsed=10.0) == 1.0


def test_with_max_time_steps_ahead_of_the_clock_still_drive_the_cooldown() -> None:
    # Whichever is further along ends the run: a fast run reaching --max-steps before its
    # --max-time must still be at the floor by its last step.
    args = TrainArgs(**SCHEDULE, max_time=100.0)
    assert lr_at(args, 84, elapsed=1.0) == pytest.approx(0.55)
    assert lr_at(args, 109, elapsed=1.0) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_the_whole_schedule_scales_with_lr(schedule: str) -> None:
    # min_lr_ratio is a share of --lr, not a learning rate of its own.
    steps = [0, 9, 59, 84, 109, 500]
    scaled = lrs(schedule, steps, lr=3e-3)
    assert scaled == pytest.approx([3e-3 * x for x in lrs(schedule, steps)])
    assert scaled[-1] == pytest.approx(3e-4)


def test_decay_steps_sets_the_schedules_length_apart_from_max_steps() -> None:
    # A run cut short (--max-steps 60 of a 110-step schedule) is on the schedule of the
    # whole, so resuming it to 110 steps follows the same curve as one uninterrupted run.
    short = lrs("wsd", [59, 84, 109], max_steps=60, decay_steps=110)
    assert short == pytest.approx([1.0, 0.55, 0.1])
    assert lrs("cosine", [59], max_steps=60, decay_steps=110) == pytest.approx([0.55])


def test_a_schedule_all_warmup_is_at_the_floor_after_it_not_an_error() -> None:
    # --warmup-steps as long as the schedule leaves no steps to decay over: the steps
    # after it (a resume with a larger --max-steps, --decay-steps kept) train at the floor.
    args = TrainArgs(**{**SCHEDULE, "warmup_steps": 110, "decay_steps": 110, "max_steps": 500})
    assert lr_at(args, 109, elapsed=0.0) == 1.0
    assert lr_at(args, 110, elapsed=0.0) == pytest.approx(0.1)
    assert lr_at(args, 500, elapsed=0.0) == pytest.approx(0.1)
