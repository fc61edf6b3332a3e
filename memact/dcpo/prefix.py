"""Shared-prefix layout: place segments in rows so that tokens they share are computed once.

DCPO segments repeat their head: every segment of a trajectory starts with the system
prompt and the task (and often the records that survived an edit), and the trajectories of
one prompt share the system prompt and the task. Laid out as a prefix tree (trie), a row
holds each distinct prefix once; each segment is the path from the row's root to its last
token, and the attention mask lets a token see exactly the tokens on its own path
(``memact.dcpo.packing`` builds it). That is the same computation as one row per segment:
a token's hidden state depends only on the tokens before it, which are identical in every
segment holding it, so log-probs, loss and gradients are unchanged (gradients of a shared
token sum over the segments, as they would over the copies).

Sorting the segments by their tokens puts segments with long common prefixes next to each
other, and the common prefix of a segment with the whole set already placed in a row is
then its common prefix with the segment placed just before it (the property that makes a
sorted list a trie in disguise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Row:
    """One packed row: which segments it holds and where each of their tokens sits.

    Attributes:
        members: indices of the segments (into the list given to :func:`plan_rows`).
        slots: for each member, [len(segment)] the row position of each of its tokens; a
            shared prefix token has the same slot in every member that holds it.
        width: filled slots (distinct tokens) of the row.
    """

    members: list[int] = field(default_factory=list)
    slots: list[list[int]] = field(default_factory=list)
    width: int = 0


def plan_rows(tokens: Sequence[Sequence[int]], row_len: int, share_prefix: bool) -> list[Row]:
    """Place sequences in rows of at most ``row_len`` slots.

    Args:
        tokens: the sequences' token ids.
        row_len: most slots in a row; a sequence longer than this gets a row of its own.
        share_prefix: reuse the slots of the common prefix with the previous sequence of the
            row (a trie); otherwise each sequence takes fresh slots (block-diagonal packing).

    Returns:
        Rows in the order they were filled; every sequence is in exactly one row.
        Sequences are taken in sorted token order, so equal inputs give equal rows.
    """
    order = sorted(range(len(tokens)), key=lambda i: (list(tokens[i]), i))
    rows: list[Row] = []
    cur = Row()
    prev = -1  # the last sequence placed in ``cur``
    for i in order:
        seq = tokens[i]
        shared = common_prefix_len(tokens[prev], seq) if share_prefix and cur.members else 0
        if cur.members and cur.width + len(seq) - shared > row_len:
            rows.append(cur)
            cur, shared = Row(), 0
        # The first ``shared`` tokens reuse the previous member's slots; the rest are new.
        slots = (cur.slots[-1][:shared] if shared else []) + list(range(cur.width, cur.width + len(seq) - shared))
        cur.members.append(i)
        cur.slots.append(slots)
        cur.width += len(seq) - shared
        prev = i
    if cur.members:
        rows.append(cur)
    return rows
