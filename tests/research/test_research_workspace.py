"""`memact research init`, the templates, and the CLI wiring."""

import importlib.util
import os
import subprocess
import sys

import pytest

from memact.cli import main
from memact.research import workspace as ws
from memact.research.runner import parse_summary


@pytest.mark.parametrize("template", ["cpu", "gpu"])
def test_init_creates_the_three_files_and_a_clean_repo(tmp_path, template, capsys):
    workdir = str(tmp_path / f"ws_{template}")
    assert main(["research", "init", workdir, "--template", template]) == 0
    assert sorted(os.listdir(workdir)) == [".git", ".gitignore", "prepare.py", "program.md", "train.py"]
    assert not ws.is_dirty(workdir)
    assert ws.git(workdir, "rev-list", "--count", "HEAD") == "1"
    assert ws.git(workdir, "config", "user.email")  # a local identity, so commits work anywhere
    for name in ("prepare.py", "train.py"):
        compile(ws.read_file(workdir, name), name, "exec")
    # Files the loop writes are ignored: they never make the tree dirty.
    for name in (ws.RESULTS_FILE, ws.STATE_FILE, ws.CONTEXT_FILE, ws.PROGRESS_PLOT, "logs/exp_001.log"):
        os.makedirs(os.path.dirname(os.path.join(workdir, name)), exist_ok=True)
        open(os.path.join(workdir, name), "w").close()
    assert not ws.is_dirty(workdir)


def test_init_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "x").write_text("mine")
    assert main(["research", "init", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_research_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["research", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("init", "run", "plot"))


def test_run_without_a_served_policy_says_how_to_serve_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MEMACT_POLICY_URL", raising=False)
    workdir = str(tmp_path / "ws")
    ws.init_workspace(workdir)
    code = main(["research", "run", workdir, "--budget", "1", "--experiments", "1", "--memory", "policy:runs/p"])
    assert code == 2
    assert "memact serve runs/p" in capsys.readouterr().err


def test_cpu_template_trains_and_prints_a_parsable_summary(tmp_path):
    workdir = str(tmp_path / "ws")
    ws.init_workspace(workdir, "cpu")
    # Run directly rather than through run_training: its 2x kill of a 1 s budget would
    # fire during torch's import on a busy test machine.
    proc = subprocess.run([sys.executable, "train.py"], cwd=workdir, env=dict(os.environ, MEMACT_BUDGET_S="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = parse_summary(proc.stdout)
    assert 0 < float(summary["val_bpb"]) < 8.5  # one second of training: barely started, but finite
    assert {"training_seconds", "num_params", "num_steps", "peak_memory_mb"} <= summary.keys()


def test_gpu_template_code_path_runs_tiny_on_cpu(tmp_path, monkeypatch):
    """The GPU model, optimizer step and metric on a tiny config (no GPU here: the CPU fallback)."""
    import torch

    monkeypatch.syspath_prepend(ws.template_dir("gpu"))
    monkeypatch.delitem(sys.modules, "prepare", raising=False)
    spec = importlib.util.spec_from_file_location("gpu_train", os.path.join(ws.template_dir("gpu"), "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # defines classes; main() is not run
    prepare = sys.modules["prepare"]
    model = train.GPT(width=32, depth=2, n_heads=2, context=prepare.EVAL_SEQ_LEN)
    x = torch.randint(0, 256, (2, 64))
    loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), x.reshape(-1))
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=train.LEARNING_RATE).step()
    bpb = prepare.evaluate_bpb(model, torch.randint(0, 256, (2 * prepare.EVAL_SEQ_LEN + 1,), dtype=torch.uint8))
    assert 7.0 < bpb < 9.0  # an untrained byte model: about log2(256) = 8 bits
    assert train.WIDTH % train.N_HEADS == 0 and train.BUDGET_S == 300.0
