"""Issue 21: what a hostile or careless user broke in the research loop, reproduced.

Each test drives the real loop (or the runner, or the command line) on a stub train.py:
hundreds of experiments past the old 512-id pool with kills between the results row and
the state, proposals that delete or mangle train.py, a negative val_bpb, bad budgets,
malformed proposer replies, and the resume message.
"""

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
    Cut,
    ScriptedProposer,
    chat_reply,
    make_workspace,
    process_alive,
)

from memact.research import loop as loop_module
from memact.research import workspace as ws
from memact.research.endpoint import Endpoint
from memact.research.history import HeuristicMemory
from memact.research.loop import ResearchLoop, RunConfig
from memact.research.proposers import ChatProposer, Proposal, set_constants
from memact.research.results import read_results

# A train.py that costs one interpreter start: VALUE is its val_bpb, EXIT a crash.
FAST_TRAIN = '''\
"""Fast stand-in for train.py: no torch, prints VALUE as its val_bpb."""
import os
import sys

VALUE = 3.5  # the val_bpb this run reports
EXIT = 0  # non-zero: the run crashes with this exit code
assert float(os.environ["MEMACT_BUDGET_S"]) > 0
if EXIT:
    sys.exit(EXIT)
print("---")
print(f"val_bpb: {VALUE}")
'''


def _loop(workdir, proposer, experiments, budget=2.0, log=None, **config):
    config.setdefault("baseline_runs", 2)
    cfg = RunConfig(budget_s=budget, experiments=experiments, **config)
    return ResearchLoop(workdir, cfg, proposer, HeuristicMemory(), log=log or (lambda msg: None))


def _state(workdir):
    with open(os.path.join(workdir, ws.STATE_FILE)) as f:
        return json.load(f)


def _clean_at_best(workdir):
    state = _state(workdir)
    assert ws.head(workdir) == state["best_commit"]
    assert not ws.is_dirty(workdir), ws.git(workdir, "status", "--porcelain")
    return state


# ---- item 2: the id pool, and a kill between the results row and the state ----------------


class LongRunProposer:
    """Experiment k: a crash every 7th, a new best every 40th, otherwise a discarded change."""

    def propose(self, context_text, best_source, experiment):
        if experiment % 7 == 0:
            values, kind = {"EXIT": 1}, "crash"
        elif experiment % 40 == 0:
            values, kind = {"VALUE": round(3.5 - 0.001 * experiment, 6)}, "better"
        else:
            values, kind = {"VALUE": 3.6}, "worse"
        source = set_constants(FAST_TRAIN, values) + f"# experiment {experiment}\n"
        return Proposal(f"exp {experiment} {kind}", new_source=source)


class SimulatedKill(BaseException):
    """Stands in for a kill -9 at a chosen point (a BaseException: nothing in the loop catches it)."""


def _kill_around_rows(monkeypatch, after: set[int], before: set[int]):
    """Make the loop 'die' right after appending the row of an experiment in ``after`` (the
    state not yet written), or right before appending the row of one in ``before``."""
    real = loop_module.append_result
    fired = set()

    def append(path, row):
        exp = int(row.description.split()[1]) if row.description.startswith("exp ") else None
        if exp in before and ("before", exp) not in fired:
            fired.add(("before", exp))
            raise SimulatedKill(f"before the row of exp {exp}")
        real(path, row)
        if exp in after and ("after", exp) not in fired:
            fired.add(("after", exp))
            raise SimulatedKill(f"after the row of exp {exp}")

    monkeypatch.setattr(loop_module, "append_result", append)
    return fired


