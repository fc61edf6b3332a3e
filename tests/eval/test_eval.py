"""Evaluation: EM/F1, the HotpotQA loader, the table and plot writer, and `memact eval`."""

import json

import pytest
from data_helpers import hotpot_rows

from memact.agent.rollout import rollout
from memact.cli import main
from memact.env.sources import parse_source
from memact.env.task import exact_match, token_f1
from memact.eval.report import markdown_table, write_report


def test_exact_match_and_f1_hand_computed():
    assert exact_match("The Eiffel Tower!", "eiffel tower")
    assert not exact_match("Eiffel", "eiffel tower")
    # pred "eiffel tower paris" vs gold "eiffel tower": overlap 2, P=2/3, R=1 -> F1 = 0.8
    assert token_f1("Eiffel Tower, Paris", "the Eiffel Tower") == pytest.approx(0.8)
    # pred "new york city" vs gold "york": P=1/3, R=1 -> 0.5
    assert token_f1("New York City", "York") == pytest.approx(0.5)
    assert token_f1("yes", "no") == 0.0
    assert token_f1("", "") == 1.0


def test_scripted_expert_end_to_end_on_hotpotqa(tmp_path):
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(hotpot_rows(8)))
    tasks = parse_source(f"hotpotqa:{path}").tasks(4, 3, seed=0)
    from memact.env.memory import Budget

    trajs = rollout("scripted", 3, 4, tasks=tasks, budget=Budget(4000, 40), progress=False)
    assert all(t.reward == 1.0 for t in trajs), [t.reward for t in trajs]
    assert all(t.metrics["memory_actions"] >= 1 for t in trajs)


def test_table_and_plots(tmp_path):
    summary = [
        {"policy": "a", "strategy": "memact", "k": 2, "n": 4, "accuracy": 1.0, "f1": 1.0, "all_correct": 1.0,
         "mean_context": 500.0, "peak_context": 700.0, "total_tokens": 3000.0, "memory_actions": 2.0, "steps": 5.0,
         "overflow": 0.0},
        {"policy": "a", "strategy": "memact", "k": 4, "n": 4, "accuracy": 0.5, "f1": 0.6, "all_correct": 0.25,
         "mean_context": 600.0, "peak_context": 900.0, "total_tokens": 5000.0, "memory_actions": 3.0, "steps": 8.0,
         "overflow": 0.0},
    ]
    table = markdown_table(summary)
    assert "| a [memact] | 1.000 | 0.500 | 0.750 | 4000 | 550 | 800 | 2.5 |" in table
    path = write_report(summary, tmp_path)
    assert path.read_text().startswith("# Evaluation")
    for png in ("accuracy_vs_k.png", "accuracy_vs_cost.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_eval_cli(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--policy", "scripted", "--strategy", "memact,full", "--objectives", "2,4", "--n", "3",
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["strategy"], r["k"]) for r in summary] == [("memact", 2), ("memact", 4), ("full", 2), ("full", 4)]
    assert summary[0]["accuracy"] == 1.0
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 12
    assert (out / "REPORT.md").exists() and (out / "accuracy_vs_k.png").exists()
    with pytest.raises(ValueError, match="unknown strategy"):
        main(["eval", "--policy", "scripted", "--strategy", "bogus", "--out", str(out)])


def test_llm_judge_counts_equivalent_answers():
    from memact.env.task import make_task
    from memact.eval.evaluate import episode_row
    from memact.eval.judge import make_judge
    from memact.trajectory import Trajectory

    asked = []

    def fake_chat(messages):
        asked.append(messages[0]["content"])
        return "Yes" if "Predicted answer: violet-ish" in messages[0]["content"] else "no"

    judge = make_judge("openai:judge-model", chat=fake_chat)
    task = make_task(3, 2)
    gold = task.gold()
    answer = {"Q1": gold["Q1"], "Q2": "violet-ish"}
    metrics = {"total_input_tokens": 10, "total_output_tokens": 2, "steps": 1, "memory_actions": 0,
               "peak_context_tokens": 5, "mean_context_tokens": 5.0, "overflow": False}
    row = episode_row("p", "memact", task, Trajectory(task.task_id, 0.5, [], metrics, answer=answer), judge)
    assert row["accuracy"] == 0.5 and row["judge_accuracy"] == 1.0
    assert len(asked) == 1  # exact matches are not sent to the judge
    with pytest.raises(ValueError, match="openai:MODEL"):
        make_judge("gpt")


def test_eval_cli_on_hotpotqa_file(tmp_path):
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(hotpot_rows(40)))
    out = tmp_path / "ev"
    assert main(["eval", "--policy", "scripted", "--data", f"hotpotqa:{path}", "--objectives", "2,3", "--n", "2",
                 "--context-budget", "4000", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["k"] for r in summary] == [2, 3] and all(r["accuracy"] == 1.0 for r in summary)
    with pytest.raises(SystemExit, match="hotpotqa:PATH"):
        main(["eval", "--policy", "scripted", "--data", "squad:x", "--objectives", "2", "--n", "1",
              "--out", str(out), "--quiet"])


def test_budget_sweep_in_one_command(tmp_path):
    """Several budgets at once: a row per (system, K, budget), the sweep table and both plots; the
    agent without memory stops fitting where the one with memory still does."""
    out = tmp_path / "sweep"
    assert main(["eval", "--policy", "scripted", "--strategy", "memact,full", "--data", "long:100",
                 "--objectives", "2,4", "--n", "3", "--context-budget", "4000,1600", "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cells = {(r["strategy"], r["k"], r["context_budget"]): r for r in summary}
    assert len(cells) == len(summary) == 8
    assert all(cells[("memact", k, b)]["accuracy"] == 1.0 for k in (2, 4) for b in (1600, 4000))
    assert cells[("full", 4, 4000)]["accuracy"] == 1.0 and cells[("full", 4, 1600)]["overflow"] == 1.0
    assert cells[("full", 4, 4000)]["peak_context"] > 1600 > cells[("memact", 4, 1600)]["peak_context"]
    report = (out / "REPORT.md").read_text()
    assert "## Accuracy against the context budget" in report and "scripted [full] @ 1600" in report
    assert (out / "accuracy_vs_budget.png").stat().st_size > 0 and (out / "accuracy_vs_context.png").exists()
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert {e["context_budget"] for e in episodes} == {1600, 4000}
