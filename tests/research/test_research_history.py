"""The experiment history as working memory: budgets, notes, the policy seam, persistence."""

import dataclasses
import json
import random

import pytest

from memact.research.history import (
    HeuristicMemory,
    NoMemory,
    Outcome,
    PolicyMemory,
    ResearchMemory,
    count_tokens,
    diff_summary,
    make_memory_policy,
)
from memact.research.workspace import read_file, template_dir

PROGRAM = read_file(template_dir("cpu"), "program.md")
BEST = "val_bpb 3.3000 at commit abc1234 (exp 7: DEPTH 2 -> 1).\nBaseline 3.5 over 3 runs; noise margin 0.02."
BUDGET = 900


def _synthetic(n: int, seed: int = 0):
    rng = random.Random(seed)
    names = ["LEARNING_RATE", "WIDTH", "DEPTH", "BATCH_SIZE", "WARMUP_STEPS"]
    for i in range(1, n + 1):
        status = rng.choice(["keep", "discard", "discard", "discard", "crash"])
        name = rng.choice(names)
        yield Outcome(i, status, None if status == "crash" else 3.5 - i * 0.01, f"{name} 16 -> 8", f"constants {name}")


def _run(policy, n=50):
    memory = ResearchMemory(PROGRAM, seed=1)
    lengths, best = [], None
    for outcome in _synthetic(n):
        memory.add_outcome(outcome)
        if outcome.status == "keep":
            best = outcome.experiment
        policy.act(memory, BEST, BUDGET, best)
        lengths.append((memory.tokens(BEST), memory.unpruned_tokens(BEST)))
    return memory, lengths


def test_heuristic_keeps_context_under_budget_for_50_experiments():
    memory, lengths = _run(HeuristicMemory())
    assert max(tokens for tokens, _ in lengths) <= BUDGET
    assert lengths[-1][1] > BUDGET  # the shadow (unpruned) count did pass the budget
    notes = [r for r in memory.memory.records if r.kind == "memory"]
    assert len(notes) == 1  # older notes were folded into the newest one
    assert "50 runs" not in notes[0].response_text  # the last records stay unfolded
    assert notes[0].meta["runs"] + sum(r.kind == "tool" for r in memory.memory.records) == 50


def test_none_exceeds_the_budget():
    _, lengths = _run(NoMemory())
    assert lengths[-1][0] > BUDGET
    assert all(tokens == shadow for tokens, shadow in lengths)


def test_heuristic_keeps_the_best_and_the_last_records():
    memory = ResearchMemory(PROGRAM, seed=1)
    for outcome in _synthetic(30):
        memory.add_outcome(outcome)
    HeuristicMemory(keep_last=4).prune(memory, best_experiment=3)
    tools = [r.meta["experiment"] for r in memory.memory.records if r.kind == "tool"]
    assert tools == [3, 27, 28, 29, 30]


def test_note_ids_are_new_and_notes_fold_into_notes():
    memory = ResearchMemory(PROGRAM, seed=1)
    ids = set()
    for outcome in _synthetic(12):
        ids.add(memory.add_outcome(outcome).record_id)
    HeuristicMemory(keep_last=2).prune(memory, None)
    (first_note,) = [r for r in memory.memory.records if r.kind == "memory"]  # appended last, as in MemAct
    assert first_note.kind == "memory" and first_note.record_id not in ids
    for outcome in _synthetic(8, seed=1):
        memory.add_outcome(dataclasses.replace(outcome, experiment=outcome.experiment + 12))
    HeuristicMemory(keep_last=2).prune(memory, None)
    notes = [r for r in memory.memory.records if r.kind == "memory"]
    assert len(notes) == 1 and notes[0].record_id != first_note.record_id
    assert notes[0].meta["runs"] == 18 and notes[0].meta["first"] == 1 and notes[0].meta["last"] == 18


class FakeEndpoint:
    def __init__(self, message):
        self.message = message
        self.calls = []

    def chat(self, messages, **extra):
        self.calls.append((messages, extra))
        return self.message


def _call(memory_note, delete_ids):
    args = json.dumps({"memory": memory_note, "delete_ids": delete_ids})
    return {"tool_calls": [{"function": {"name": "prune_context", "arguments": args}}]}


def test_policy_call_is_applied_through_prune_context():
    memory = ResearchMemory(PROGRAM, seed=1)
    for outcome in _synthetic(40):
        memory.add_outcome(outcome)
    victims = memory.memory.ids()[:30]
    endpoint = FakeEndpoint(_call("lr helps; depth 1 best", victims))
    action = PolicyMemory(endpoint).act(memory, BEST, BUDGET, None)
    assert action.startswith("policy: deleted 30")
    assert memory.memory.records[-1].response_text.endswith("note: lr helps; depth 1 best")
    assert endpoint.calls[0][1]["tools"][0]["function"]["name"] == "prune_context"


@pytest.mark.parametrize(
    "message",
    [
        _call("note", ["nosuchid"]),  # unknown id
        _call("", []),  # empty note
        {"content": "I would rather not."},  # no call at all
    ],
)
def test_bad_policy_call_falls_back_to_the_heuristic(message):
    memory = ResearchMemory(PROGRAM, seed=1)
    for outcome in _synthetic(40):
        memory.add_outcome(outcome)
    action = PolicyMemory(FakeEndpoint(message)).act(memory, BEST, BUDGET, None)
    assert action.startswith("policy error") and "fallback heuristic: folded" in action
    assert memory.tokens(BEST) <= BUDGET


def test_memory_survives_a_round_trip_through_the_state_file():
    memory, _ = _run(HeuristicMemory(), n=30)
    again = ResearchMemory.from_dict(PROGRAM, json.loads(json.dumps(memory.to_dict())))
    assert again.context_text(BEST) == memory.context_text(BEST)
    assert again.unpruned_tokens(BEST) == memory.unpruned_tokens(BEST)
    fresh_a, fresh_b = memory.add_note("x", {}), again.add_note("x", {})
    assert fresh_a.record_id == fresh_b.record_id  # the id source resumes where it was


def test_token_proxy_and_diff_summary():
    assert count_tokens("val_bpb=3.25, kept!") == 8  # val_bpb = 3 . 25 , kept !
    old = "A = 1  # a\nB = 2\nprint(A)\n"
    assert diff_summary(old, old.replace("A = 1", "A = 3")) == "constants A"
    assert diff_summary(old, old + "print(B)\n") == "+1/-0 lines"


def test_make_memory_policy_names_bad_specs():
    with pytest.raises(ValueError, match="unknown memory 'smart'"):
        make_memory_policy("smart")
