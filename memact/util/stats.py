"""Means and standard deviations of plain lists (metrics, summaries)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean(xs: Sequence[float]) -> float:
    """The mean; 0.0 for an empty list."""
    return sum(xs) / len(xs) if xs else 0.0


def std(xs: Sequence[float]) -> float:
    """The sample standard deviation (n - 1); 0.0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
