"""The trajectory: what the agent loop produces and every trainer consumes.

One home for the data that crosses from rollouts to training and evaluation:

- :class:`Call`: one generation call exactly as the engine saw and produced it; a
  :class:`Trajectory` is a finished episode's calls, reward and outcome.
- :func:`segment_trajectory`: DCPO's cut of a trajectory into :class:`Segment` s, one per
  context edit.
- The JSONL schema (:func:`to_json`, :func:`write_jsonl`, :func:`read_jsonl`): one line per
  trajectory, its calls and its segments. ``SCHEMA_VERSION`` 1 is the format ``memact rollout``
  has always written: a row without a ``schema`` key is version 1; a later version writes its
  number in that key and the reader refuses one it does not know.
- :func:`check_invariants`: token exactness and exactly-once, for tests and for anyone
  validating trajectories of their own.
- :func:`trajectory_stats`: the one summary of a batch of trajectories that rollouts,
  evaluation and DCPO's step metrics report.

The segmentation rule: walk the calls in order. A call whose prompt extends the previous
call's prompt + output (+ the tool tokens between them) continues the current segment; a call
whose prompt does not starts a new one. Segment i = (C_i, y_i): C_i is the prompt of its first
call, y_i every token after it up to and including the output of its last call. The loss mask
is 1 exactly on generated tokens and 0 on tool tokens, so each generated token is trained
once, under the exact context it was generated in. The rule never looks at what the edit was,
so it also handles the sliding-window and summarising baselines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memact.util.stats import mean, std

SCHEMA_VERSION = 1
SEGMENT_KEYS = ("prompt_ids", "response_ids", "loss_mask", "logprobs")


class TrajectoryFormatError(ValueError):
    """A trajectory JSONL line that does not follow the schema; the message names file, line and field."""


@dataclass
class Call:
    """One generation call, exactly as the engine saw and produced it."""

    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"
    kind: str = ""  # what the env made of it: tool | memory | error | final | summary | broken
    edited_before: bool = False  # a strategy edited the context just before this call

    def to_json(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids, "logprobs": self.logprobs}


@dataclass
class Trajectory:
    """A finished episode: the calls, the reward and what happened.

    ``metrics`` holds the episode's counts (``memact.agent.loop.Episode.finish`` names them:
    steps, memory_actions, peak/mean context tokens, total input/output tokens, overflow...).
    """

    task_id: str
    reward: float
    calls: list[Call]
    metrics: dict[str, Any]
    correct: list[bool] = field(default_factory=list)
    answer: dict[str, str] | None = None
    error: str | None = None  # an engine failure that ended the episode
    group: int = 0  # index of the prompt this trajectory answers (for group advantages)


@dataclass
class Segment:
    """One training sequence.

    Attributes:
        prompt_ids: [P] the context of the segment's first call.
        response_ids: [R] generated and tool tokens after the prompt.
        loss_mask: [R] 1 on generated tokens, 0 on tool tokens.
        logprobs: [R] rollout log-prob of each generated token, 0.0 on tool tokens.
        call_indices: indices of the trajectory's calls this segment holds.
    """

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    call_indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def to_json(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "response_ids": self.response_ids, "loss_mask": self.loss_mask,
                "logprobs": self.logprobs}


# ----------------------------------------------------------------------------- segments


def segment_trajectory(calls: Sequence[Call]) -> list[Segment]:
    """Segments of one trajectory (the rule in the module docstring).

    Args:
        calls: generation calls in order, ``len(logprobs) == len(output_ids)`` for each.
    """
    segments: list[Segment] = []
    cur: Segment | None = None
    context: list[int] = []  # cur.prompt_ids + cur.response_ids
    for i, call in enumerate(calls):
        prompt, output, logprobs = list(call.prompt_ids), list(call.output_ids), list(call.logprobs)
        if len(logprobs) != len(output):
            raise ValueError(f"call {i}: {len(logprobs)} log-probs for {len(output)} output tokens")
        if not prompt:
            raise ValueError(f"call {i}: empty prompt")
        if cur is not None and len(prompt) >= len(context) and prompt[:len(context)] == context:
            gap = prompt[len(context):]  # tool response and markup: context, not trained
            cur.response_ids += gap
            cur.loss_mask += [0] * len(gap)
            cur.logprobs += [0.0] * len(gap)
        else:
            cur = Segment(prompt_ids=prompt)
            segments.append(cur)
        cur.response_ids += output
        cur.loss_mask += [1] * len(output)
        cur.logprobs += [float(x) for x in logprobs]
        cur.call_indices.append(i)
        context = cur.prompt_ids + cur.response_ids
    return segments


def check_invariants(calls: Sequence[Call], segments: Sequence[Segment]) -> None:
    """Assert the DCPO token-exactness and exactly-once invariants for one trajectory."""
    # Each call's context, rebuilt from its segment, equals the engine's prompt.
    seg_of = {}
    for s_idx, seg in enumerate(segments):
        offset = 0
        for ci in seg.call_indices:
            seg_of[ci] = s_idx
            call = calls[ci]
            prefix_len = len(call.prompt_ids) - len(seg.prompt_ids)
            assert seg.prompt_ids + seg.response_ids[:prefix_len] == call.prompt_ids
            out = seg.response_ids[prefix_len:prefix_len + len(call.output_ids)]
            assert out == call.output_ids
            assert seg.loss_mask[prefix_len:prefix_len + len(call.output_ids)] == [1] * len(call.output_ids)
            assert seg.logprobs[prefix_len:prefix_len + len(call.output_ids)] == call.logprobs
            offset = prefix_len + len(call.output_ids)
        assert offset == len(seg.response_ids)  # a segment ends with its last call's output
        assert len(seg.response_ids) == len(seg.loss_mask) == len(seg.logprobs)
    # Loss-mask tokens of all segments are exactly the generated tokens, each once, in order.
    trained = [t for seg in segments for t, m in zip(seg.response_ids, seg.loss_mask) if m]
    generated = [t for c in calls for t in c.output_ids]
    assert trained == generated
    assert sum(sum(s.loss_mask) for s in segments) == len(generated)
    assert sorted(seg_of) == list(range(len(calls)))
    # A new segment starts exactly after each context edit: the policy's own memory action,
    # a summary, or an edit a strategy made just before the call.
    for i in range(1, len(calls)):
        starts_new = seg_of[i] != seg_of[i - 1]
        edited = calls[i - 1].kind in ("memory", "summary") or calls[i].edited_before
        assert starts_new == edited, (i, calls[i - 1].kind)


# ----------------------------------------------------------------------------- the JSONL schema


def to_json(traj: Trajectory) -> dict[str, Any]:
    """The JSONL row of a trajectory (schema version 1), segments included."""
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


def write_jsonl(path: str | os.PathLike, rows: Sequence[Trajectory | dict[str, Any]]) -> None:
    """Write trajectories (or already-built rows) to a temporary file, then rename: no
    half-written output on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            row = to_json(row) if isinstance(row, Trajectory) else row
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


