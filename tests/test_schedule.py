"""Progressive resolution as a pure function of the epoch: ramps, steps and explicit stages."""
from __future__ import annotations

import pytest

from fastpipe.train.resolution import ResolutionSchedule, Stage, batch_size_at, resolution_at


def test_ramp_holds_start_then_climbs_in_multiples_of_32_then_holds_end():
    schedule = ResolutionSchedule(start=160, end=256, ramp_start=2, ramp_end=8)
    resolutions = [schedule.resolution_at(epoch) for epoch in range(12)]
    assert resolutions[:3] == [160, 160, 160]
    assert resolutions[8:] == [256] * 4
    assert all(r % 32 == 0 for r in resolutions)
    assert resolutions == sorted(resolutions)   # never shrinks on a rising ramp
    assert set(resolutions) == {160, 192, 224, 256}   # passes through every step on the way


def test_ramp_rounds_to_the_requested_multiple():
    schedule = ResolutionSchedule(start=64, end=128, ramp_start=0, ramp_end=4, multiple=16)
    assert [schedule.resolution_at(epoch) for epoch in range(5)] == [64, 80, 96, 112, 128]


def test_a_falling_ramp_is_allowed():
    schedule = ResolutionSchedule(start=224, end=160, ramp_start=0, ramp_end=2)
    assert [schedule.resolution_at(epoch) for epoch in range(3)] == [224, 192, 160]


def test_equal_ramp_epochs_make_a_single_step():
    schedule = ResolutionSchedule(start=128, end=192, ramp_start=3, ramp_end=3)
    assert [schedule.resolution_at(epoch) for epoch in range(5)] == [128, 128, 128, 192, 192]


def test_batch_size_is_constant_without_stages():
    schedule = ResolutionSchedule(start=128, end=192, ramp_start=0, ramp_end=4, batch_size=96)
    assert {schedule.batch_size_at(epoch) for epoch in range(10)} == {96}


def test_stages_set_resolution_and_batch_size_per_epoch_and_the_last_stage_persists():
    schedule = ResolutionSchedule(stages=(Stage(2, 56, 512), Stage(3, 112, 256), Stage(1, 224)), batch_size=64)
    assert [schedule.resolution_at(e) for e in range(8)] == [56, 56, 112, 112, 112, 224, 224, 224]
    assert [schedule.batch_size_at(e) for e in range(8)] == [512, 512, 256, 256, 256, 64, 64, 64]


def test_stages_override_the_ramp():
    schedule = ResolutionSchedule(start=160, end=256, ramp_start=0, ramp_end=4, stages=(Stage(1, 96),))
    assert schedule.resolutions(4) == [96]


def test_resolutions_lists_each_distinct_size_once_in_order_of_use():
    schedule = ResolutionSchedule(start=128, end=192, ramp_start=1, ramp_end=3)
    assert schedule.resolutions(6) == [128, 160, 192]
    assert schedule.resolutions(1) == [128]


def test_module_functions_agree_with_the_methods():
    schedule = ResolutionSchedule(stages=(Stage(1, 64, 32), Stage(1, 128, 16)))
    assert [resolution_at(e, schedule) for e in range(3)] == [64, 128, 128]
    assert [batch_size_at(e, schedule) for e in range(3)] == [32, 16, 16]


@pytest.mark.parametrize("arguments, message", [
    ({"start": 8}, "below the minimum"),
    ({"end": 15}, "below the minimum"),
    ({"stages": (Stage(2, 12),)}, "below the minimum"),
    ({"batch_size": 0}, "batch size"),
    ({"stages": (Stage(2, 64, 0),)}, "batch size"),
    ({"stages": (Stage(0, 64),)}, "at least 1 epoch"),
    ({"ramp_start": 5, "ramp_end": 2}, "before ramp_start"),
])
def test_invalid_schedules_are_rejected_with_a_reason(arguments, message):
    with pytest.raises(ValueError, match=message):
        ResolutionSchedule(**arguments)


def test_ramp_without_epochs_keeps_start():
    schedule = ResolutionSchedule(start=160, end=192)
    assert [schedule.resolution_at(e) for e in range(3)] == [160, 160, 160]


def test_ramp_ends_are_exact_even_off_the_multiple():
    schedule = ResolutionSchedule(start=176, end=208, ramp_start=2, ramp_end=6)
    assert schedule.resolution_at(2) == 176
    assert schedule.resolution_at(6) == 208
    assert schedule.resolution_at(9) == 208


def test_ramp_steps_are_even():
    schedule = ResolutionSchedule(start=128, end=256, ramp_start=0, ramp_end=8)
    # 16 px per epoch interpolated, rounded half-up to 32: no banker's-rounding stalls
    assert [schedule.resolution_at(e) for e in range(9)] == [128, 160, 160, 192, 192, 224, 224, 256, 256]


@pytest.mark.parametrize("kwargs", [{"multiple": 0}, {"ramp_start": -1, "ramp_end": 2}])
def test_bad_ramp_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ResolutionSchedule(**kwargs)