@pytest.mark.slow
def test_600_experiments_with_kills_between_results_and_state(tmp_path, monkeypatch, capsys):
    """Past 600 experiments (over 1,000 record ids: the memory folds at every one) through the
    real loop, with three kills after a results row and before the state, and one before a row."""
    workdir = make_workspace(tmp_path / "ws", FAST_TRAIN)
    total = 620
    kills_after, kills_before = {150, 400, 555}, {300}
    fired = _kill_around_rows(monkeypatch, kills_after, kills_before)
    start = time.monotonic()
    runs = 0
    while True:
        runs += 1
        assert runs <= 10, "the loop did not finish after the expected resumes"
        try:
            # A small context budget: the heuristic folds the history at every experiment,
            # so ids are drawn about twice as fast as experiments are run.
            code = _loop(workdir, LongRunProposer(), total, budget=5.0, context_budget=200).run()
        except SimulatedKill:
            continue
        break
    elapsed = time.monotonic() - start
    assert code == 0
    assert len(fired) == len(kills_after) + len(kills_before)
    rows = read_results(os.path.join(workdir, ws.RESULTS_FILE))
    exp_rows = [r for r in rows if not r.is_baseline]
    numbers = [int(r.description.split()[1]) for r in exp_rows]
    duplicated = len(numbers) - len(set(numbers))
    lost = len(set(range(1, total + 1)) - set(numbers))
    state = _clean_at_best(workdir)
    assert state["experiments_done"] == total and state["rows_logged"] == len(rows) == 2 + total
    assert numbers == list(range(1, total + 1)) and duplicated == lost == 0
    assert [row[0] for row in state["context_log"]] == list(range(total + 1))  # each experiment once
    assert state["memory"]["ids_drawn"] > 1000
    record_ids = [r["record_id"] for r in state["memory"]["records"]] + [state["memory"]["head_id"]]
    assert len(set(record_ids)) == len(record_ids)
    assert state["best_experiment"] == 600 and state["best_val"] == pytest.approx(2.9)
    statuses = [r.status for r in exp_rows]
    assert statuses.count("keep") == 13  # 40, 80, ... 600 but 280 and 560 (crashes) and statuses.count("crash") == total // 7
    with capsys.disabled():
        print(f"\n[600+ experiments] {total} experiments in {runs} runs (4 simulated kills), {elapsed:.1f} s, "
              f"{state['memory']['ids_drawn']} record ids drawn, rows duplicated {duplicated}, lost {lost}")


def test_kill_between_results_and_state_past_the_old_pool_resumes(tmp_path, monkeypatch):
    """A workspace whose history has drawn 510 ids (as after ~500 experiments): the next rows
    need ids past the old pool of 512, and a kill after a row must not wedge the resume."""
    workdir = make_workspace(tmp_path / "ws", FAST_TRAIN)
    assert _loop(workdir, LongRunProposer(), 0, budget=5.0).run() == 0  # baseline only
    state = _state(workdir)
    state["memory"]["ids_drawn"] = 510
    with open(os.path.join(workdir, ws.STATE_FILE), "w") as f:
        json.dump(state, f)
    _kill_around_rows(monkeypatch, after={3}, before=set())
    with pytest.raises(SimulatedKill):
        _loop(workdir, LongRunProposer(), 6, budget=5.0).run()
    assert len(read_results(os.path.join(workdir, ws.RESULTS_FILE))) == 2 + 3
    assert _state(workdir)["rows_logged"] == 2 + 2  # the state lags one row
    assert _loop(workdir, LongRunProposer(), 6, budget=5.0).run() == 0
    rows = read_results(os.path.join(workdir, ws.RESULTS_FILE))
    assert [r.description.split()[1] for r in rows[2:]] == ["1", "2", "3", "4", "5", "6"]
    state = _clean_at_best(workdir)
    assert state["experiments_done"] == 6 and state["rows_logged"] == 8 and state["memory"]["ids_drawn"] > 512


# ---- item 3: a proposal that deletes or mangles train.py -----------------------------------


def _patch_of(workdir, change, *diff_args):
    """The git diff that ``change(workdir)`` makes to the work tree; the tree is restored after."""
    change(workdir)
    ws.git(workdir, "add", "-A")
    patch = subprocess.run(["git", "diff", "--cached", *diff_args], cwd=workdir, capture_output=True,
                           text=True, check=True).stdout
    ws.git(workdir, "reset", "-q", "--hard")
    ws.git(workdir, "clean", "-qfd")
    assert patch
    return patch