@dataclass
class StoredTrajectory:
    """One row of a trajectory file as read back: what training needs of it.

    Attributes:
        line: 1-based line number in the file (for messages).
        index: 0-based index among the file's trajectories.
        group: the row's ``group`` (prompt index), 0 when absent.
        reward: the row's reward, 0.0 when absent (SFT data need not carry one).
        segments: the row's segments, each checked.
    """

    line: int
    index: int
    group: int
    reward: float
    segments: list[Segment]


def read_jsonl(path: str | os.PathLike) -> Iterator[StoredTrajectory]:
    """The trajectories of a file written by :func:`write_jsonl` (or any file with the
    schema's ``segments`` lists), each checked as it is read.

    Raises:
        TrajectoryFormatError: a missing file, a line that is not a JSON trajectory, an
            unknown schema version, or a segment whose fields are missing or disagree in
            length; the message names the line (1-based) and segment index.
    """
    path = Path(path)
    if not path.is_file():
        raise TrajectoryFormatError(f"trajectories file {str(path)!r} does not exist")
    index = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                index += 1
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TrajectoryFormatError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                                            "expected one trajectory object per line") from err
            if not isinstance(row, dict) or not isinstance(row.get("segments"), list):
                raise TrajectoryFormatError(f"{where}: expected a trajectory object with a 'segments' list "
                                            "(as written by `memact rollout`)")
            version = row.get("schema", 1)
            if version != SCHEMA_VERSION:
                raise TrajectoryFormatError(f"{where}: trajectory schema {version!r}; this memact reads "
                                            f"schema {SCHEMA_VERSION}")
            segments = [_segment(seg, f"{where} segment {s}") for s, seg in enumerate(row["segments"])]
            yield StoredTrajectory(lineno, index, int(row.get("group", 0)), float(row.get("reward", 0.0)), segments)
            index += 1


