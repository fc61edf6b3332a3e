"""Working memory: a fixed head plus an ordered list of addressable records.

A record is one assistant turn and the tool response it caused. Every tool response
carries a short id (drawn from a per-episode seeded RNG) that the agent uses as a handle
in ``prune_context(memory, delete_ids)``.

This module is pure bookkeeping over records. It knows nothing of tokens: the policy
layer attaches the exact token ids of each record (``Record.ids``) and builds prompts by
concatenating them, so a deletion removes spans and never re-tokenizes anything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

ID_LENGTH = 8
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o/1/l: easy to tell apart


class MemoryActionError(ValueError):
    """A memory action the agent got wrong; its message is shown to the agent verbatim."""


def make_id_pool(size: int = 512, seed: int = 1234) -> list[str]:
    """A fixed pool of distinct 8-character record ids.

    The pool is the same on every machine (fixed seed), so that a tokenizer can give each
    id a single token; episodes draw from it with their own seeded RNG.
    """
    rng = random.Random(seed)
    pool: list[str] = []
    seen: set[str] = set()
    while len(pool) < size:
        # A letter first, so an id is never read as a number by a JSON or YAML parser.
        rid = rng.choice(_ID_ALPHABET[:23]) + "".join(rng.choice(_ID_ALPHABET) for _ in range(ID_LENGTH - 1))
        if rid not in seen:
            seen.add(rid)
            pool.append(rid)
    return pool


ID_POOL = make_id_pool()


class IdSource:
    """Per-episode, seeded, never-repeating record ids that never run out.

    The first ``len(pool)`` ids are the fixed pool in a seeded order (so every trajectory
    of up to 512 records reads exactly as it always has, and a tokenizer that knows the
    pool sees one token per id). After the pool the same seeded RNG goes on drawing fresh
    ids one character longer (``ID_LENGTH + 1``, so they can never collide with a pool id),
    and one character longer again in the unlikely case that a length runs out of fresh
    ids. The sequence depends only on the seed: it replays exactly.
    """

    def __init__(self, seed: int, pool: list[str] | None = None):
        self._pool = list(pool if pool is not None else ID_POOL)
        self._rng = random.Random(seed)
        self._rng.shuffle(self._pool)
        self._next = 0
        self._extra_length = max((len(rid) for rid in self._pool), default=ID_LENGTH - 1) + 1
        self._extra_seen: set[str] = set()

    def __call__(self) -> str:
        if self._next < len(self._pool):
            rid = self._pool[self._next]
            self._next += 1
            return rid
        return self._extra()

    def _extra(self) -> str:
        """A fresh id past the pool: longer than any pool id, drawn from the seeded RNG."""
        rng = self._rng
        while True:
            for _ in range(64):  # at a million ids a length-9 draw repeats with odds of ~1e-7
                # A letter first, as in the pool: an id is never read as a number.
                rid = rng.choice(_ID_ALPHABET[:23]) + "".join(
                    rng.choice(_ID_ALPHABET) for _ in range(self._extra_length - 1))
                if rid not in self._extra_seen:
                    self._extra_seen.add(rid)
                    return rid
            self._extra_length += 1


@dataclass
class Record:
    """One assistant turn and the tool response it caused.

    Attributes:
        record_id: the id shown in the tool response; the handle for ``delete_ids``.
        assistant_text: the assistant turn as decoded text (for logs and scripted policies).
        response_text: the tool response's text (without chat markup).
        kind: ``"tool"`` (a task tool), ``"memory"`` (a prune_context record),
            ``"error"`` (an error response) or ``"summary"`` (a summarising baseline's note).
        ids: exact token ids of the whole record as placed in the prompt (set by the
            policy layer; the env never reads it).
        meta: free-form details (tool name, arguments, the memory note).
    """

    record_id: str
    assistant_text: str
    response_text: str
    kind: str = "tool"
    ids: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# Defaults of the tiny synthetic task: sized so that an agent that never prunes overflows
# at about K >= 4 while the pruning expert fits through K = 8 (measured; see README).
DEFAULT_CONTEXT_BUDGET = 1040
DEFAULT_MAX_STEPS = 40


@dataclass
class Budget:
    """Limits of an episode. Breaking either ends the episode with a penalty."""

    max_context_tokens: int = DEFAULT_CONTEXT_BUDGET
    """Largest context (prompt + generated tokens of one call) allowed, in tokens."""
    max_steps: int = DEFAULT_MAX_STEPS
    """Largest number of generation calls in one episode."""

    def broken(self, context_tokens: int, steps: int) -> str | None:
        """The reason a limit is broken, or None."""
        if context_tokens > self.max_context_tokens:
            return f"context budget exceeded ({context_tokens} > {self.max_context_tokens} tokens)"
        if steps > self.max_steps:
            return f"step budget exceeded ({steps} > {self.max_steps} steps)"
        return None


class WorkingMemory:
    """The agent's context: a head that cannot be deleted plus ordered records.

    Args:
        head_id: id shown in the head (the task), so an attempt to delete it can be named.
    """

    def __init__(self, head_id: str):
        self.head_id = head_id
        self.records: list[Record] = []

    def __len__(self) -> int:
        return len(self.records)

    def ids(self) -> list[str]:
        return [r.record_id for r in self.records]

    def get(self, record_id: str) -> Record | None:
        for r in self.records:
            if r.record_id == record_id:
                return r
        return None

    def append(self, record: Record) -> None:
        if record.record_id == self.head_id or self.get(record.record_id) is not None:
            raise ValueError(f"duplicate record id {record.record_id!r}")
        self.records.append(record)

    def check_delete(self, delete_ids: Any) -> list[str]:
        """Validate ``delete_ids`` against the current records; raise MemoryActionError.

        Returns the ids as a list of strings. Nothing is changed.
        """
        if not isinstance(delete_ids, list):
            raise MemoryActionError(
                f"delete_ids must be a list of record ids, got {type(delete_ids).__name__}"
            )
        if not delete_ids:
            raise MemoryActionError("delete_ids is empty: name at least one record id to delete")
        bad_type = [d for d in delete_ids if not isinstance(d, str)]
        if bad_type:
            raise MemoryActionError(f"delete_ids must hold strings, got {bad_type!r}")
        if self.head_id in delete_ids:
            raise MemoryActionError(f"cannot delete {self.head_id!r}: it is the task head, not a record")
        dupes = sorted({d for d in delete_ids if delete_ids.count(d) > 1})
        if dupes:
            raise MemoryActionError(f"duplicate ids in delete_ids: {', '.join(dupes)}")
        live = set(self.ids())
        unknown = [d for d in delete_ids if d not in live]
        if unknown:
            raise MemoryActionError(
                f"unknown record ids: {', '.join(unknown)} (live ids: {', '.join(self.ids()) or 'none'})"
            )
        return list(delete_ids)

    def prune_context(self, memory: Any, delete_ids: Any) -> list[Record]:
        """Delete the listed records; all-or-nothing.

        The caller then appends the memory record (the assistant turn holding the call and
        a status response with a new id). Returns the removed records.
        """
        if not isinstance(memory, str) or not memory.strip():
            raise MemoryActionError("memory must be a non-empty string: the note that replaces the records")
        ids = set(self.check_delete(delete_ids))
        removed = [r for r in self.records if r.record_id in ids]
        self.records = [r for r in self.records if r.record_id not in ids]
        return removed

    def drop(self, record_ids: list[str]) -> list[Record]:
        """Remove records by id without the agent's validation (used by baseline strategies)."""
        ids = set(record_ids)
        removed = [r for r in self.records if r.record_id in ids]
        self.records = [r for r in self.records if r.record_id not in ids]
        return removed
