"""What a research run writes to disk, and the rule that decides what to keep.

Durability: every log row is appended with one ``os.write`` on a file descriptor opened
with ``O_APPEND``, then ``fsync``. POSIX appends of one small buffer land at the end of the
file as a whole, so concurrent writers (or a writer killed with ``kill -9``) never leave
interleaved or half lines; a reader still ignores a last line without its newline, and
:func:`repair_tsv` drops one if a dying disk ever produced it. The state file is written
to a temporary file, fsynced, and renamed over the old one, so it is either the old state
or the new state, never a mix.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from typing import Any

from memact.util.files import atomic_write_bytes

RESULTS_HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")
CONTEXT_HEADER = ("experiment", "context_tokens", "unpruned_tokens", "memory_action")
STATUSES = ("keep", "discard", "crash")
BASELINE_PREFIX = "baseline run"  # descriptions of the baseline rows start with this


# ---- The keep rule -------------------------------------------------------------------


def noise_margin(baseline_bpbs: list[float]) -> float:
    """The noise margin from repeated baseline runs: their range, max - min.

    The range needs no distributional assumption and, for the 2-5 repeats a run can afford,
    is about 1.1-2.3 standard deviations: a change must beat the best by more than the
    spread we saw from noise alone.
    """
    if len(baseline_bpbs) < 2:
        raise ValueError(f"the noise margin needs at least 2 baseline runs, got {len(baseline_bpbs)}")
    return max(baseline_bpbs) - min(baseline_bpbs)


def baseline_best(baseline_bpbs: list[float]) -> float:
    """The best-so-far value a run starts from: the mean of the baseline runs."""
    if not baseline_bpbs:
        raise ValueError("no baseline runs to average")
    return statistics.fmean(baseline_bpbs)


def should_keep(val_bpb: float | None, best: float, margin: float) -> bool:
    """Keep a proposal only when it beats the best by more than the noise margin.

    A crash (``val_bpb`` None) is never kept; a tie or a noise-level win is discarded.
    """
    return val_bpb is not None and val_bpb < best - margin


# ---- Append-only TSV logs ---------------------------------------------------------------


def _clean_field(value: Any) -> str:
    """A TSV field: tabs, line breaks and NULs would break the row, so they become spaces;
    lone surrogates (which UTF-8 cannot encode) become U+FFFD."""
    text = str(value).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return " ".join(text.replace("\t", " ").replace("\0", " ").splitlines()).strip()


def append_row(path: str, header: tuple[str, ...], row: tuple[Any, ...]) -> None:
    """Append one row to a TSV log atomically, writing the header first if the file is new.

    The header is created with ``O_EXCL`` so that two writers racing on a new file do not
    both write it. The row is one ``os.write`` of the whole line on an ``O_APPEND`` fd.
    """
    if len(row) != len(header):
        raise ValueError(f"row {row!r} has {len(row)} fields, header {header!r} has {len(header)}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, ("\t".join(header) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    line = ("\t".join(_clean_field(v) for v in row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        written = os.write(fd, line)
        if written != len(line):  # never seen for small lines on a local disk; say so if it happens
            raise OSError(f"short append to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: str) -> list[dict[str, str]]:
    """The rows of a TSV log as dicts keyed by the header; a trailing partial line is ignored."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    complete = lines[:-1]  # the piece after the last newline is empty or a partial line
    if not complete:
        return []
    header = complete[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in complete[1:] if line]


def repair_tsv(path: str) -> bool:
    """Drop a trailing partial line (no newline) from a TSV log; True if one was dropped."""
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.endswith(b"\n"):
        return False
    atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])
    return True


@dataclass
class ResultRow:
    """One row of results.tsv, parsed."""

    commit: str
    val_bpb: float | None
    memory_gb: float | None
    status: str
    description: str

    @property
    def is_baseline(self) -> bool:
        return self.description.startswith(BASELINE_PREFIX)

    def as_tuple(self) -> tuple[str, str, str, str, str]:
        return (
            self.commit,
            "" if self.val_bpb is None else f"{self.val_bpb:.6f}",
            "" if self.memory_gb is None else f"{self.memory_gb:.2f}",
            self.status,
            self.description,
        )


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def read_results(path: str) -> list[ResultRow]:
    """The rows of a results.tsv."""
    return [
        ResultRow(
            commit=r.get("commit", ""),
            val_bpb=_float_or_none(r.get("val_bpb")),
            memory_gb=_float_or_none(r.get("memory_gb")),
            status=r.get("status", ""),
            description=r.get("description", ""),
        )
        for r in read_rows(path)
    ]


def append_result(path: str, row: ResultRow) -> None:
    if row.status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row.status!r}")
    append_row(path, RESULTS_HEADER, row.as_tuple())


# ---- State file ---------------------------------------------------------------------------


def write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
