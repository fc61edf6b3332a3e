"""Each memory strategy's context behaviour, and DCPO segments across strategy edits."""

import pytest

from memact.agent.rollout import rollout
from memact.agent.strategies import Strategy, parse_strategy
from memact.env.memory import Budget
from memact.trajectory import check_invariants, segment_trajectory, trajectory_stats


def _segment_starts(traj):
    segs = segment_trajectory(traj.calls)
    check_invariants(traj.calls, segs)
    return segs


def test_parse_strategy():
    assert parse_strategy("sliding_window:3") == Strategy("sliding_window", window=3)
    assert parse_strategy("summarize:0.5").summarize_at == 0.5
    assert not parse_strategy("full").memory_tool and parse_strategy("memact").memory_tool
    for bad in ("window", "summarize:2", "sliding_window:x", "full:3"):
        with pytest.raises(ValueError):
            parse_strategy(bad)


def test_full_grows_until_overflow():
    trajs = rollout("scripted", 6, 4, seed=2, strategy="full", progress=False)
    for t in trajs:
        lens = [len(c.prompt_ids) for c in t.calls]
        assert lens == sorted(lens) and t.metrics["overflow"] and t.reward == -0.1
        assert t.metrics["memory_actions"] == 0
        assert len(segment_trajectory(t.calls)) == 1


def test_sliding_window_keeps_last_k_records():
    trajs = rollout("scripted", 6, 4, seed=2, strategy="sliding_window:2", progress=False)
    for t in trajs:
        assert not t.metrics["overflow"] and t.metrics["strategy_edits"] > 0
        _segment_starts(t)
    # With window 1, the context never holds more than the head and one record.
    one = rollout("scripted", 6, 2, seed=2, strategy="sliding_window:1", progress=False)
    full_head = rollout("scripted", 6, 2, seed=2, strategy="full", progress=False)
    head_len = len(full_head[0].calls[0].prompt_ids)
    record_max = max(len(c.prompt_ids) - head_len for c in full_head[0].calls[1:2])
    assert max(len(c.prompt_ids) for c in one[0].calls) <= head_len + record_max + 40


def test_summarize_replaces_history():
    trajs = rollout("scripted", 6, 4, seed=2, strategy="summarize:0.6", progress=False)
    s = trajectory_stats(trajs)
    assert s["reward_mean"] >= 0.95 and s["overflow_rate"] == 0
    for t in trajs:
        kinds = [c.kind for c in t.calls]
        assert "summary" in kinds
        i = kinds.index("summary")
        # The call after a summary sees a context shorter than the one that asked for it.
        assert len(t.calls[i + 1].prompt_ids) < len(t.calls[i].prompt_ids)
        _segment_starts(t)


def test_memact_strategy_prunes_and_segments():
    trajs = rollout("scripted", 4, 4, seed=3, strategy="memact", budget=Budget(1040, 40), progress=False)
    for t in trajs:
        assert t.metrics["memory_actions"] >= 1
        check_invariants(t.calls, segment_trajectory(t.calls))
