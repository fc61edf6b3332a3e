"""Rollouts from the command line or from code: policy spec -> engine -> trajectories -> JSONL.

A policy is ``scripted`` (the expert), ``scripted-plan`` (the expert whose notes also keep
the questions still to answer), ``scripted-nomem`` (the expert without the memory tool), a
model directory (tiny or a real checkpoint on a local path), or ``openai:MODEL``
(an OpenAI-compatible server: ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``; see docs/engines.md).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memact.agent.chat import ChatRenderer
from memact.agent.loop import run_episodes
from memact.agent.scripted import SCRIPTED, scripted_expert
from memact.agent.strategies import parse_strategy
from memact.engines.base import SamplingParams
from memact.engines.factory import build_engine
from memact.engines.scripted import ScriptedEngine
from memact.env.memory import Budget
from memact.env.task import Task, make_tasks
from memact.trajectory import Trajectory
from memact.util.holds import hold

OPENAI_PREFIX = "openai:"  # openai:MODEL, a model behind an OpenAI-compatible server


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The tokenizer `memact new-model` would build (trained in-process, about a second)."""
    from memact.models.tokenizer import task_corpus, train_tokenizer

    return train_tokenizer(task_corpus())


@dataclass
class PolicyHandle:
    engine: Any
    tokenizer: Any
    memory_tool: bool
    name: str


def make_policy(spec: str, tasks: list[Task], tokenizer_dir: str | None = None, seed: int = 0,
                memory: bool | None = None, engine: str = "hf", max_model_len: int = 0) -> PolicyHandle:
    """An engine for a policy spec (``scripted``, ``scripted-plan``, ``scripted-nomem``, ``openai:MODEL`` or a
    model directory).

    ``memory`` overrides whether a scripted expert uses ``prune_context`` (default: by spec).
    ``engine``: what rolls out a model directory (``memact.engines.factory.ENGINES``); for vLLM
    ``max_model_len`` bounds prompt plus output (0: the checkpoint's).
    """
    from memact.models.model import load_tokenizer

    if spec in SCRIPTED:
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else default_tokenizer()
        expert = scripted_expert(spec, tasks, seed=seed, memory=memory)
        return PolicyHandle(ScriptedEngine(expert, tok), tok, expert.memory, spec)
    if spec.startswith(OPENAI_PREFIX):
        from memact.engines.openai import OpenAIEngine

        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else default_tokenizer()
        engine = OpenAIEngine(spec[len(OPENAI_PREFIX):], tok)
        return PolicyHandle(engine, tok, True if memory is None else memory, spec)
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"--policy {spec!r}: not 'scripted', 'scripted-plan', 'scripted-nomem', 'openai:MODEL' "
                         "or a model directory")
    mtime = (path / "config.json").stat().st_mtime
    if engine == "vllm":
        tok = load_tokenizer(path)
        return PolicyHandle(_vllm_cached(str(path.resolve()), mtime, max_model_len, tok), tok, True, path.name)
    model, tok = _load_cached(str(path.resolve()), mtime)
    return PolicyHandle(build_engine(engine, model, tok), tok, True, path.name)


_VLLM: dict[tuple[str, float, int], Any] = {}


def _vllm_cached(path: str, mtime: float, max_model_len: int, tokenizer: Any):
    """The vLLM engine of a model directory (start-up takes seconds to minutes): only the last one
    is kept, the one before is stopped."""
    key = (path, mtime, max_model_len)
    if key not in _VLLM:
        close_engines()
        options = {"max_model_len": max_model_len} if max_model_len else {}
        _VLLM[key] = build_engine("vllm", None, tokenizer, model_dir=path, vllm=options)
    return _VLLM[key]


def close_engines() -> None:
    """Stop the vLLM engine that rollouts of a model directory keep (if any)."""
    while _VLLM:
        _VLLM.popitem()[1].close()


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float):
    """Evaluations roll out the same model many times: load it once (keyed on path and mtime).

    On a GPU when torch sees one (``$MEMACT_DEVICE`` overrides: cpu, cuda, cuda:N)."""
    from memact.models.model import load_policy, resolve_device

    return load_policy(path, device=resolve_device(os.environ.get("MEMACT_DEVICE", "auto")))


def default_strategy(policy: str) -> str:
    return "full" if policy == "scripted-nomem" else "memact"


def rollout(policy: str, objectives: int, n: int, seed: int = 0, budget: Budget | None = None,
            sampling: SamplingParams | None = None, tokenizer_dir: str | None = None,
            progress: bool = True, strategy: str | None = None, tasks: list[Task] | None = None,
            engine: str = "hf") -> list[Trajectory]:
    """Run ``n`` episodes of ``policy`` on fresh tasks with ``objectives`` sub-questions (or on ``tasks``);
    ``engine`` rolls out a model directory (``hf`` or ``vllm``)."""
    tasks = tasks if tasks is not None else make_tasks(n, objectives, seed)
    st = parse_strategy(strategy or default_strategy(policy))
    with hold(policy):  # a checkpoint of a running DCPO job is not rotated away meanwhile
        budget = budget or Budget()
        sampling = sampling or SamplingParams()
        handle = make_policy(policy, tasks, tokenizer_dir=tokenizer_dir, seed=seed, memory=st.memory_tool,
                             engine=engine, max_model_len=budget.max_context_tokens + sampling.max_new_tokens)
        renderer = ChatRenderer(handle.tokenizer)
        return run_episodes(handle.engine, tasks, renderer, sampling, budget=budget, strategy=st, seed=seed,
                            progress=progress)
