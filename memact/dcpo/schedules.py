"""Learning-rate schedules: a multiplier of ``optim.lr`` at each optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("constant", "cosine")
"""``optim.schedule``: linear warm-up, then constant (published DCPO) or cosine decay."""


def warmup_then_constant(warmup_steps: int):
    """LR multiplier at optimizer step s: (s + 1) / warmup during warm-up, then 1.

    Starting at 1/warmup rather than 0 so the first step is not wasted.
    """
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def warmup_then_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """LR multiplier: the same warm-up, then a cosine from 1 down to ``min_ratio`` at step ``total_steps - 1``."""
    warm = warmup_then_constant(warmup_steps)
    span = max(1, total_steps - 1 - warmup_steps)

    def f(s: int) -> float:
        if s < warmup_steps:
            return warm(s)
        t = min(1.0, (s - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int = 0, min_ratio: float = 0.1
                  ) -> Callable[[int], float]:
    """The multiplier of ``schedule`` (one of :data:`SCHEDULES`)."""
    if schedule == "constant":
        return warmup_then_constant(warmup_steps)
    if schedule == "cosine":
        return warmup_then_cosine(warmup_steps, total_steps, min_ratio)
    raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
