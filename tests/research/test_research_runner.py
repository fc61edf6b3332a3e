"""The runner: summary parsing, crashes, and the hard kill at 2x the budget."""

import time

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
