"""The research loop end to end on a stub train.py: crashes, timeouts, patches, resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from research_helpers import (
    STUB_TRAIN,
    CannedServer,
    ScriptedProposer,
    chat_reply,
    make_workspace,
    process_alive,
)

from memact.research import workspace as ws
from memact.research.endpoint import Endpoint
from memact.research.history import HeuristicMemory, Outcome
from memact.research.loop import ResearchLoop, RunConfig
from memact.research.proposers import ChatProposer, Proposal, set_constants
from memact.research.results import read_results


def _loop(workdir, proposer, experiments, budget=2.0, **config):
    cfg = RunConfig(budget_s=budget, experiments=experiments, baseline_runs=2, **config)
    return ResearchLoop(workdir, cfg, proposer, HeuristicMemory(), log=lambda msg: None)


def _clean_at_best(workdir):
    state = json.load(open(os.path.join(workdir, ws.STATE_FILE)))
    assert ws.head(workdir) == state["best_commit"]
    assert not ws.is_dirty(workdir)
    return state


def test_crash_and_timeout_are_logged_and_the_loop_goes_on(stub_workspace):
    broken = Proposal("break the syntax", new_source=STUB_TRAIN + "\ndef broken(:\n")
    hang = Proposal("sleep forever", new_source=set_constants(STUB_TRAIN, {"STUB_SLEEP": 60.0}))
    better = Proposal("raise lr", new_source=set_constants(STUB_TRAIN, {"LEARNING_RATE": 0.004}))
    start = time.monotonic()
    assert _loop(stub_workspace, ScriptedProposer([broken, hang, better]), 3, budget=0.5).run() == 0
    assert time.monotonic() - start < 30
    rows = read_results(os.path.join(stub_workspace, ws.RESULTS_FILE))
    assert [r.status for r in rows] == ["keep", "keep", "crash", "crash", "keep"]
    assert "SyntaxError" in rows[2].description
    assert rows[3].description.startswith("sleep forever [timeout: killed after 1 s")
    state = _clean_at_best(stub_workspace)
    assert state["best_experiment"] == 3
    assert "LEARNING_RATE = 0.004" in ws.read_file(stub_workspace)
    # Kept commits only: the template, the stub, the kept experiment.
    log = ws.git(stub_workspace, "log", "--format=%s").splitlines()
    assert log == ["exp 3: raise lr", "stub train.py", "workspace from the cpu template"]
    for name in (ws.PROGRESS_PLOT, ws.CONTEXT_PLOT, ws.CONTEXT_FILE):
        assert os.path.getsize(os.path.join(stub_workspace, name)) > 0


def test_noise_level_change_is_discarded(tmp_path):
    workdir = make_workspace(tmp_path / "ws")
    # DEPTH 2 -> 1 improves the stub by 0.01; with a 0.05 noise margin that is noise.
    loop = _loop(workdir, ScriptedProposer([Proposal("depth 1", new_source=set_constants(STUB_TRAIN, {"DEPTH": 1}))]), 1)
    loop.recover()
    loop.state.update(baseline=[3.40, 3.45], margin=0.05, best_val=3.40, best_experiment=0)  # as if measured
    loop.memory.add_outcome(Outcome(0, "keep", 3.40, "baseline", "no change"))
    assert loop.experiment()
    assert read_results(os.path.join(workdir, ws.RESULTS_FILE))[-1].status == "discard"
    assert "DEPTH = 2" in ws.read_file(workdir)


@pytest.fixture
def chat_server():
    with CannedServer() as server:
        yield server


GOOD = """DESCRIPTION: raise the learning rate
```diff
--- a/train.py
+++ b/train.py
@@ -6,3 +6,3 @@
 
-LEARNING_RATE = 0.001  # peak learning rate
+LEARNING_RATE = 0.004  # peak learning rate
 WIDTH = 64  # multiple of N_HEADS
```"""
# Its second hunk does not match the file: git apply must refuse the whole patch.
HALF_BAD = GOOD.replace(
    " WIDTH = 64  # multiple of N_HEADS\n```",
    " WIDTH = 64  # multiple of N_HEADS\n@@ -9,2 +9,2 @@\n-DEPTH = 7  # not there\n+DEPTH = 1\n BATCH_SIZE = 16\n```",
)
OTHER_FILE = GOOD.replace("a/train.py", "a/prepare.py").replace("b/train.py", "b/prepare.py")


def test_llm_patches_are_checked_before_they_are_applied(stub_workspace, chat_server):
    chat_server.replies.extend(chat_reply({"role": "assistant", "content": c}) for c in ["DESCRIPTION: no diff at all", HALF_BAD, OTHER_FILE, GOOD])
    endpoint = Endpoint(base_url=chat_server.url, model="stub", retries=0)
    assert _loop(stub_workspace, ChatProposer(endpoint), 4).run() == 0
    rows = read_results(os.path.join(stub_workspace, ws.RESULTS_FILE))[2:]
    assert [r.status for r in rows] == ["crash", "crash", "crash", "keep"]
    assert rows[0].description.startswith("rejected patch: empty patch")
    assert rows[1].description.startswith("rejected patch: error: patch failed")
    assert rows[2].description.startswith("rejected patch: the patch may only edit train.py")
    assert all(r.commit == "-" for r in rows[:3])  # nothing was committed for a rejected patch
    _clean_at_best(stub_workspace)
    assert "LEARNING_RATE = 0.004" in ws.read_file(stub_workspace)


def _run_cli(workdir, experiments, env):
    return subprocess.Popen(
        [sys.executable, "-m", "memact.research.cli", "run", workdir, "--budget", "3",
         "--experiments", str(experiments), "--baseline-runs", "2", "--seed", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def test_resume_after_kill_9_during_an_experiment(tmp_path):
    workdir = make_workspace(tmp_path / "ws", set_constants(STUB_TRAIN, {"STUB_SLEEP": 0.4}))
    marker = tmp_path / "started"
    env = dict(os.environ, STUB_MARKER=str(marker))
    proc = _run_cli(workdir, 4, env)
    deadline = time.monotonic() + 60
    # the start-up run, 2 baselines, exp 1, exp 2 started
    while not (marker.exists() and len(marker.read_text().split()) >= 5):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the loop did not reach experiment 2"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    train_pid = int(marker.read_text().split()[-1])
    time.sleep(0.3)
    assert not process_alive(train_pid)  # train.py died with its parent

    rows = read_results(os.path.join(workdir, ws.RESULTS_FILE))
    assert len(rows) == 3  # experiment 2 was in flight: not logged
    state = json.load(open(os.path.join(workdir, ws.STATE_FILE)))
    orphan = ws.head(workdir)
    assert orphan != state["best_commit"]  # HEAD is the un-logged experiment commit

    proc = _run_cli(workdir, 4, env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with open(os.path.join(workdir, ws.RESULTS_FILE)) as f:
        text = f.read()
    assert text.endswith("\n") and all(len(line.split("\t")) == 5 for line in text.splitlines())
    rows = read_results(os.path.join(workdir, ws.RESULTS_FILE))
    assert len(rows) == 2 + 4
    assert sum(r.is_baseline for r in rows) == 2  # the baseline was not run again
    state = _clean_at_best(workdir)
    assert state["experiments_done"] == 4 and len(state["context_log"]) == 5
    branch = ws.git(workdir, "log", "--format=%H").splitlines()
    assert orphan not in branch


class _DiesBeforeSavingExperiment(ResearchLoop):
    """Dies like a kill -9 between appending an experiment's row and saving the state."""

    def _save(self):
        if self.state["experiments_done"] >= 1:
            raise KeyboardInterrupt
        super()._save()


