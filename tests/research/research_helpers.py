"""Helpers of the research tests: a fast stub train.py (no torch), workspaces, a scripted proposer.

A module with a unique name rather than conftest.py, so that `from research_helpers import ...`
cannot pick up another test folder's conftest."""

from __future__ import annotations

import os

from memact.research import workspace as ws
from memact.research.proposers import Proposal

# A deterministic stand-in for train.py: val_bpb is best at LEARNING_RATE 0.004 and grows
# a little with DEPTH. STUB_SLEEP lets a test catch it mid-run.
STUB_TRAIN = '''\
"""Stub train.py for tests."""
import math
import os
import time

LEARNING_RATE = 0.001  # peak learning rate
WIDTH = 64  # multiple of N_HEADS
DEPTH = 2  # blocks
N_HEADS = 4  # heads
BATCH_SIZE = 16  # sequences per step
WARMUP_STEPS = 10  # steps
STUB_SLEEP = 0.0  # seconds

marker = os.environ.get("STUB_MARKER")
if marker:
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\\n")
time.sleep(STUB_SLEEP)
assert float(os.environ["MEMACT_BUDGET_S"]) > 0
val = 3.0 + abs(math.log(LEARNING_RATE / 0.004)) + 0.01 * DEPTH
print("training log line")
print("---")
print(f"val_bpb: {val:.6f}")
print("peak_memory_mb: 10.0")
'''


def make_workspace(directory, train_source: str = STUB_TRAIN) -> str:
    """A cpu-template workspace whose train.py is ``train_source``, committed; returns its path."""
    path = str(directory)
    ws.init_workspace(path, "cpu")
    ws.write_file(path, train_source)
    ws.commit_file(path, ws.EDITABLE_FILE, "stub train.py")
    return path


class ScriptedProposer:
    """Returns the given proposals in order (then repeats the last one)."""

    def __init__(self, proposals: list[Proposal]):
        self.proposals = proposals
        self.contexts: list[str] = []

    def propose(self, context_text: str, best_source: str, experiment: int) -> Proposal:
        self.contexts.append(context_text)
        return self.proposals[min(experiment - 1, len(self.proposals) - 1)]


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its new parent) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
