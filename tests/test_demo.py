"""`memact demo --preset smoke`: the whole pipeline runs and its report holds every section."""

import argparse


def test_demo_smoke_writes_the_report(tmp_path):
    from memact.demo import run

    out = tmp_path / "demo"
    assert run(argparse.Namespace(out=str(out), preset="smoke", seed=0, fresh=False)) == 0
    report = (out / "REPORT.md").read_text()
    for text in ("## What was learned", "| NoMemory-RL | NoMemory-SFT |", "| NoMemory-SFT | untrained (warm-up) |",
                 "| NoMemory-RL (T=1) | NoMemory-SFT (T=1) | 1 |", "| NoMemory-RL, shuffled control | NoMemory-SFT |",
                 "DCPO: sampled reward over all rollouts per step", "Shuffled control: sampled reward",
                 "scripted expert [memact]", "training_curves.png"):
        assert text in report, text
    assert (out / "training_curves.png").stat().st_size > 0
    assert not (out / "eval_fixed").exists() and not (out / "eval_sampled").exists()  # merged into eval/
    assert (out / "dcpo_shuffled" / "metrics.jsonl").exists()
    assert {"policy", "k", "task_id"} <= set(__import__("json").loads(
        (out / "eval" / "episodes.jsonl").read_text().splitlines()[0]))