def test_resume_replays_a_row_the_state_missed(tmp_path):
    workdir = make_workspace(tmp_path / "ws")
    better = Proposal("raise lr", new_source=set_constants(STUB_TRAIN, {"LEARNING_RATE": 0.004}))
    cfg = RunConfig(budget_s=2, experiments=1, baseline_runs=2)
    with pytest.raises(KeyboardInterrupt):
        _DiesBeforeSavingExperiment(workdir, cfg, ScriptedProposer([better]), HeuristicMemory(), log=print).run()
    kept = ws.head(workdir)
    assert json.load(open(os.path.join(workdir, ws.STATE_FILE)))["rows_logged"] == 2  # the state lags one row
    loop = _loop(workdir, ScriptedProposer([better]), 1)
    loop.recover()
    assert loop.state["experiments_done"] == 1 and loop.state["rows_logged"] == 3
    assert loop.state["best_commit"] == kept == ws.head(workdir)
    assert "exp 1 keep" in loop.memory.context_text(loop.best_block())


def test_budget_must_match_on_resume(stub_workspace):
    assert _loop(stub_workspace, ScriptedProposer([Proposal("x", new_source=STUB_TRAIN + "# x\n")]), 1).run() == 0
    with pytest.raises(RuntimeError, match="was run with --budget 2"):
        _loop(stub_workspace, ScriptedProposer([]), 2, budget=5.0).recover()
