"""Which segments of one prompt's group of trajectories go into the optimizer step."""

from __future__ import annotations

import random
from collections.abc import Sequence

MODES = ("all", "round_robin")


def sample_segments(
    segments_per_traj: Sequence[int],
    mode: str = "all",
    n_seg: int | None = None,
    rng: random.Random | None = None,
) -> list[tuple[int, int]]:
    """Pick segments for ONE prompt's group.

    Args:
        segments_per_traj: [n_traj] number of segments of each trajectory of the group.
        mode: "all": every segment once, trajectory by trajectory, in order (``n_seg`` is
            ignored). "round_robin": passes over the trajectories, each pass taking one
            segment from each trajectory in a fresh random order, until ``n_seg`` are drawn
            (the last pass may stop part-way, at random trajectories: in a fixed order the
            first ones would count twice). A segment is chosen uniformly among that
            trajectory's unused ones; once it has none left, uniformly among all of its
            segments (with replacement). Trajectories with 0 segments are skipped.
        n_seg: number of segments to draw, >= 1; required for "round_robin".
        rng: source of randomness for "round_robin"; pass a seeded one for reproducibility
            (None: a fresh unseeded ``random.Random``).

    Returns:
        (trajectory index, segment index) pairs in draw order; [] if no trajectory has a segment.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    counts = list(segments_per_traj)
    for c in counts:
        if not isinstance(c, int) or c < 0:
            raise ValueError(f"segments_per_traj must hold non-negative ints, got {counts}")
    if mode == "all":
        return [(t, s) for t, c in enumerate(counts) for s in range(c)]

    if n_seg is None or not isinstance(n_seg, int) or n_seg < 1:
        raise ValueError(f"n_seg must be an int >= 1 for mode='round_robin', got {n_seg!r}")
    rng = rng if rng is not None else random.Random()
    active = [t for t, c in enumerate(counts) if c > 0]
    if not active:
        return []
    unused = {t: list(range(counts[t])) for t in active}
    picks: list[tuple[int, int]] = []
    while True:
        order = list(active)
        rng.shuffle(order)
        for t in order:
            if unused[t]:
                s = unused[t].pop(rng.randrange(len(unused[t])))
            else:
                s = rng.randrange(counts[t])
            picks.append((t, s))
            if len(picks) == n_seg:
                return picks