def _delete(d):
    os.remove(os.path.join(d, "train.py"))


def _rename(d):
    os.rename(os.path.join(d, "train.py"), os.path.join(d, "train2.py"))


def _chmod(d):
    os.chmod(os.path.join(d, "train.py"), 0o755)


def _binary(d):
    with open(os.path.join(d, "train.py"), "wb") as f:
        f.write(b"\x00\xff\xfe binary \x00" * 20)


def _symlink(d):
    os.remove(os.path.join(d, "train.py"))
    os.symlink("prepare.py", os.path.join(d, "train.py"))


BETTER = Proposal("raise lr", new_source=set_constants(STUB_TRAIN, {"LEARNING_RATE": 0.004}))


@pytest.mark.parametrize(
    "change, diff_args",
    [(_delete, ()), (_rename, ("-M",)), (_chmod, ()), (_binary, ("--binary",)), (_symlink, ())],
    ids=["delete", "rename", "chmod", "binary", "symlink"],
)
def test_a_patch_that_deletes_or_mangles_train_py_is_a_logged_crash(stub_workspace, change, diff_args):
    patch = _patch_of(stub_workspace, change, *diff_args)
    proposer = ScriptedProposer([Proposal("mangle train.py", patch=patch), BETTER])
    assert _loop(stub_workspace, proposer, 2).run() == 0
    rows = read_results(os.path.join(stub_workspace, ws.RESULTS_FILE))[2:]
    assert [r.status for r in rows] == ["crash", "keep"], rows
    assert rows[0].description.startswith("rejected patch: ") and rows[0].commit == "-"
    _clean_at_best(stub_workspace)
    assert "LEARNING_RATE = 0.004" in ws.read_file(stub_workspace)
    assert os.stat(os.path.join(stub_workspace, "train.py")).st_mode & 0o777 == 0o644


MANGLERS = {
    "deletes itself": "os.remove(__file__)",
    "renames itself": "os.rename(__file__, 'moved.py')",
    "writes binary over itself": "open(__file__, 'wb').write(b'\\x00\\xff' * 50)",
    "chmods itself": "os.chmod(__file__, 0)",
    "edits prepare.py": "open('prepare.py', 'a').write('# moved the ruler\\n')",
}


class TreeWatcher(ScriptedProposer):
    """A scripted proposer that records, at each call, whether the work tree matched HEAD."""

    def __init__(self, workdir, proposals):
        super().__init__(proposals)
        self.workdir, self.dirty = workdir, []

    def propose(self, context_text, best_source, experiment):
        self.dirty.append(ws.git(self.workdir, "status", "--porcelain"))
        return super().propose(context_text, best_source, experiment)


@pytest.mark.parametrize("what", list(MANGLERS))
def test_a_run_that_mangles_the_workspace_is_restored(stub_workspace, what):
    """train.py that deletes, renames, overwrites or chmods itself, or edits prepare.py, while it
    runs: kept or not, the next experiment starts from the committed files."""
    source = set_constants(STUB_TRAIN, {"LEARNING_RATE": 0.004}).replace(
        'print("training log line")', f'print("training log line")\n{MANGLERS[what]}')
    proposer = TreeWatcher(stub_workspace, [Proposal(what, new_source=source),
                                            Proposal("depth 3", new_source=set_constants(source, {"DEPTH": 3}))])
    assert _loop(stub_workspace, proposer, 2).run() == 0
    rows = read_results(os.path.join(stub_workspace, ws.RESULTS_FILE))[2:]
    assert [r.status for r in rows] == ["keep", "discard"], rows
    assert proposer.dirty == ["", ""]  # each proposal saw the committed tree (the ruler unmoved)
    _clean_at_best(stub_workspace)
    assert ws.read_file(stub_workspace) == source
    assert "moved the ruler" not in ws.read_file(stub_workspace, "prepare.py")


