"""Holds on checkpoint directories, so the trainer's rotation never deletes one being read.

``run.keep_checkpoints`` deletes all but the newest checkpoints after each save. An evaluation of a
checkpoint taken during a run reads its directory for minutes (``memact eval`` checks the files
again at every K), and once lost its results for the K not yet run went with it (docs/reproduce.md,
DCPO run D). A reader now marks the directory it reads with an empty file
``.held_by_<pid>.<n>`` for as long as it reads it (:func:`hold`); :func:`rotate` leaves every
checkpoint with a live holder in place and says so. A marker whose process has died (a killed
evaluation) holds nothing.

Only directories named ``checkpoints/step_*`` are marked: other model directories are never
rotated, and a reader should not write into them.

No heavy imports here: ``memact eval`` imports this module.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOLD_PREFIX = ".held_by_"
_counter = itertools.count()


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A ``RUN/checkpoints/step_*`` directory (what :func:`rotate` may delete)."""
    p = Path(path)
    return p.is_dir() and p.name.startswith("step_") and p.parent.name == "checkpoints"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def holders(path: str | os.PathLike) -> list[int]:
    """The live processes holding ``path`` (sorted pids; markers of dead processes are ignored)."""
    pids = set()
    for marker in Path(path).glob(f"{HOLD_PREFIX}*"):
        pid = marker.name[len(HOLD_PREFIX):].split(".")[0]
        if pid.isdigit() and _alive(int(pid)):
            pids.add(int(pid))
    return sorted(pids)


@contextmanager
def hold(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Mark every checkpoint directory among ``paths`` as held by this process until the block ends.

    Paths that are not ``checkpoints/step_*`` directories (a scripted policy, a model directory, a
    read-only one) are skipped. Yields the markers written. Holds nest: each has its own marker.
    """
    markers = []
    try:
        for p in paths:
            if is_checkpoint_dir(p):
                marker = Path(p) / f"{HOLD_PREFIX}{os.getpid()}.{next(_counter)}"
                try:
                    marker.touch()
                except OSError:
                    continue
                markers.append(marker)
        yield markers
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)


def rotate(root: str | os.PathLike, keep: int, log=print) -> list[Path]:
    """Delete all but the newest ``keep`` ``step_*`` directories of ``root`` (``keep`` <= 0: none),
    except those a live process holds. Returns the deleted directories."""
    if keep <= 0:
        return []
    deleted = []
    for old in sorted(Path(root).glob("step_*"))[:-keep]:
        pids = holders(old)
        if pids:
            log(f"[memact] keeping {old}: held by pid {', '.join(map(str, pids))} (run.keep_checkpoints={keep})")
            continue
        shutil.rmtree(old, ignore_errors=True)
        deleted.append(old)
    return deleted
