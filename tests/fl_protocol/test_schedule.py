"""The learning-rate schedules the trainer (per epoch) and the coordinator (per round) share."""

from __future__ import annotations

import itertools

import pytest

from fl_protocol.schedule import FLOOR, scheduled_lr


def test_constant_is_the_base_rate_and_cosine_decays_from_it_to_the_floor() -> None:
    assert [scheduled_lr(0.01, "constant", i, 4) for i in range(4)] == [0.01] * 4
    rates = [scheduled_lr(1.0, "cosine", i, 5) for i in range(5)]
    assert rates[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert FLOOR < rates[-1] < 0.2
    assert scheduled_lr(1.0, "cosine", 0, 1) == 1.0  # a single step trains at the base rate


def test_unknown_schedules_and_steps_outside_the_run_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown lr schedule"):
        scheduled_lr(1.0, "linear", 0, 3)
    with pytest.raises(ValueError, match="outside"):
        scheduled_lr(1.0, "cosine", 3, 3)
