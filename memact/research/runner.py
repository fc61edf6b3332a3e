"""Run one experiment's `train.py` with a hard time limit and read its summary.

The script's output goes to a log file, never to the caller (and so never into an agent's
context). The runner keeps its own clock: the script's `training_seconds` is reported but
not trusted, and the whole process group is killed at ``KILL_FACTOR`` x the budget.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

KILL_FACTOR = 2.0  # a run longer than 2x its training budget is killed and counted as a crash
BUDGET_ENV = "MEMACT_BUDGET_S"
_PR_SET_PDEATHSIG = 1


@dataclass
class RunResult:
    """What one run of train.py produced.

    Attributes:
        status: ``"ok"``, ``"crash"`` (non-zero exit or no parsable val_bpb) or ``"timeout"``.
        val_bpb: validation bits per byte, None unless status is ok.
        memory_gb: peak memory the script reported, in GiB, or None.
        wall_seconds: the runner's own measure of the run, start-up and evaluation included.
        summary: every ``key: value`` line of the summary block.
        error: a one-line reason when status is not ok.
    """

    status: str
    val_bpb: float | None
    memory_gb: float | None
    wall_seconds: float
    log_path: str
    summary: dict[str, str] = field(default_factory=dict)
    error: str = ""


def parse_summary(log_text: str) -> dict[str, str]:
    """The ``key: value`` lines after the last ``---`` line of a log."""
    lines = log_text.splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not marks:
        return {}
    summary = {}
    for line in lines[marks[-1] + 1 :]:
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            summary[key.strip()] = value.strip()
    return summary


def _finite_float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _die_with_parent() -> None:
    """In the child: start a new process group, and on Linux die if the runner dies.

    Without the death signal, a ``kill -9`` of the research loop would leave train.py
    running unsupervised; with it, the kernel kills the run together with its parent.
    """
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # best effort: the process group kill below still bounds a normal run


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_training(
    workdir: str, budget_s: float, log_path: str, script: str = "train.py", python: str | None = None
) -> RunResult:
    """Run ``python script`` in ``workdir`` with ``MEMACT_BUDGET_S=budget_s``; output to ``log_path``.

    The run is killed (its whole process group) after ``KILL_FACTOR * budget_s`` seconds
    of wall time and reported as ``timeout``. A non-zero exit or a summary without a finite
    ``val_bpb`` is a ``crash``. The children of a finished run are killed too, so nothing
    the script started outlives it.
    """
    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    env = dict(os.environ, **{BUDGET_ENV: f"{budget_s:g}", "PYTHONUNBUFFERED": "1"})
    limit = KILL_FACTOR * budget_s
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [python or sys.executable, script],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        try:
            returncode = proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = None
        finally:
            _kill_group(proc)
    wall = time.monotonic() - start

    with open(log_path, encoding="utf-8", errors="replace") as f:
        log_text = f.read()
    summary = parse_summary(log_text)
    val_bpb = _finite_float(summary.get("val_bpb"))
    peak_mb = _finite_float(summary.get("peak_memory_mb"))
    memory_gb = None if peak_mb is None else peak_mb / 1024

    if timed_out:
        return RunResult("timeout", None, memory_gb, wall, log_path, summary, f"killed after {limit:g} s (2x budget)")
    if returncode != 0:
        last = next((line for line in reversed(log_text.splitlines()) if line.strip()), "")
        return RunResult("crash", None, memory_gb, wall, log_path, summary, f"exit code {returncode}: {last[:200]}")
    if val_bpb is None:
        return RunResult(
            "crash", None, memory_gb, wall, log_path, summary, f"no finite val_bpb in the summary of {log_path}"
        )
    return RunResult("ok", val_bpb, memory_gb, wall, log_path, summary)
