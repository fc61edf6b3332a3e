"""Run one experiment's `train.py` with a hard time limit and read its summary.

The script's output goes to a log file, never to the caller (and so never into an agent's
context). The runner keeps its own clock: the script's `training_seconds` is reported but
not trusted, and the whole process group is killed at ``KILL_FACTOR`` x the budget.

Nothing train.py starts outlives its run. train.py runs in a new session (its own process
group) with ``PR_SET_PDEATHSIG`` and a marker in its environment, ``MEMACT_RUN_ID`` (unique
per run) and ``MEMACT_RUN_WORKSPACE`` (the workspace), which every process it starts
inherits. When the run ends, however it ends, the runner kills its process group, then
scans ``/proc`` (Linux) for every process still in its session or carrying its run id and
kills those, scan after scan until none is left: a child started with ``setsid``, a
double-forked daemon or a child in its own process group is found by its environment.
What escapes: a process that leaves the session *and* drops the inherited environment
(``setsid env -i ...``); only a cgroup would catch that.
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

KILL_FACTOR = 2.0  # a run longer than 2x its training budget is killed and counted as a crash
BUDGET_ENV = "MEMACT_BUDGET_S"
RUN_ID_ENV = "MEMACT_RUN_ID"  # unique per run: marks every process a run starts
RUN_KEY_ENV = "MEMACT_RUN_KEY"  # the run's place in its workspace (seed and label): the same on a replay
WORKSPACE_ENV = "MEMACT_RUN_WORKSPACE"  # the workspace: finds what a killed loop left behind
_PR_SET_PDEATHSIG = 1
_CLEANUP_ROUNDS = 100  # scans of /proc after a run; a scan that finds nothing ends it


def check_budget(budget_s: float, name: str = "--budget") -> float:
    """``budget_s`` as a float if it is a finite number of seconds > 0; else ValueError saying so.

    NaN and infinity are refused: a NaN budget would never compare, an infinite one would
    never be killed.
    """
    try:
        value = float(budget_s)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {budget_s!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {budget_s!r}")
    return value


@dataclass
class RunResult:
    """What one run of train.py produced.

    Attributes:
        status: ``"ok"``, ``"crash"`` (non-zero exit or no parsable val_bpb) or ``"timeout"``.
        val_bpb: validation bits per byte, None unless status is ok.
        memory_gb: peak memory the script reported, in GiB, or None.
        wall_seconds: the runner's own measure of the run, start-up and evaluation included.
        A run with a near-zero budget measures the workspace's start-up (see the loop).
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


def check_val_bpb(text: str | None) -> tuple[float | None, str]:
    """``(val_bpb, "")`` for a finite value > 0 (bits per byte), else ``(None, reason)``."""
    value = _finite_float(text)
    if value is None:
        return None, "no finite val_bpb in the summary" + ("" if text is None else f" (got {text!r})")
    if value <= 0:
        return None, f"val_bpb {text} is not a positive number of bits per byte"
    return value, ""


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


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def find_run_processes(session: int | None = None, marker: tuple[str, str] | None = None) -> list[int]:
    """Live processes (zombies left out) in ``session`` or whose environment holds ``NAME=value``.

    Linux only (reads /proc); elsewhere the list is empty. Never lists this process.
    """
    if not os.path.isdir("/proc"):
        return []
    needle = f"{marker[0]}={marker[1]}".encode() if marker else None
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if (session is not None and fields[3] == str(session)) or (needle and needle in _environ(pid)):
            found.append(pid)
    return found


def kill_run_processes(session: int | None = None, marker: tuple[str, str] | None = None) -> int:
    """SIGKILL what :func:`find_run_processes` lists, scan after scan until a scan finds none.

    Returns how many processes were killed. A process forking while it is scanned is found
    by the next scan: its children inherit the session and the environment marker.
    """
    killed = 0
    for _ in range(_CLEANUP_ROUNDS):
        pids = find_run_processes(session, marker)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.002)
    return killed


def kill_workspace_processes(workdir: str) -> int:
    """Kill processes a run in ``workdir`` left behind (e.g. when the loop itself was killed)."""
    return kill_run_processes(marker=(WORKSPACE_ENV, os.path.realpath(workdir)))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    """``proc.wait(timeout)``, woken by a pidfd where there is one (Popen.wait polls every 50 ms)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            fd = pidfd_open(proc.pid)
        except OSError:
            fd = None
        if fd is not None:
            try:
                ready, _, _ = select.select([fd], [], [], timeout)
            finally:
                os.close(fd)
            if not ready:
                raise subprocess.TimeoutExpired(proc.args, timeout)
    return proc.wait(timeout=timeout)


def run_training(
    workdir: str, budget_s: float, log_path: str, script: str = "train.py", python: str | None = None,
    kill_after_s: float | None = None, run_key: str = "",
) -> RunResult:
    """Run ``python script`` in ``workdir`` with ``MEMACT_BUDGET_S=budget_s``; output to ``log_path``.

    The run is killed (its whole process group) after ``KILL_FACTOR * budget_s`` seconds
    of wall time (or ``kill_after_s`` when given) and reported as ``timeout``. A non-zero
    exit, or a summary without a finite ``val_bpb`` > 0 (bits per byte), is a ``crash``.
    Whatever the script started is killed when the run ends (see the module docstring).
    ``run_key`` goes to the script as ``MEMACT_RUN_KEY``: a name for the run that is the same
    whenever the same run of the same workspace seed is made (the surrogate seeds its noise with it).
    """
    budget_s = check_budget(budget_s, "budget_s")
    limit = KILL_FACTOR * budget_s if kill_after_s is None else check_budget(kill_after_s, "kill_after_s")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    run_id = uuid.uuid4().hex
    env = dict(os.environ, **{BUDGET_ENV: f"{budget_s:g}", "PYTHONUNBUFFERED": "1", RUN_ID_ENV: run_id,
                              RUN_KEY_ENV: run_key, WORKSPACE_ENV: os.path.realpath(workdir)})
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
            returncode = _wait(proc, limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = None
        finally:
            _kill_group(proc)
            # The session outlives its leader while members are left, and its id (the pid of
            # train.py) is not reused until then: the scan cannot hit an unrelated process.
            kill_run_processes(session=proc.pid, marker=(RUN_ID_ENV, run_id))
    wall = time.monotonic() - start

    with open(log_path, encoding="utf-8", errors="replace") as f:
        log_text = f.read()
    summary = parse_summary(log_text)
    val_bpb, bad_metric = check_val_bpb(summary.get("val_bpb"))
    peak_mb = _finite_float(summary.get("peak_memory_mb"))
    memory_gb = None if peak_mb is None or peak_mb < 0 else peak_mb / 1024

    if timed_out:
        return RunResult("timeout", None, memory_gb, wall, log_path, summary, f"killed after {limit:g} s (2x budget)"
                         if kill_after_s is None else f"killed after {limit:g} s")
    if returncode != 0:
        last = next((line for line in reversed(log_text.splitlines()) if line.strip()), "")
        return RunResult("crash", None, memory_gb, wall, log_path, summary, f"exit code {returncode}: {last[:200]}")
    if val_bpb is None:
        return RunResult("crash", None, memory_gb, wall, log_path, summary, f"{bad_metric}; see {log_path}")
    return RunResult("ok", val_bpb, memory_gb, wall, log_path, summary)
