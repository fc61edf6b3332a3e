"""Checkpoint holds: the rotation of `run.keep_checkpoints` never deletes a checkpoint being read."""

import shutil
import subprocess
import sys

from memact.util.holds import HOLD_PREFIX, hold, holders, is_checkpoint_dir, rotate


def _run_dir(tmp_path, steps=(4, 8, 12, 16)):
    root = tmp_path / "run" / "checkpoints"
    for s in steps:
        (root / f"step_{s:06d}").mkdir(parents=True)
        (root / f"step_{s:06d}" / "config.json").write_text("{}")
    return root


def test_rotate_keeps_newest_and_held(tmp_path):
    root = _run_dir(tmp_path)
    logs = []
    with hold(root / "step_000004") as markers:
        assert len(markers) == 1 and markers[0].name.startswith(HOLD_PREFIX)
        deleted = rotate(root, 2, log=logs.append)
        assert [p.name for p in deleted] == ["step_000008"]
        assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000012", "step_000016"]
        assert "keeping" in logs[0] and "step_000004" in logs[0]
    assert not list((root / "step_000004").glob(f"{HOLD_PREFIX}*"))  # the marker went with the hold
    assert [p.name for p in rotate(root, 2)] == ["step_000004"]
    assert rotate(root, 0) == [] and len(list(root.iterdir())) == 2


def test_holds_nest_and_skip_other_paths(tmp_path):
    root = _run_dir(tmp_path, steps=(1,))
    ckpt = root / "step_000001"
    other = tmp_path / "model"
    other.mkdir()
    with hold(ckpt, other, "scripted", "openai:gpt", tmp_path / "missing") as outer:
        assert len(outer) == 1 and not list(other.iterdir())  # only checkpoints/step_* are marked
        with hold(ckpt):
            assert len(list(ckpt.glob(f"{HOLD_PREFIX}*"))) == 2
        assert holders(ckpt) and is_checkpoint_dir(ckpt) and not is_checkpoint_dir(other)
    assert holders(ckpt) == []


def test_marker_of_a_dead_process_holds_nothing(tmp_path):
    root = _run_dir(tmp_path, steps=(1, 2))
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    (root / "step_000001" / f"{HOLD_PREFIX}{dead}.0").touch()
    assert holders(root / "step_000001") == []
    assert [p.name for p in rotate(root, 1)] == ["step_000001"]


def test_evaluation_holds_its_checkpoint_until_every_k_ran(tmp_path, micro_model_dir):
    from memact.eval.evaluate import EvalSpec, System, evaluate

    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    shutil.copytree(micro_model_dir, ckpt)
    seen = []

    def log(line):  # called after each K: the trainer's rotation would run here
        seen.append(holders(ckpt))
        rotate(ckpt.parent, 1, log=lambda _: None)
        (ckpt.parent / "step_000009").mkdir(exist_ok=True)

    from memact.env.memory import Budget

    spec = EvalSpec(systems=[System(str(ckpt))], objectives=[1, 2], n=1, budget=Budget(300, 2))
    summary = evaluate(spec, tmp_path / "ev", progress=False, log=log)
    assert len(summary) == 2 and all(s["failed"] == 0 for s in summary)
    assert len(seen) == 2 and all(h for h in seen) and ckpt.exists()
    assert holders(ckpt) == [] and rotate(ckpt.parent, 1) == [ckpt]
