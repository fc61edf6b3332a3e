"""Working memory and every kind of bad action: an error response, nothing else changed."""

import copy

import pytest

from memact.env.memory import IdSource, MemoryActionError, Record, WorkingMemory, make_id_pool
from memact.env.task import make_task
from memact.env.tools import AgentEnv
from memact.models.chatml import call_text, parse_action


def test_id_pool_fixed_distinct_eight_chars():
    pool = make_id_pool()
    assert pool == make_id_pool()
    assert len(set(pool)) == len(pool) == 512
    assert all(len(i) == 8 and i[0].isalpha() for i in pool)


def test_id_source_seeded_and_never_repeats():
    a, b = IdSource(3), IdSource(3)
    ids = [a() for _ in range(100)]
    assert ids == [b() for _ in range(100)]
    assert len(set(ids)) == 100
    assert ids[:5] != [IdSource(4)() for _ in range(5)]


def test_prune_removes_listed_records_only():
    m = WorkingMemory("head0000")
    for rid in ["aaaa1111", "bbbb2222", "cccc3333"]:
        m.append(Record(rid, "a", "r"))
    removed = m.prune_context("note", ["aaaa1111", "cccc3333"])
    assert [r.record_id for r in removed] == ["aaaa1111", "cccc3333"]
    assert m.ids() == ["bbbb2222"]


def _env_with_search():
    env = AgentEnv(make_task(5, 2), seed=1)
    env.step(parse_action(call_text("search", {"query": "color"})), "s")
    return env


BAD_ACTIONS = {
    "malformed json": ('<tool_call>\n{"name": "search", "arguments": {"query": }\n</tool_call>',
                       "malformed tool-call JSON"),
    "unknown tool": (call_text("browse", {"url": "x"}), "unknown tool 'browse'"),
    "missing memory": (call_text("prune_context", {"delete_ids": ["{rid}"]}), "missing required argument(s): memory"),
    "missing delete_ids": (call_text("prune_context", {"memory": "n"}), "missing required argument(s): delete_ids"),
    "empty ids": (call_text("prune_context", {"memory": "n", "delete_ids": []}), "delete_ids is empty"),
    "unknown ids": (call_text("prune_context", {"memory": "n", "delete_ids": ["zzzzzzzz"]}),
                    "unknown record ids: zzzzzzzz"),
    "delete head": (call_text("prune_context", {"memory": "n", "delete_ids": ["{head}"]}), "it is the task head"),
    "ids not a list": (call_text("prune_context", {"memory": "n", "delete_ids": "{rid}"}), "must be a list"),
    "duplicate ids": (call_text("prune_context", {"memory": "n", "delete_ids": ["{rid}", "{rid}"]}),
                      "duplicate ids"),
    "empty memory": (call_text("prune_context", {"memory": " ", "delete_ids": ["{rid}"]}), "non-empty string"),
    "two calls": (call_text("search", {"query": "a"}) + call_text("search", {"query": "b"}), "one tool call per turn"),
    "no action": ("I think the answer is owl.", "no tool call and no FINAL_ANSWER"),
    "unterminated": ('<tool_call>\n{"name": "search"', "unterminated tool call"),
    "search without query": (call_text("search", {"topk": 2}), "non-empty string argument 'query'"),
    "bad topk": (call_text("search", {"query": "a", "topk": 99}), "topk must be an integer from 1 to 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_ACTIONS))
def test_bad_action_gives_error_and_changes_nothing_else(case):
    env = _env_with_search()
    rid = env.memory.ids()[0]
    text, expected = BAD_ACTIONS[case]
    text = text.replace("{rid}", rid).replace("{head}", env.memory.head_id)
    before = copy.deepcopy(env.memory.records)
    result = env.step(parse_action(text), text)
    assert result.kind == "error" and not result.done
    assert expected in result.response_text, result.response_text
    assert result.response_text.startswith(f"[id: {result.record_id}]\nError: ")
    # The only change: the error record appended at the end.
    assert env.memory.records[:-1] == before
    assert env.memory.records[-1].record_id == result.record_id
    assert env.memory_actions == 0


def test_valid_prune_appends_memory_record_with_new_id():
    env = _env_with_search()
    rid = env.memory.ids()[0]
    text = call_text("prune_context", {"memory": "Q1: teal", "delete_ids": [rid]})
    result = env.step(parse_action(text), text)
    assert result.kind == "memory" and result.deleted == [rid]
    assert env.memory.ids() == [result.record_id] and result.record_id != rid
    assert "Deleted 1 record(s)" in result.response_text
    # A later memory action can delete the earlier note.
    text2 = call_text("prune_context", {"memory": "Q1: teal; Q2: owl", "delete_ids": [result.record_id]})
    assert env.step(parse_action(text2), text2).kind == "memory"


def test_memory_tool_absent_in_no_memory_env():
    env = AgentEnv(make_task(5, 2), seed=1, memory_tool=False)
    text = call_text("prune_context", {"memory": "n", "delete_ids": ["x"]})
    result = env.step(parse_action(text), text)
    assert result.kind == "error" and "unknown tool 'prune_context'" in result.response_text


def test_check_delete_raises_memory_action_error():
    m = WorkingMemory("head0000")
    with pytest.raises(MemoryActionError, match="empty"):
        m.check_delete([])


def _pool_order(seed):
    """The order in which IdSource(seed) hands out the 512 pool ids (the shuffled pool)."""
    import random

    pool = make_id_pool()
    random.Random(seed).shuffle(pool)
    return pool


def test_id_source_never_runs_dry_and_keeps_the_first_512_ids():
    a, b = IdSource(7), IdSource(7)
    ids = [a() for _ in range(5000)]
    assert ids == [b() for _ in range(5000)]  # seeded: replays exactly
    assert len(set(ids)) == len(ids)  # never repeats, past the pool too
    assert ids[:512] == _pool_order(7)  # the first ids (those in every seeded trajectory) are unchanged
    assert all(i[0].isalpha() and i.isalnum() and i.islower() for i in ids)
    assert not set(ids[512:]) & set(make_id_pool())


def test_env_step_never_raises_past_the_id_pool():
    env = AgentEnv(make_task(5, 2), seed=1)
    ids = [env.memory.head_id]
    for i in range(700):
        result = env.step(parse_action(f"not a tool call {i}"), "x")
        assert result.kind == "error" and result.record_id
        ids.append(result.record_id)
    assert len(set(ids)) == len(ids)