def _run_cli(workdir, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "memact.research.cli", "run", workdir, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_resume_repairs_a_tree_without_train_py(stub_workspace):
    args = ("--budget", "2", "--baseline-runs", "2")
    assert _run_cli(stub_workspace, *args, "--experiments", "1").returncode == 0
    os.remove(os.path.join(stub_workspace, "train.py"))
    with open(os.path.join(stub_workspace, "prepare.py"), "a") as f:
        f.write("# dirty\n")
    proc = _run_cli(stub_workspace, *args, "--experiments", "2")
    assert proc.returncode == 0, proc.stderr
    assert "resetting" in proc.stdout
    state = _clean_at_best(stub_workspace)
    assert state["experiments_done"] == 2
    assert ws.read_file(stub_workspace, "prepare.py") == ws.git(stub_workspace, "show", "HEAD:prepare.py") + "\n"


# ---- item 5: metric, budgets, proposer replies --------------------------------------------


@pytest.mark.parametrize("value", ["-5.0", "0", "0.0", "-0.0", "-inf"])
def test_a_non_positive_val_bpb_is_a_crash_and_never_the_best(stub_workspace, value):
    liar = Proposal(f"report {value}", new_source=STUB_TRAIN.replace('print(f"val_bpb: {val:.6f}")',
                                                                     f'print("val_bpb: {value}")'))
    assert _loop(stub_workspace, ScriptedProposer([liar]), 1).run() == 0
    row = read_results(os.path.join(stub_workspace, ws.RESULTS_FILE))[-1]
    assert row.status == "crash" and row.val_bpb is None
    assert "val_bpb" in row.description and ("positive" in row.description or "finite" in row.description)
    state = _clean_at_best(stub_workspace)
    assert state["best_experiment"] == 0 and state["best_val"] > 0


@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "0", "-3", "1e400", "soon"])
def test_bad_budgets_are_refused_by_the_command_line(stub_workspace, budget):
    proc = _run_cli(stub_workspace, "--budget", budget, "--experiments", "1", timeout=60)
    assert proc.returncode == 2
    assert "--budget" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(stub_workspace, ws.STATE_FILE))  # nothing pinned


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_budgets_are_refused_by_the_library(stub_workspace, budget):
    with pytest.raises(ValueError, match="budget"):
        _loop(stub_workspace, ScriptedProposer([]), 1, budget=budget)


