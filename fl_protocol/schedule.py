"""Learning-rate schedules shared by the trainer (per epoch) and the coordinator (per round).

``constant``: the base rate throughout. ``cosine``: step ``i`` of ``n`` gets
``base * (FLOOR + (1 - FLOOR) * (1 + cos(pi * i / n)) / 2)``, from the base rate at the first
step down towards ``FLOOR`` x base at the last. A federation applies it across rounds (round r
of R trains at the rate of step r - 1 of R), so the late rounds make the small steps that one
long centralized run makes at its end, instead of restarting at the full rate every round.
"""

from __future__ import annotations

import math

SCHEDULES: tuple[str, ...] = ("constant", "cosine")
FLOOR = 0.05  # the cosine ends at 5% of the base rate, not 0 (a last step still learns)


def scheduled_lr(base: float, schedule: str, step: int, steps: int) -> float:
    """The rate of step ``step`` (0-based) of ``steps`` under ``schedule``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if steps < 1 or not 0 <= step < steps:
        raise ValueError(f"step {step} outside 0..{steps - 1}")
    if schedule == "constant":
        return base
    return base * (FLOOR + (1.0 - FLOOR) * 0.5 * (1.0 + math.cos(math.pi * step / steps)))
