"""The runner: summary parsing, crashes, and the hard kill at 2x the budget."""

import os
import signal
import time

import pytest
from research_helpers import process_alive

from memact.research.runner import parse_summary, run_training


def _script(tmp_path, text: str) -> str:
    (tmp_path / "train.py").write_text(text)
    return str(tmp_path)


def test_parse_summary_reads_the_last_block():
    log = "step 1\n---\nval_bpb: 9.0\n---\nval_bpb: 2.345678\ntraining_seconds: 10.1\nnot a key value\n"
    assert parse_summary(log) == {"val_bpb": "2.345678", "training_seconds": "10.1"}
    assert parse_summary("no summary here") == {}


def test_ok_run_output_goes_to_the_log_only(tmp_path, capfd):
    d = _script(tmp_path, 'import os\nprint("noise")\nprint("---")\nprint("val_bpb: 2.5")\n'
                          'print("peak_memory_mb: 512")\nprint("budget", os.environ["MEMACT_BUDGET_S"])\n')
    result = run_training(d, 2, str(tmp_path / "logs" / "run.log"))
    assert result.status == "ok" and result.val_bpb == 2.5 and result.memory_gb == 0.5
    assert "budget 2" in (tmp_path / "logs" / "run.log").read_text()
    assert capfd.readouterr().out == ""  # nothing reaches the caller's stdout


def test_syntax_error_is_a_crash(tmp_path):
    d = _script(tmp_path, "def broken(:\n")
    result = run_training(d, 2, str(tmp_path / "run.log"))
    assert result.status == "crash" and result.val_bpb is None
    assert "exit code 1" in result.error and "SyntaxError" in result.error


def test_missing_or_nan_val_bpb_is_a_crash(tmp_path):
    d = _script(tmp_path, 'print("---")\nprint("val_bpb: nan")\n')
    result = run_training(d, 2, str(tmp_path / "run.log"))
    assert result.status == "crash" and "no finite val_bpb" in result.error


def test_timeout_kills_the_whole_process_group(tmp_path):
    # The script starts a grandchild that would outlive it, then hangs past 2x the budget.
    d = _script(tmp_path, (
        "import subprocess, time\n"
        "p = subprocess.Popen(['sleep', '60'])\n"
        "open('child.pid', 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    ))
    start = time.monotonic()
    result = run_training(d, 0.5, str(tmp_path / "run.log"))
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and "killed after 1 s" in result.error
    assert 0.9 < elapsed < 5
    child = int((tmp_path / "child.pid").read_text())
    time.sleep(0.2)
    assert not process_alive(child), "the grandchild survived the kill"


ESCAPES = {
    # A child in a new session (its own process group): a group kill misses it.
    "setsid": "p = subprocess.Popen(['setsid', 'sleep', '300'])\npid = p.pid\n",
    # A double fork into a new session: the grandchild's parent is gone, it is nobody's child.
    "double fork": (
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.write(w, str(os.getpid()).encode()); time.sleep(300)\n"
        "    os._exit(0)\n"
        "os.close(w); pid = int(os.read(r, 32)); os.wait()\n"
    ),
    # A child that moves to its own process group but stays in the session.
    "setpgid": "p = subprocess.Popen(['sleep', '300'], process_group=0) if sys.version_info >= (3, 11) "
               "else subprocess.Popen(['setsid', 'sleep', '300'])\npid = p.pid\n",
}


def _escaping_script(escape: str, then: str) -> str:
    return (
        "import os, subprocess, sys, time\n" + ESCAPES[escape]
        + "open('child.pid', 'w').write(str(pid))\n" + then
    )


@pytest.mark.parametrize("escape", list(ESCAPES))
@pytest.mark.parametrize("ending", ["ok", "crash", "timeout"])
def test_nothing_train_py_starts_outlives_the_run(tmp_path, escape, ending):
    """A process that train.py starts with setsid (or a double fork, or in its own group) is
    killed when the run ends, however it ends."""
    then = {"ok": "print('---'); print('val_bpb: 2.5')\n", "crash": "sys.exit(3)\n", "timeout": "time.sleep(60)\n"}
    d = _script(tmp_path, _escaping_script(escape, then[ending]))
    result = run_training(d, 1.0, str(tmp_path / "run.log"))
    assert result.status == ending, result
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 2
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = process_alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)  # do not leave it behind for the next test
    assert not alive, f"the {escape} child {child} outlived the run"


@pytest.mark.parametrize("value", ["-5.0", "0", "-0.0"])
def test_a_non_positive_val_bpb_is_a_crash(tmp_path, value):
    d = _script(tmp_path, f'print("---")\nprint("val_bpb: {value}")\n')
    result = run_training(d, 2, str(tmp_path / "run.log"))
    assert result.status == "crash" and result.val_bpb is None
    assert f"val_bpb {value} is not a positive number of bits per byte" in result.error


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), 0, -1])
def test_run_training_refuses_a_bad_budget(tmp_path, budget):
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        run_training(str(tmp_path), budget, str(tmp_path / "run.log"))
