"""Run (policy, strategy, K) combinations and summarise accuracy against context cost.

Accuracy is the mean share of sub-questions answered exactly (after normalisation), as in
the paper; cost is total tokens per task (input + output over all calls), the paper's
"cost" column; context is the prompt length per step (mean and peak).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memact.engines.base import SamplingParams
from memact.env.memory import Budget
from memact.env.sources import parse_source
from memact.env.task import Task, exact_match, token_f1
from memact.trajectory import Trajectory, trajectory_stats
from memact.util.holds import hold

Judge = Callable[[str, str, str], bool]  # (question, gold, prediction) -> equivalent?


@dataclass
class System:
    """One evaluated system: a policy run under a memory strategy."""

    policy: str  # MODEL_DIR | scripted | scripted-nomem | openai:MODEL
    strategy: str = "memact"
    name: str | None = None  # display name (default: the policy spec)


@dataclass
class EvalSpec:
    """What to evaluate: every system at every K on the same tasks."""

    systems: list[System]
    objectives: list[int]
    n: int = 16
    seed: int = 0
    data: str | None = None  # a task source spec (memact.env.sources); None: synthetic
    split: str = "eval"  # a file source's split: eval | train | all
    retrieval: str = "task"  # a file source's search backend (memact.env.retrieval)
    budget: Budget | None = None
    budgets: list[Budget] | None = None  # a sweep: every system and K at each budget (overrides budget)
    sampling: SamplingParams | None = None
    engine: str = "hf"  # what rolls out model directories: memact.engines.factory.ENGINES

    @classmethod
    def grid(cls, policies: list[str], strategies: list[str], objectives: list[int], **kw) -> EvalSpec:
        """Every policy under every strategy."""
        return cls([System(p, s) for p in policies for s in strategies], objectives, **kw)


def make_eval_tasks(data: str | None, k: int, n: int, seed: int, split: str = "eval",
                    retrieval: str = "task") -> list[Task]:
    """The evaluation's tasks from a task source spec (``memact.env.sources``): synthetic worlds, or
    a file's ``split`` (default ``eval``: questions a training run on the same file never sees)."""
    return parse_source(data, retrieval).tasks(n, k, seed, split=split)


def episode_row(policy: str, strategy: str, task: Task, traj: Trajectory, judge: Judge | None = None) -> dict:
    """One line of ``episodes.jsonl``: the outcome of one task, without token ids."""
    answer = traj.answer or {}
    per_q = []
    for q in task.questions:
        pred = answer.get(q.key, "")
        em = exact_match(pred, q.answer) or any(exact_match(pred, a) for a in q.aliases)
        item = {"key": q.key, "gold": q.answer, "pred": pred, "em": em, "f1": token_f1(pred, q.answer)}
        if judge is not None and traj.answer is not None:
            item["judge"] = em or bool(pred and judge(q.text, q.answer, pred))
        per_q.append(item)
    m = traj.metrics
    return {
        "policy": policy, "strategy": strategy, "k": task.k, "task_id": task.task_id, "reward": traj.reward,
        "accuracy": sum(x["em"] for x in per_q) / task.k, "f1": sum(x["f1"] for x in per_q) / task.k,
        "judge_accuracy": (sum(x.get("judge", False) for x in per_q) / task.k) if judge else None,
        "all_correct": all(x["em"] for x in per_q), "questions": per_q,
        "total_tokens": m["total_input_tokens"] + m["total_output_tokens"], "error": traj.error, **m,
    }


def summarize(trajs: list[Trajectory], rows: list[dict]) -> dict[str, Any]:
    """One (system, K) cell: answer quality from the episode rows, the rest from
    :func:`memact.trajectory.trajectory_stats`."""
    n = len(rows)
    mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    st = trajectory_stats(trajs)
    out = {
        "n": n, "accuracy": mean("accuracy"), "f1": mean("f1"), "all_correct": mean("all_correct"),
        "mean_context": st["context_mean"], "peak_context": st["context_peak_mean"],
        "max_peak_context": st["context_peak_max"], "total_tokens": st["total_tokens"],
        "memory_actions": st["memory_actions"], "steps": st["steps"], "overflow": st["overflow_rate"],
        "failed": st["failed"],
    }
    if rows[0].get("judge_accuracy") is not None:
        out["judge_accuracy"] = mean("judge_accuracy")
    return out


def evaluate(spec: EvalSpec, out_dir: str | os.PathLike, judge: Judge | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every combination, write ``episodes.jsonl`` and ``summary.json`` to ``out_dir``."""
    from memact.agent.rollout import rollout

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = spec.budgets or [spec.budget or Budget()]
    sampling = spec.sampling or SamplingParams(temperature=0.0)
    summary: list[dict[str, Any]] = []
    tmp = out / "episodes.jsonl.tmp"
    # A checkpoint of a running DCPO job stays on disk until every K has run (run.keep_checkpoints).
    with hold(*(s.policy for s in spec.systems)), open(tmp, "w", encoding="utf-8") as f:
        for system, budget in ((s, b) for s in spec.systems for b in sweep):
            name, strategy = system.name or system.policy, system.strategy
            at = f" @ {budget.max_context_tokens}" if len(sweep) > 1 else ""
            for k in spec.objectives:
                t0 = time.time()
                tasks = make_eval_tasks(spec.data, k, spec.n, spec.seed, spec.split, spec.retrieval)
                trajs = rollout(system.policy, k, spec.n, seed=spec.seed, budget=budget, sampling=sampling,
                                progress=progress, strategy=strategy, tasks=tasks, engine=spec.engine)
                rows = [{**episode_row(name, strategy, t, tr, judge), "context_budget": budget.max_context_tokens}
                        for t, tr in zip(tasks, trajs)]
                for r in rows:
                    f.write(json.dumps(r) + "\n")
                s = {"policy": name, "strategy": strategy, "k": k, "context_budget": budget.max_context_tokens,
                     **summarize(trajs, rows), "seconds": time.time() - t0}
                summary.append(s)
                log(f"{name} / {strategy}{at} / K={k}: accuracy {s['accuracy']:.3f} | all-correct "
                    f"{s['all_correct']:.2f} | context mean {s['mean_context']:.0f} peak {s['peak_context']:.0f} "
                    f"| tokens/task {s['total_tokens']:.0f} | memory actions {s['memory_actions']:.1f} "
                    f"| overflow {s['overflow']:.2f} | {s['seconds']:.1f}s")
    os.replace(tmp, out / "episodes.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
