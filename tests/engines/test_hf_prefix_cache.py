"""The HF engine's KV cache kept between the turns of a rollout (``HFEngine.session``).

Reuse must not change what is generated: greedy episodes with and without it give the same
tokens (log-probs within fp32 rounding), with and without context edits, whether a call fits
one batch or continuous batching admits prompts part-way; and it must reuse exactly the prefix
a prompt shares with a finished row, nothing after an edit.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def warm():
    from transformers import AutoModelForCausalLM

    from memact.assets import tiny_warm
    from memact.models.model import load_tokenizer

    path = tiny_warm()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), load_tokenizer(path)


def _engine(warm, **kw):
    from memact.engines.factory import build_engine

    model, tok = warm
    return build_engine("hf", model, tok, **kw)


def _episodes(engine, tok, strategy, n=6, k=2):
    from memact.agent.chat import ChatRenderer
    from memact.agent.loop import run_episodes
    from memact.engines.base import SamplingParams
    from memact.env.memory import Budget
    from memact.env.task import make_task

    tasks = [make_task(i, k) for i in range(n)]
    return run_episodes(engine, tasks, ChatRenderer(tok), SamplingParams(temperature=0.0, max_new_tokens=40),
                        budget=Budget(max_steps=5), strategy=strategy, progress=False)


@pytest.mark.parametrize("strategy,batch", [("full", 64), ("sliding_window:1", 64), ("sliding_window:2", 4)])
def test_reuse_changes_nothing_generated(warm, strategy, batch):
    plain, cached = _engine(warm, max_batch_size=batch, prefix_cache_tokens=0), _engine(warm, max_batch_size=batch)
    a, b = _episodes(plain, warm[1], strategy), _episodes(cached, warm[1], strategy)
    calls = [(x, y) for ta, tb in zip(a, b) for x, y in zip(ta.calls, tb.calls)]
    assert [len(t.calls) for t in a] == [len(t.calls) for t in b]
    assert all(x.prompt_ids == y.prompt_ids and x.output_ids == y.output_ids for x, y in calls)
    assert max(abs(p - q) for x, y in calls for p, q in zip(x.logprobs, y.logprobs)) < 1e-4
    if strategy.startswith("sliding"):
        assert sum(c.edited_before for t in a for c in t.calls) > 0  # edits happened: the cut path ran
    prompt_tokens = sum(len(c.prompt_ids) for t in a for c in t.calls)
    assert plain.stats == {"prefill_tokens": prompt_tokens, "reused_tokens": 0}
    assert cached.stats["prefill_tokens"] + cached.stats["reused_tokens"] == prompt_tokens
    assert cached.stats["reused_tokens"] > 0.3 * prompt_tokens
    assert cached._prefix is None  # the session ended with the rollout: nothing kept for other weights


def test_reuses_exactly_the_shared_prefix(warm):
    from memact.engines.base import SamplingParams

    engine = _engine(warm)
    sp = SamplingParams(temperature=0.0, max_new_tokens=12)
    prompt = list(range(5, 45))
    outside = engine.generate([prompt], sp)[0]
    engine.generate([prompt + outside.output_ids + [7, 8]], sp)
    assert engine.stats["reused_tokens"] == 0  # outside a session nothing is kept
    with engine.session():
        first = engine.generate([prompt], sp)[0]
        assert first.output_ids == outside.output_ids
        covered = len(prompt) + len(first.output_ids) - 1  # the last sampled token was never fed
        engine.generate([prompt + first.output_ids + [7, 8, 9]], sp)
        assert engine.stats["reused_tokens"] == covered
        before = engine.stats["reused_tokens"]
        engine.generate([prompt[:10] + [3, 3, 3]], sp)  # an edit after token 10: only the rest is recomputed
        assert engine.stats["reused_tokens"] - before == 10
        before = engine.stats["reused_tokens"]
        engine.generate([[9, 9, 9, 9]], sp)  # nothing in common
        assert engine.stats["reused_tokens"] == before


def test_the_cache_holds_at_most_its_budget(warm):
    from memact.engines.base import SamplingParams

    engine = _engine(warm, prefix_cache_tokens=100)
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    with engine.session():
        engine.generate([list(range(5, 45)), list(range(50, 90)), list(range(100, 140))], sp)
        assert engine._prefix.tokens <= 100 and len(engine._prefix.entries) == 2  # the oldest went


def test_bad_budget_is_refused(warm):
    from memact.dcpo.config import ConfigError, configs_dir, load_config

    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        _engine(warm, prefix_cache_tokens=-1)
    with pytest.raises(ConfigError, match="rollout.prefix_cache_tokens"):
        load_config(configs_dir() / "tiny_cpu_dcpo.yaml", ["rollout.prefix_cache_tokens=-5"])
