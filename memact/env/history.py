"""Research history as a task family for the memory policy (docs/research.md, "History tasks").

An episode replays the experiment log of a research run, one result per ``next_experiment``
call, under a context budget that forces curation: the agent keeps what the next proposal
needs and folds the rest into ``prune_context`` notes. The reward is what the curated context
is worth to the context-reading proposer (``memact.research.proposers.ContextProposer``),
measured with the same reader it uses (:func:`read_context`) before every experiment, when a
proposer would read it:

- **tried**: of the changes tried so far that could be proposed again from the current best
  (every constant they move still has the value they moved it from), the share it can see;
- **crashed**: of the (constant, direction) moves that crashed, the share it can see;
- **helped**: of the (constant, direction) moves that were kept, the share it can see.

The worth of a context is the mean of the three (a part with nothing to see counts 1); the
episode's reward is the mean worth over its checkpoints, or the penalty when it breaks a budget.

This module also holds the one format of an experiment line and its reader, used by the
research agent's memory (``memact.research.history``) and its proposer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memact.env.memory import Budget, Record
from memact.env.task import PENALTY, Task
from memact.env.tools import PRUNE_SCHEMA, AgentEnv, StepResult

EXPERIMENTS_PER_K = 4
"""A history task of K "objectives" replays ``4 K`` experiments (K is the curriculum's axis)."""
STATUSES = ("keep", "discard", "crash")

# ---- The experiment line and its reader ---------------------------------------------------

RECORD_RE = re.compile(r"exp (\d+) (\w+) val_bpb=(\S+) \| (.*?) \|(?: |$)")
MOVE_RE = re.compile(r"\b([A-Z][A-Z_]+) (\S+) -> ([^;|\s]+)")
_KEPT_TRIED_RE = re.compile(r"\b([A-Z][A-Z_]+) (\d+)/(\d+)")


def experiment_line(experiment: int, status: str, val_bpb: float | None, description: str, diff: str | None) -> str:
    """``exp N STATUS val_bpb=X | description | diff``: how the history shows one experiment; with
    ``diff`` None, the compact line a note may copy (``exp N STATUS val_bpb=X | description |``)."""
    bpb = "crash" if val_bpb is None else f"{val_bpb:.4f}"
    line = f"exp {experiment} {status} val_bpb={bpb} | {description} |"
    return line if diff is None else f"{line} {diff}"


def change_key(description: str) -> frozenset[tuple[str, str]]:
    """What an experiment set: ``{(CONSTANT, new value)}`` from ``NAME old -> new`` moves."""
    return frozenset((name, new) for name, _, new in MOVE_RE.findall(description))


def move_key(description: str) -> frozenset[tuple[str, str, str]]:
    """The moves of an experiment: ``{(CONSTANT, old value, new value)}``."""
    return frozenset(MOVE_RE.findall(description))


def direction(old: str, new: str) -> int | None:
    """+1 for a move up, -1 down, None when a value is not a number."""
    try:
        return 1 if float(new) > float(old) else -1
    except ValueError:
        return None


@dataclass
class Seen:
    """What a context shows: the moves tried, the moves that were kept and those that crashed,
    and a note's kept/tried counts per constant."""

    tried: set[frozenset[tuple[str, str, str]]]
    helped: list[tuple[str, int]]  # (constant, +1 up / -1 down) of kept moves, oldest first
    crashed: dict[tuple[str, int], float]  # (constant, direction) -> the least extreme value that crashed
    kept_tried: dict[str, tuple[int, int]]


def read_context(context_text: str) -> Seen:
    """The experiments and notes a context shows, and nothing else: every experiment line, in a
    record or copied into a note (its moves, kept or crashed), and, in a heuristic note, the
    kept/tried counts and the kept moves."""
    seen = Seen(set(), [], {}, {})
    for line in context_text.splitlines():
        for m in RECORD_RE.finditer(line):
            status, description = m.group(2), m.group(4)
            moves = MOVE_RE.findall(description)
            if not moves:
                continue
            seen.tried.add(frozenset(moves))
            for name, old, new in moves:
                up = direction(old, new)
                if up is None:
                    continue
                if status == "keep":
                    seen.helped.append((name, up))
                elif status == "crash":
                    worst = seen.crashed.get((name, up))
                    value = float(new)
                    seen.crashed[(name, up)] = value if worst is None else (min if up > 0 else max)(worst, value)
        if "note:" in line:
            counts = line.split("kept/tried:", 1)[1].split(";", 1)[0] if "kept/tried:" in line else ""
            for name, kept, tried in _KEPT_TRIED_RE.findall(counts):
                seen.kept_tried[name] = (int(kept), int(tried))
            kept = line.split("kept:", 1)[1] if "; kept:" in line else ""
            for name, old, new in MOVE_RE.findall(kept.split("earlier notes:", 1)[0]):
                up = direction(old, new)
                if up is not None:
                    seen.helped.append((name, up))
    return seen


# ---- What a context is worth ------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """One logged experiment of a history."""

    experiment: int
    status: str
    val_bpb: float | None
    description: str
    diff: str = ""

    def line(self) -> str:
        return experiment_line(self.experiment, self.status, self.val_bpb, self.description, self.diff)

    def compact(self) -> str:
        return experiment_line(self.experiment, self.status, self.val_bpb, self.description, None)


def experiments_in(text: str) -> list[Experiment]:
    """Every experiment line in ``text`` (records and the compact lines a note copies), in order."""
    out = []
    for m in RECORD_RE.finditer(text):
        bpb = m.group(3)
        try:
            value = None if bpb == "crash" else float(bpb)
        except ValueError:
            continue
        out.append(Experiment(int(m.group(1)), m.group(2), value, m.group(4)))
    return out


def current_config(baseline: dict[str, str], experiments: list[Experiment]) -> dict[str, str]:
    """The best configuration after ``experiments``: the baseline with every kept move applied."""
    config = dict(baseline)
    for e in experiments:
        if e.status == "keep":
            for name, _, new in MOVE_RE.findall(e.description):
                config[name] = new
    return config


@dataclass
class Truth:
    """What the proposer needs to see after some experiments (the reward's three parts)."""

    tried: set[frozenset[tuple[str, str, str]]]
    crashed: set[tuple[str, int]]
    helped: set[tuple[str, int]]


def truth_after(baseline: dict[str, str], experiments: list[Experiment]) -> Truth:
    config = current_config(baseline, experiments)
    truth = Truth(set(), set(), set())
    for e in experiments:
        moves = MOVE_RE.findall(e.description)
        if not moves:
            continue
        if all(config.get(name) == old for name, old, _ in moves):
            truth.tried.add(frozenset(moves))
        for name, old, new in moves:
            up = direction(old, new)
            if up is None:
                continue
            if e.status == "crash":
                truth.crashed.add((name, up))
            elif e.status == "keep":
                truth.helped.add((name, up))
    return truth


def context_worth(context_text: str, truth: Truth) -> dict[str, float]:
    """The share of each part of ``truth`` that ``context_text`` shows, and their mean (``worth``)."""
    seen = read_context(context_text)
    helped = set(seen.helped)

    def share(want: set, have: Any) -> float:
        return sum(x in have for x in want) / len(want) if want else 1.0

    parts = {"tried": share(truth.tried, seen.tried), "crashed": share(truth.crashed, seen.crashed),
             "helped": share(truth.helped, helped)}
    return {**parts, "worth": sum(parts.values()) / 3}


# ---- The task and its environment ----------------------------------------------------------------

NEXT_SCHEMA = {
    "name": "next_experiment",
    "description": "Read the next experiment's result.",
    "parameters": {"type": "object", "properties": {}, "required": []},
}
NO_MORE = "No experiments left."
SYSTEM_PROMPT = (
    "You are the memory of a research agent. Each tool response begins with its record id. "
    "Call one tool per turn: <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>. "
    "Read results with next_experiment. Keep what the next proposal needs: the changes tried from "
    "the current best, the changes kept, the values that crashed. Fold the rest with prune_context."
)


def history_prompt(experiments: int, baseline: dict[str, str], baseline_bpb: float | None) -> str:
    """The task text of a history episode (also how the research agent's ``policy:`` memory asks)."""
    config = " ".join(f"{name}={value}" for name, value in baseline.items())
    bpb = "" if baseline_bpb is None else f" val_bpb {baseline_bpb:.4f}."
    return (f"Curate the history of {experiments} experiments. Baseline: {config};{bpb} "
            f"Each experiment moves constants of the best so far; a keep becomes the new best.")


@dataclass
class HistoryTask(Task):
    """A research history to curate: a baseline configuration and the experiments that followed."""

    baseline: dict[str, str] = field(default_factory=dict)
    baseline_bpb: float | None = None
    experiments: list[Experiment] = field(default_factory=list)

    @property
    def k(self) -> int:
        return max(1, len(self.experiments) // EXPERIMENTS_PER_K)

    def prompt_text(self) -> str:
        return history_prompt(len(self.experiments), self.baseline, self.baseline_bpb)

    def gold(self) -> dict[str, str]:
        return {}

    def make_env(self, seed: int = 0, memory_tool: bool = True, budget: Budget | None = None) -> HistoryEnv:
        return HistoryEnv(self, seed=seed, memory_tool=memory_tool, budget=budget)


class HistoryEnv(AgentEnv):
    """An episode of a :class:`HistoryTask`: ``next_experiment`` and ``prune_context``; it ends at the
    first ``next_experiment`` after the last result, scored by :func:`context_worth`."""

    system_prompt = SYSTEM_PROMPT

    def __init__(self, task: HistoryTask, seed: int = 0, memory_tool: bool = True, budget: Budget | None = None):
        super().__init__(task, seed=seed, memory_tool=memory_tool, budget=budget)
        self.task: HistoryTask = task
        self.delivered = 0
        self.checkpoints: list[dict[str, float]] = []

    @property
    def tools(self) -> list[dict[str, Any]]:
        return [NEXT_SCHEMA, PRUNE_SCHEMA] if self.memory_tool else [NEXT_SCHEMA]

    def context_text(self) -> str:
        """The records as the proposer reads them: experiment lines, and each note as ``note: TEXT``."""
        return "\n".join(record_text(r) for r in self.memory.records)

    def _task_handlers(self) -> dict[str, Any]:
        return {"next_experiment": self._next}

    def _final(self, assistant_text: str) -> StepResult:
        return self._error("there is no answer to give: call next_experiment until none is left", assistant_text)

    def _next(self, arguments: dict[str, Any], assistant_text: str) -> StepResult:
        done = self.task.experiments[:self.delivered]
        if done:  # what a proposer would read before proposing the next experiment
            self.checkpoints.append(context_worth(self.context_text(), truth_after(self.task.baseline, done)))
        if self.delivered >= len(self.task.experiments):
            self.answer = {}
            return StepResult(None, kind="final", done=True)
        e = self.task.experiments[self.delivered]
        self.delivered += 1
        return self._append(e.line(), assistant_text, "tool", tool="next_experiment", experiment=e.experiment)

    def reward(self, broken: str | None) -> float:
        self.correct = []
        if broken or self.answer is None or not self.checkpoints:
            return PENALTY
        return sum(c["worth"] for c in self.checkpoints) / len(self.checkpoints)


def record_text(record: Record) -> str:
    """A history record as the proposer reads it (no id header)."""
    if record.kind == "memory":
        return f"note: {record.meta.get('memory', '')}"
    return record.response_text.split("\n", 1)[-1]


# ---- History files --------------------------------------------------------------------------


class HistoryFileError(ValueError):
    """A history file that cannot be loaded; the message names the file, the line and the field."""


def load_histories(path: str | Path) -> list[dict[str, Any]]:
    """The runs of a JSONL history file (``memact research histories``, docs/research.md), checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"history file {str(path)!r} does not exist")
    runs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise HistoryFileError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise HistoryFileError(f"{where}: a run must be an object with a string 'id'")
        baseline = row.get("baseline")
        if not isinstance(baseline, dict) or not all(isinstance(v, str) for v in baseline.values()):
            raise HistoryFileError(f"{where}: 'baseline' must map constant names to values as strings")
        exps = row.get("experiments")
        if not isinstance(exps, list) or not exps:
            raise HistoryFileError(f"{where}: 'experiments' must be a non-empty list")
        parsed = []
        for j, e in enumerate(exps):
            try:
                status, bpb = e["status"], e["val_bpb"]
                if status not in STATUSES:
                    raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
                if (bpb is None) != (status == "crash"):
                    raise ValueError("val_bpb must be null exactly when the status is crash")
                parsed.append(Experiment(int(e["experiment"]), status, None if bpb is None else float(bpb),
                                         str(e["description"]), str(e.get("diff", ""))))
            except (KeyError, TypeError, ValueError) as err:
                raise HistoryFileError(f"{where}: experiments[{j}]: {err}") from None
        bpb = row.get("baseline_bpb")
        runs.append({"id": row["id"], "baseline": baseline, "experiments": parsed,
                     "baseline_bpb": None if bpb is None else float(bpb)})
    if not runs:
        raise HistoryFileError(f"{path}: no runs")
    return runs


def baseline_of(task_text: str) -> dict[str, str]:
    """The baseline configuration a history task's text states (``Baseline: A=1 B=2;``)."""
    m = re.search(r"Baseline: ([^;]*);", task_text)
    return dict(re.findall(r"([A-Z][A-Z_]+)=(\S+)", m.group(1))) if m else {}


def history_tasks(runs: list[dict[str, Any]], n: int, k: int, seed: int, source: str) -> list[HistoryTask]:
    """``n`` tasks of ``EXPERIMENTS_PER_K * k`` consecutive experiments, each from a seeded run and start."""
    import random

    if not runs:
        raise ValueError("no history runs to draw tasks from (an empty split?)")
    length = EXPERIMENTS_PER_K * k
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        run = rng.choice(runs)
        exps = run["experiments"]
        start = rng.randrange(0, max(1, len(exps) - length + 1))
        window = exps[start:start + length]
        baseline = current_config(run["baseline"], exps[:start])
        tasks.append(HistoryTask(task_id=f"history-k{k}-s{seed}-{i}-{run['id']}@{start}", questions=[],
                                 documents=[], source=source, baseline=baseline,
                                 baseline_bpb=run["baseline_bpb"] if start == 0 else None,
                                 experiments=list(window)))
    return tasks
