"""benchmarks/behaviour.py: the behaviour read from trajectories, on scripted ones and tampered ones."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def scripted_k3():
    from memact.agent.rollout import rollout
    from memact.trajectory import to_json

    return [json.loads(json.dumps(to_json(t))) for t in rollout("scripted", 3, 3, seed=4, progress=False)]


def test_scripted_episodes_have_no_failures_and_notes_hold_every_answer(behaviour, scripted_k3, tokenizer):
    for traj in scripted_k3:
        r = behaviour.analyse(traj, tokenizer)
        assert r["reward"] == 1.0 and r["correct"] == 3 and r["labels"] == []
        assert r["prunes"] >= 1 and all(n >= 1 for n in r["ids"])
        assert r["note_found"] >= 2 and r["note_held"] == r["note_found"]  # the script answers after its last search


def test_tampered_turns_get_their_labels_in_order(behaviour, scripted_k3, tokenizer):
    from memact.models.chatml import call_text

    traj = json.loads(json.dumps(scripted_k3[0]))
    task = behaviour.task_of(traj["task_id"])
    q1 = task.questions[0]
    prunes = [i for i, c in enumerate(traj["calls"]) if "prune_context" in tokenizer.decode(c["output_ids"])]
    first = traj["calls"][0]
    first["output_ids"] = tokenizer.encode(call_text("search", {"query": f"{q1.attribute} of Nobody", "topk": 4}))
    traj["calls"][prunes[0]]["output_ids"] = tokenizer.encode(
        call_text("prune_context", {"memory": "Q1: notthevalue", "delete_ids": ["zzzzzzzz"]}))
    traj["reward"] = 0.0
    r = behaviour.analyse(traj, tokenizer)
    assert r["labels"][:3] == ["wrong query", "bad prune", "wrong note"]
    assert "never searched" in r["labels"]  # the tampered first search was Q1's only one
    assert r["query_errors"] == ["entity"]  # Q1's attribute, another entity
    text = behaviour.report([(traj, r)], tokenizer, examples=1)
    assert "| 3 | 1 | 0.000 |" in text and "**wrong query**" in text


def test_non_synthetic_tasks_and_eval_rows_are_refused(behaviour, tmp_path, scripted_k3):
    with pytest.raises(SystemExit, match="synthetic"):
        behaviour.task_of("hotpot-123")
    episodes = tmp_path / "episodes.jsonl"
    episodes.write_text(json.dumps({k: v for k, v in scripted_k3[0].items() if k != "calls"}) + "\n")
    with pytest.raises(SystemExit, match="calls"):
        behaviour.main(["--tokenizer", str(tmp_path / "nonexistent"), str(episodes)])


def test_plan_notes_are_checked(behaviour, tokenizer):
    from memact.agent.rollout import rollout
    from memact.models.chatml import call_text
    from memact.trajectory import to_json

    trajs = [json.loads(json.dumps(to_json(t))) for t in rollout("scripted-plan", 4, 2, seed=5, progress=False)]
    for traj in trajs:
        r = behaviour.analyse(traj, tokenizer)
        assert r["labels"] == [] and r["note_held"] == r["note_found"] >= 3
    traj = trajs[0]
    task = behaviour.task_of(traj["task_id"])
    q = task.questions
    assert behaviour.plan_ok(f"Q1: x; todo: Q2 {q[1].query}; Q3 {q[2].query}; Q4 {q[3].query}", task)
    assert behaviour.plan_ok(f"Q1: x; todo: Q3 {q[2].query}; Q2 {q[1].query}; Q4 {q[3].query}", task) is False
    assert behaviour.plan_ok("Q1: x; Q2: y", task) is None
    first = next(i for i, c in enumerate(traj["calls"]) if "prune_context" in tokenizer.decode(c["output_ids"]))
    note = f"Q1: {q[0].answer}; todo: Q2 {q[1].query}; Q4 {q[3].query}"  # Q3 dropped from the plan
    ids = behaviour.turns(traj, tokenizer)[first][1]["delete_ids"]
    traj["calls"][first]["output_ids"] = tokenizer.encode(call_text("prune_context", {"memory": note, "delete_ids": ids}))
    traj["reward"] = 0.5
    assert behaviour.analyse(traj, tokenizer)["labels"][0] == "wrong plan"
