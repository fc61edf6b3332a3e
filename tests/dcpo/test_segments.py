"""DCPO segmentation invariants over random sequences of valid and invalid actions.

For every call: the segment's prompt plus its response tokens before that call equal,
id for id, the prompt the engine saw. The loss-mask tokens of all segments are exactly
the generated tokens, each once, in order. A new segment starts exactly at each context
edit (a successful prune_context), and nowhere else.
"""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memact.dcpo.segments import segment_trajectory
from memact.env.memory import Budget
from memact.env.task import make_task
from memact.policy.agent import run_episodes
from memact.policy.chat import ChatRenderer, call_text
from memact.policy.engines import SamplingParams, ScriptedEngine
from memact.policy.scripted import parse_prompt
from memact.testing import check_invariants

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
def test_segment_invariants_random_actions(tokenizer, script, task_seed):
    task = make_task(task_seed, 2)
    engine = ScriptedEngine(RandomActor(script), tokenizer)
    trajs = run_episodes(engine, [task], ChatRenderer(tokenizer), SamplingParams(max_new_tokens=60),
                         budget=Budget(100_000, 100), seed=task_seed, progress=False)
    calls = trajs[0].calls
    assert len(calls) == len(script) + 1
    check_invariants(calls, segment_trajectory(calls))


def test_segments_from_dicts_and_bad_input():
    calls = [{"prompt_ids": [1, 2], "output_ids": [3], "logprobs": [-0.5]},
             {"prompt_ids": [1, 2, 3, 9], "output_ids": [4, 5], "logprobs": [-0.1, -0.2]},
             {"prompt_ids": [1, 7], "output_ids": [6], "logprobs": [-0.3]}]
    segs = segment_trajectory(calls)
    assert [s.prompt_ids for s in segs] == [[1, 2], [1, 7]]
    assert segs[0].response_ids == [3, 9, 4, 5] and segs[0].loss_mask == [1, 0, 1, 1]
    assert segs[0].logprobs == [-0.5, 0.0, -0.1, -0.2]
    import pytest

    with pytest.raises(ValueError, match="call 0: 2 log-probs for 1 output tokens"):
        segment_trajectory([{"prompt_ids": [1], "output_ids": [3], "logprobs": [0.0, 0.0]}])
