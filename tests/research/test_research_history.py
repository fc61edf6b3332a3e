"""The experiment history as working memory: budgets, notes, the policy seam, persistence."""

import dataclasses
import json
import random

import pytest

from memact.env.history import SYSTEM_PROMPT
from memact.research.history import (
    ExpertMemory,
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
    assert memory.memory.records[-1].meta["deleted"] == victims
    messages, extra = endpoint.calls[0]
    assert [t["function"]["name"] for t in extra["tools"]] == ["next_experiment", "prune_context"]
    assert messages[0]["content"] == SYSTEM_PROMPT and len(messages) == 2 + 2 * 40  # head, then a call and a result each


def test_policy_reads_on_under_the_budget_and_falls_back_over_it():
    read_on = {"tool_calls": [{"function": {"name": "next_experiment", "arguments": "{}"}}]}
    memory = ResearchMemory(PROGRAM, seed=1)
    for outcome in _synthetic(3):
        memory.add_outcome(outcome)
    before = memory.memory.ids()
    assert PolicyMemory(FakeEndpoint(read_on)).act(memory, BEST, BUDGET, None) == ""
    assert memory.memory.ids() == before
    for outcome in _synthetic(40, seed=2):
        memory.add_outcome(dataclasses.replace(outcome, experiment=outcome.experiment + 3))
    action = PolicyMemory(FakeEndpoint(read_on)).act(memory, BEST, BUDGET, None)
    assert "read on" in action and "fallback expert: deleted" in action and memory.tokens(BEST) <= BUDGET
    # The fallback writes the history expert's note, the format the policy was trained on.
    (note,) = [r for r in memory.memory.records if r.kind == "memory"]
    assert note.response_text.split("note: ", 1)[1].startswith("exp ")


def test_fallback_folds_piled_up_notes_and_ends_with_the_heuristic():
    """Seen with the SmolLM2 policy: its notes piled up beside one or two records; the expert,
    which waits for 3 records, then had nothing to fold and the context outgrew the budget. The
    fallback folds every record, notes included, into one note at once; the heuristic follows
    if the context is still over budget."""
    read_on = {"tool_calls": [{"function": {"name": "next_experiment", "arguments": "{}"}}]}
    memory = ResearchMemory(PROGRAM, seed=1)
    for i, outcome in enumerate(_synthetic(12)):
        memory.add_outcome(outcome)
        if i % 3 == 2:  # a policy that folds 2 records into a long note and keeps the newest
            old = [r.record_id for r in memory.memory.records if r.kind != "memory"][:-1]
            memory.apply_prune(" ".join([f"exp {outcome.experiment} keep val_bpb=3.1 | WIDTH 16 -> 8 |"] * 6), old)
    assert sum(r.kind == "memory" for r in memory.memory.records) == 4
    budget = memory.tokens(BEST) - 1
    action = PolicyMemory(FakeEndpoint(read_on)).act(memory, BEST, budget, None)
    assert "fallback expert: deleted" in action and memory.tokens(BEST) <= budget
    (note,) = memory.memory.records
    assert note.kind == "memory" and note.response_text.split("note: ", 1)[1].startswith("exp ")
    memory = ResearchMemory(PROGRAM, seed=1)
    for outcome in _synthetic(2):
        memory.add_outcome(outcome)
    action = PolicyMemory(FakeEndpoint(read_on)).act(memory, BEST, 10, None)
    assert "fallback expert: deleted 2 records" in action and "; heuristic: " in action


def test_policy_is_shown_the_history_task_it_was_trained_on(tokenizer):
    """The policy's messages, rendered by `memact serve`'s own path, are token for token the
    prompts of the history-task episode the policy was trained on, notes included."""
    from memact.agent.chat import ChatRenderer
    from memact.agent.loop import run_episodes
    from memact.agent.scripted import scripted_expert
    from memact.engines.base import SamplingParams
    from memact.engines.scripted import ScriptedEngine
    from memact.engines.serve import served_prompt
    from memact.env.history import Experiment, history_tasks
    from memact.env.memory import Budget
    from memact.models.chatml import parse_action
    from memact.research.histories import make_history
    from memact.research.history import HISTORY_TOOLS, policy_messages
    from memact.util.seeds import derive_seed

    run = make_history(3, 40)
    run["experiments"] = [Experiment(**e) for e in run["experiments"]]
    (task,) = [t for t in history_tasks([run], 8, 3, seed=0, source="test") if t.baseline_bpb is None][:1]
    engine = ScriptedEngine(scripted_expert("scripted", [task]), tokenizer)
    renderer = ChatRenderer(tokenizer)
    (traj,) = run_episodes(engine, [task], renderer, SamplingParams(max_new_tokens=512), Budget(4096, 80),
                           seed=5, progress=False)
    assert traj.metrics["memory_actions"] >= 2 and traj.error is None
    memory = ResearchMemory(PROGRAM, seed=derive_seed(5, "episode", 0), baseline=task.baseline)
    pending = list(task.experiments)
    for call in traj.calls:
        served = served_prompt(tokenizer, policy_messages(memory, len(task.experiments)), HISTORY_TOOLS)
        assert served == tokenizer.decode(call.prompt_ids, skip_special_tokens=False)
        action = parse_action(tokenizer.decode(call.output_ids, skip_special_tokens=True))
        if action.name == "prune_context":
            memory.apply_prune(action.arguments["memory"], action.arguments["delete_ids"])
        elif pending:
            e = pending.pop(0)
            memory.add_outcome(Outcome(e.experiment, e.status, e.val_bpb, e.description, e.diff))
    assert not pending and len(traj.calls) == len(task.experiments) + 1 + traj.metrics["memory_actions"]


@pytest.mark.parametrize(
    "message",
    [
        _call("note", ["nosuchid"]),  # unknown id
        _call("", []),  # empty note
        {"content": "I would rather not."},  # no call at all
    ],
)
def test_bad_policy_call_falls_back_to_the_expert(message):
    memory = ResearchMemory(PROGRAM, seed=1)
    for outcome in _synthetic(40):
        memory.add_outcome(outcome)
    action = PolicyMemory(FakeEndpoint(message)).act(memory, BEST, BUDGET, None)
    assert action.startswith("policy error") and "fallback expert: deleted" in action
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


def test_served_history_expert_curates_the_research_memory(tmp_path):
    """`memact serve scripted --data history:FILE` as the research memory: every prune goes through
    the server and the history expert's call; it never falls back and keeps the context small.
    The in-process `expert` memory makes the same context after every experiment."""
    import threading

    from memact.agent.cli_serve import load_backend
    from memact.engines.serve import make_server
    from memact.research.endpoint import Endpoint
    from memact.research.histories import write_histories

    path = tmp_path / "h.jsonl"
    (run,) = write_histories(path, runs=1, experiments=30, seed=4)
    backend = load_backend("scripted", data=f"history:{path}")
    server = make_server(backend, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = Endpoint(f"http://127.0.0.1:{server.server_address[1]}/v1", "scripted")
        policy, expert = PolicyMemory(endpoint, experiments=30), ExpertMemory(experiments=30)
        memory = ResearchMemory(PROGRAM, seed=1, baseline=run["baseline"])
        twin = ResearchMemory(PROGRAM, seed=1, baseline=run["baseline"])
        actions = []
        for e in run["experiments"]:
            for m in (memory, twin):
                m.add_outcome(Outcome(e["experiment"], e["status"], e["val_bpb"], e["description"], e["diff"]))
            actions.append(policy.act(memory, BEST, BUDGET, None))
            expert.act(twin, BEST, BUDGET, None)
            assert twin.context_text(BEST) == memory.context_text(BEST)
    finally:
        server.shutdown()
        server.server_close()
        backend.close()
    pruned = [a for a in actions if a.startswith("policy: deleted")]
    assert len(pruned) >= 9 and not [a for a in actions if "error" in a or "fallback" in a]
    assert memory.tokens(BEST) < BUDGET and sum(r.kind == "tool" for r in memory.memory.records) <= 3
    assert "note: exp " in memory.context_text(BEST)  # the expert's note copies compact experiment lines