def _segment(seg: Any, where: str) -> Segment:
    if not isinstance(seg, dict) or any(not isinstance(seg.get(k), list) for k in SEGMENT_KEYS):
        raise TrajectoryFormatError(f"{where}: expected an object with lists {', '.join(SEGMENT_KEYS)}")
    n_resp = len(seg["response_ids"])
    if len(seg["loss_mask"]) != n_resp or len(seg["logprobs"]) != n_resp:
        raise TrajectoryFormatError(f"{where}: response_ids, loss_mask and logprobs must have the same length, "
                                    f"got {n_resp}, {len(seg['loss_mask'])}, {len(seg['logprobs'])}")
    if not seg["prompt_ids"]:
        raise TrajectoryFormatError(f"{where}: empty prompt_ids")
    if any(m not in (0, 1) for m in seg["loss_mask"]):
        raise TrajectoryFormatError(f"{where}: loss_mask must hold only 0 and 1")
    return Segment(list(seg["prompt_ids"]), list(seg["response_ids"]), list(seg["loss_mask"]),
                   [float(x) for x in seg["logprobs"]])


# ----------------------------------------------------------------------------- statistics


def trajectory_columns(trajs: Sequence[Trajectory]) -> dict[str, list[float]]:
    """Per-trajectory values that :func:`trajectory_stats` summarises (lists concatenate over ranks)."""
    m = [t.metrics for t in trajs]
    return {
        "reward": [t.reward for t in trajs],
        "correct": [float(c) for t in trajs for c in t.correct],  # one entry per sub-question
        "context_mean": [x["mean_context_tokens"] for x in m],
        "context_peak": [x["peak_context_tokens"] for x in m],
        "memory_actions": [x["memory_actions"] for x in m],
        "overflow": [float(x["overflow"]) for x in m],
        "steps": [x["steps"] for x in m],
        "total_tokens": [x["total_input_tokens"] + x["total_output_tokens"] for x in m],
        "gen_tokens": [sum(len(c.output_ids) for c in t.calls) for t in trajs],
        "failed": [float(t.error is not None) for t in trajs],
    }


def trajectory_stats(trajs: Sequence[Trajectory] | dict[str, list[float]]) -> dict[str, float]:
    """The summary of a batch of trajectories (or of :func:`trajectory_columns`, e.g. gathered
    over ranks); each value is a mean over episodes unless its name says otherwise.

    Keys: ``episodes``; ``reward_mean``, ``reward_std``; ``accuracy`` (share of sub-questions
    answered right); ``context_mean`` (mean prompt length of a call); ``context_peak_mean`` and
    ``context_peak_max`` (an episode's largest context); ``memory_actions``; ``overflow_rate``;
    ``steps`` (turns); ``total_tokens`` (input + output over all calls); ``gen_tokens`` (sum of
    generated tokens); ``failed`` (episodes an engine error ended, a count).
    """
    c = trajs if isinstance(trajs, dict) else trajectory_columns(trajs)
    return {
        "episodes": len(c["reward"]),
        "reward_mean": mean(c["reward"]),
        "reward_std": std(c["reward"]),
        "accuracy": mean(c["correct"]),
        "context_mean": mean(c["context_mean"]),
        "context_peak_mean": mean(c["context_peak"]),
        "context_peak_max": max(c["context_peak"], default=0),
        "memory_actions": mean(c["memory_actions"]),
        "overflow_rate": mean(c["overflow"]),
        "steps": mean(c["steps"]),
        "total_tokens": mean(c["total_tokens"]),
        "gen_tokens": sum(c["gen_tokens"]),
        "failed": int(sum(c["failed"])),
    }
