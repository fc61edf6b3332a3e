"""DCPO segmentation invariants over random sequences of valid and invalid actions.

For every call: the segment's prompt plus its response tokens before that call equal,
id for id, the prompt the engine saw. The loss-mask tokens of all segments are exactly
the generated tokens, each once, in order. A new segment starts exactly at each context
edit (a successful prune_context), and nowhere else.
"""

import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memact.agent.chat import ChatRenderer
from memact.agent.loop import run_episodes
from memact.agent.scripted import parse_prompt
from memact.engines.base import SamplingParams
from memact.engines.scripted import ScriptedEngine
from memact.env.memory import Budget
from memact.env.task import make_task
from memact.models.chatml import call_text
from memact.trajectory import (
    Call,
    Trajectory,
    TrajectoryFormatError,
    check_invariants,
    read_jsonl,
    segment_trajectory,
    to_json,
    trajectory_columns,
    trajectory_stats,
    write_jsonl,
)

KINDS = ["search", "prune", "prune", "prune_unknown", "prune_empty", "prune_head", "malformed", "unknown_tool",
         "missing_args", "chatter", "long"]


class RandomActor:
    """Plays a fixed script of action kinds, reading live record ids from the prompt."""

    def __init__(self, script: list[tuple[str, int]]):
        self.script = list(script)

    def __call__(self, prompt: str) -> str:
        if not self.script:
            return 'FINAL_ANSWER: {"Q1": "owl"}'
        kind, seed = self.script.pop(0)
        rng = random.Random(seed)
        _, records = parse_prompt(prompt)
        live = [r.record_id for r in records]
        if kind == "prune" and live:
            ids = rng.sample(live, rng.randint(1, len(live)))
            return call_text("prune_context", {"memory": f"note {seed}", "delete_ids": ids})
        if kind == "prune_unknown":
            return call_text("prune_context", {"memory": "n", "delete_ids": ["zzzzzzzz"]})
        if kind == "prune_empty":
            return call_text("prune_context", {"memory": "n", "delete_ids": []})
        if kind == "prune_head":
            head = prompt.split("[id: ")[1][:8]
            return call_text("prune_context", {"memory": "n", "delete_ids": [head]})
        if kind == "malformed":
            return '<tool_call>\n{"name": "search", "arguments": {\n</tool_call>'
        if kind == "unknown_tool":
            return call_text("open", {"page": seed})
        if kind == "missing_args":
            return call_text("prune_context", {"memory": "n"})
        if kind == "chatter":
            return "let me think"
        if kind == "long":
            return "word " * 80  # truncated by max_new_tokens: the turn is closed for the model
        return call_text("search", {"query": rng.choice(["color", "pet", "job", "city"]), "topk": rng.randint(1, 3)})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 10_000)), min_size=0, max_size=14),
       task_seed=st.integers(0, 1000))
def test_segment_invariants_random_actions(any_tokenizer, script, task_seed):
    task = make_task(task_seed, 2)
    engine = ScriptedEngine(RandomActor(script), any_tokenizer)
    trajs = run_episodes(engine, [task], ChatRenderer(any_tokenizer), SamplingParams(max_new_tokens=60),
                         budget=Budget(100_000, 100), seed=task_seed, progress=False)
    calls = trajs[0].calls
    assert len(calls) == len(script) + 1
    check_invariants(calls, segment_trajectory(calls))


def test_segments_of_hand_made_calls_and_bad_input():
    calls = [Call([1, 2], [3], [-0.5]), Call([1, 2, 3, 9], [4, 5], [-0.1, -0.2]), Call([1, 7], [6], [-0.3])]
    segs = segment_trajectory(calls)
    assert [s.prompt_ids for s in segs] == [[1, 2], [1, 7]]
    assert segs[0].response_ids == [3, 9, 4, 5] and segs[0].loss_mask == [1, 0, 1, 1]
    assert segs[0].logprobs == [-0.5, 0.0, -0.1, -0.2]
    with pytest.raises(ValueError, match="call 0: 2 log-probs for 1 output tokens"):
        segment_trajectory([Call([1], [3], [0.0, 0.0])])
    with pytest.raises(ValueError, match="call 0: empty prompt"):
        segment_trajectory([Call([], [3], [0.0])])


def _traj(calls, **kw):
    metrics = {"steps": len(calls), "memory_actions": 0, "mean_context_tokens": 3.0, "peak_context_tokens": 4,
               "total_input_tokens": 6, "total_output_tokens": 2, "overflow": False}
    return Trajectory("t0", kw.pop("reward", 1.0), calls, metrics, **kw)


def test_jsonl_round_trip_keeps_segments_and_groups(tmp_path):
    trajs = [_traj([Call([1, 2], [3], [-0.5]), Call([1, 7], [6], [-0.3])], group=g, reward=r)
             for g, r in ((0, 1.0), (0, 0.0), (1, -0.1))]
    path = tmp_path / "t.jsonl"
    write_jsonl(path, trajs)
    assert not (tmp_path / "t.jsonl.tmp").exists()
    rows = list(read_jsonl(path))
    assert [(r.line, r.index, r.group, r.reward) for r in rows] == [(1, 0, 0, 1.0), (2, 1, 0, 0.0), (3, 2, 1, -0.1)]
    for row, t in zip(rows, trajs):
        assert [s.to_json() for s in row.segments] == [s.to_json() for s in segment_trajectory(t.calls)]
    assert json.loads(path.read_text().splitlines()[0]) == to_json(trajs[0])


@pytest.mark.parametrize("line, message", [
    ("not json", "t.jsonl:1: not valid JSON"),
    ('{"calls": []}', "t.jsonl:1: expected a trajectory object with a 'segments' list"),
    ('{"schema": 2, "segments": []}', "t.jsonl:1: trajectory schema 2; this memact reads schema 1"),
    ('{"segments": [{"prompt_ids": [1]}]}', "t.jsonl:1 segment 0: expected an object with lists"),
    ('{"segments": [{"prompt_ids": [1], "response_ids": [2], "loss_mask": [1, 1], "logprobs": [0.0]}]}',
     "must have the same length, got 1, 2, 1"),
    ('{"segments": [{"prompt_ids": [], "response_ids": [2], "loss_mask": [1], "logprobs": [0.0]}]}',
     "empty prompt_ids"),
    ('{"segments": [{"prompt_ids": [1], "response_ids": [2], "loss_mask": [2], "logprobs": [0.0]}]}',
     "loss_mask must hold only 0 and 1"),
])
def test_reader_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(TrajectoryFormatError, match=re.escape(message)):
        list(read_jsonl(path))


def test_stats_summarise_a_batch():
    a = _traj([Call([1, 2], [3], [-0.5])], reward=1.0, correct=[True, False])
    b = _traj([Call([1, 2], [3, 4], [-0.5, -0.1])], reward=0.0, correct=[False, False], error="boom")
    b.metrics.update(peak_context_tokens=9, overflow=True, memory_actions=2)
    s = trajectory_stats([a, b])
    assert s["episodes"] == 2 and s["reward_mean"] == 0.5 and s["accuracy"] == 0.25
    assert s["context_peak_max"] == 9 and s["context_peak_mean"] == 6.5 and s["overflow_rate"] == 0.5
    assert s["memory_actions"] == 1.0 and s["gen_tokens"] == 3 and s["failed"] == 1 and s["total_tokens"] == 8.0
    assert trajectory_stats(trajectory_columns([a, b])) == s
    assert trajectory_stats([])["episodes"] == 0
