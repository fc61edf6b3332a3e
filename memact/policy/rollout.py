"""Rollouts from the command line or from code: policy spec -> engine -> trajectories -> JSONL.

A policy is ``scripted`` (the expert), ``scripted-plan`` (the expert whose notes also keep
the questions still to answer), ``scripted-nomem`` (the expert without the memory tool), a
model directory (tiny or a real checkpoint on a local path), or ``openai:MODEL``
(an OpenAI-compatible server: ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``; see docs/engines.md).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memact.dcpo.holds import hold
from memact.dcpo.segments import segment_trajectory
from memact.env.memory import DEFAULT_CONTEXT_BUDGET, DEFAULT_MAX_STEPS, Budget
from memact.env.task import Task, make_tasks
from memact.policy.agent import Trajectory, run_episodes
from memact.policy.chat import ChatRenderer
from memact.policy.engines import HFEngine, SamplingParams, ScriptedEngine
from memact.policy.scripted import SCRIPTED, scripted_expert
from memact.policy.strategies import parse_strategy

OPENAI_PREFIX = "openai:"  # openai:MODEL, a model behind an OpenAI-compatible server

__all__ = ["DEFAULT_CONTEXT_BUDGET", "DEFAULT_MAX_STEPS", "rollout", "make_policy", "trajectory_json"]


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The tokenizer `memact new-model` would build (trained in-process, about a second)."""
    from memact.policy.tokenizer import task_corpus, train_tokenizer

    return train_tokenizer(task_corpus())


@dataclass
class PolicyHandle:
    engine: Any
    tokenizer: Any
    memory_tool: bool
    name: str


def make_policy(spec: str, tasks: list[Task], tokenizer_dir: str | None = None, seed: int = 0,
                memory: bool | None = None) -> PolicyHandle:
    """An engine for a policy spec (``scripted``, ``scripted-plan``, ``scripted-nomem``, ``openai:MODEL`` or a
    model directory).

    ``memory`` overrides whether a scripted expert uses ``prune_context`` (default: by spec).
    """
    from memact.policy.model import load_tokenizer

    if spec in SCRIPTED:
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else default_tokenizer()
        expert = scripted_expert(spec, tasks, seed=seed, memory=memory)
        return PolicyHandle(ScriptedEngine(expert, tok), tok, expert.memory, spec)
    if spec.startswith(OPENAI_PREFIX):
        from memact.policy.openai_engine import OpenAIEngine

        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else default_tokenizer()
        engine = OpenAIEngine(spec[len(OPENAI_PREFIX):], tok)
        return PolicyHandle(engine, tok, True if memory is None else memory, spec)
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"--policy {spec!r}: not 'scripted', 'scripted-plan', 'scripted-nomem', 'openai:MODEL' "
                         "or a model directory")
    model, tok = _load_cached(str(path.resolve()), (path / "config.json").stat().st_mtime)
    engine = HFEngine(model, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    return PolicyHandle(engine, tok, True, path.name)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float):
    """Evaluations roll out the same model many times: load it once (keyed on path and mtime).

    On a GPU when torch sees one (``$MEMACT_DEVICE`` overrides: cpu, cuda, cuda:N)."""
    from memact.policy.model import load_policy, resolve_device

    return load_policy(path, device=resolve_device(os.environ.get("MEMACT_DEVICE", "auto")))


def trajectory_json(traj: Trajectory) -> dict[str, Any]:
    """The JSONL record of a trajectory, segments included."""
    segments = segment_trajectory(traj.calls)
    metrics = dict(traj.metrics)
    metrics["segments"] = len(segments)
    return {
        "task_id": traj.task_id,
        "group": traj.group,
        "reward": traj.reward,
        "correct": traj.correct,
        "answer": traj.answer,
        "error": traj.error,
        "metrics": metrics,
        "calls": [c.to_json() for c in traj.calls],
        "segments": [s.to_json() for s in segments],
    }


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write all rows to a temporary file, then rename: no half-written output on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def summarize(trajs: list[Trajectory]) -> dict[str, float]:
    n = max(len(trajs), 1)
    return {
        "episodes": len(trajs),
        "mean_reward": sum(t.reward for t in trajs) / n,
        "mean_context": sum(t.metrics["mean_context_tokens"] for t in trajs) / n,
        "peak_context": max((t.metrics["peak_context_tokens"] for t in trajs), default=0),
        "memory_actions": sum(t.metrics["memory_actions"] for t in trajs) / n,
        "overflow_rate": sum(t.metrics["overflow"] for t in trajs) / n,
        "steps": sum(t.metrics["steps"] for t in trajs) / n,
    }


def default_strategy(policy: str) -> str:
    return "full" if policy == "scripted-nomem" else "memact"


def rollout(policy: str, objectives: int, n: int, seed: int = 0, budget: Budget | None = None,
            sampling: SamplingParams | None = None, tokenizer_dir: str | None = None,
            progress: bool = True, strategy: str | None = None, tasks: list[Task] | None = None) -> list[Trajectory]:
    """Run ``n`` episodes of ``policy`` on fresh tasks with ``objectives`` sub-questions (or on ``tasks``)."""
    tasks = tasks if tasks is not None else make_tasks(n, objectives, seed)
    st = parse_strategy(strategy or default_strategy(policy))
    with hold(policy):  # a checkpoint of a running DCPO job is not rotated away meanwhile
        handle = make_policy(policy, tasks, tokenizer_dir=tokenizer_dir, seed=seed, memory=st.memory_tool)
        renderer = ChatRenderer(handle.tokenizer)
        budget = budget or Budget(DEFAULT_CONTEXT_BUDGET, DEFAULT_MAX_STEPS)
        sampling = sampling or SamplingParams()
        return run_episodes(handle.engine, tasks, renderer, sampling, budget=budget, strategy=st, seed=seed,
                            progress=progress)