def test_a_budget_shorter_than_the_start_up_is_refused_and_not_pinned(tmp_path):
    """train.py takes 1.5 s to start: a 0.5 s budget (killed at 1 s) could never pass."""
    slow_start = STUB_TRAIN.replace("import time\n", "import time\ntime.sleep(1.5)  # start-up\n", 1)
    workdir = make_workspace(tmp_path / "ws", slow_start)
    proc = _run_cli(workdir, "--budget", "0.5", "--experiments", "1", "--baseline-runs", "2")
    assert proc.returncode != 0
    assert "start-up" in proc.stderr and "--budget" in proc.stderr and "Traceback" not in proc.stderr
    # The refused budget is not pinned: the same workspace runs with a longer one.
    proc = _run_cli(workdir, "--budget", "4", "--experiments", "1", "--baseline-runs", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(read_results(os.path.join(workdir, ws.RESULTS_FILE))) == 3


LIST_GOOD = [
    {"type": "text", "text": "DESCRIPTION: raise the learning rate\n```diff\n--- a/train.py\n+++ b/train.py\n"},
    {"type": "text", "text": "@@ -6,3 +6,3 @@\n \n-LEARNING_RATE = 0.001  # peak learning rate\n"
                             "+LEARNING_RATE = 0.004  # peak learning rate\n WIDTH = 64  # multiple of N_HEADS\n```"},
]


@pytest.fixture
def raw_server():
    with CannedServer() as server:
        yield server


def test_four_malformed_proposer_replies_are_logged_failures(stub_workspace, raw_server):
    raw_server.replies[:] = [
        chat_reply("DESCRIPTION: a message that is a string"),
        chat_reply({"role": "assistant", "content": 42}),
        chat_reply({"role": "assistant", "content": LIST_GOOD}),  # content parts, as the OpenAI API allows
        Cut(chat_reply("DESCRIPTION: cut")[:25]),
    ]
    endpoint = Endpoint(base_url=raw_server.url, model="stub", retries=0, timeout_s=10)
    assert _loop(stub_workspace, ChatProposer(endpoint), 4).run() == 0
    rows = read_results(os.path.join(stub_workspace, ws.RESULTS_FILE))[2:]
    assert [r.status for r in rows] == ["crash", "crash", "keep", "crash"], rows
    for i in (0, 1, 3):
        assert rows[i].description.startswith("proposer failed: ") and rows[i].commit == "-"
    assert rows[2].description == "raise the learning rate"
    _clean_at_best(stub_workspace)
    assert "LEARNING_RATE = 0.004" in ws.read_file(stub_workspace) and not raw_server.replies


# ---- item 7 (research): the resume message --------------------------------------------------


def test_resume_prints_the_baseline_as_baseline(stub_workspace):
    assert _loop(stub_workspace, ScriptedProposer([BETTER]), 1).run() == 0
    state = _state(stub_workspace)
    baseline = sum(state["baseline"]) / len(state["baseline"])
    assert state["best_val"] < baseline
    lines = []
    assert _loop(stub_workspace, ScriptedProposer([BETTER, BETTER]), 2, log=lines.append).run() == 0
    (line,) = [line for line in lines if line.startswith("baseline")]
    assert f"baseline {baseline:.6f}" in line, line
    assert f"best {state['best_val']:.6f}" in line, line


# ---- what a killed loop leaves behind ---------------------------------------------------------


def test_resume_after_kill_9_kills_what_train_py_left_and_a_stale_git_lock(tmp_path):
    """kill -9 of the loop while train.py runs: PDEATHSIG ends train.py, but a child it started
    with setsid lives on; the next run kills it (by the workspace marker in its environment) and
    clears the index.lock a git command killed with the loop would leave."""
    spawning = STUB_TRAIN.replace(
        'time.sleep(STUB_SLEEP)',
        'import subprocess\nif marker:\n    p = subprocess.Popen(["setsid", "sleep", "300"])\n'
        '    open(marker + ".child", "a").write(f"{p.pid}\\n")\ntime.sleep(STUB_SLEEP)')
    workdir = make_workspace(tmp_path / "ws", set_constants(spawning, {"STUB_SLEEP": 5.0}))
    marker = tmp_path / "started"
    env = dict(os.environ, STUB_MARKER=str(marker))
    args = [sys.executable, "-m", "memact.research.cli", "run", workdir, "--budget", "8", "--experiments", "1",
            "--baseline-runs", "2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    child_file = tmp_path / "started.child"
    deadline = time.monotonic() + 60
    while not (child_file.exists() and len(child_file.read_text().split()) >= 2):  # start-up run, baseline 1
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    child = int(child_file.read_text().split()[-1])
    time.sleep(0.2)
    assert process_alive(child)  # the orphan of the killed loop's train.py
    open(os.path.join(workdir, ".git", "index.lock"), "w").close()
    lines = []
    try:
        loop = _loop(workdir, ScriptedProposer([]), 0, budget=8.0, log=lines.append)
        loop.recover()
        time.sleep(0.1)
        assert not process_alive(child)
        assert any("left behind" in line for line in lines), lines
        assert not os.path.exists(os.path.join(workdir, ".git", "index.lock"))
    finally:
        for pid in map(int, child_file.read_text().split()):  # leave nothing behind, even on a failure
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
