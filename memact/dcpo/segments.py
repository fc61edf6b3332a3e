"""DCPO segmentation: cut a trajectory into sequences at every context edit.

Walk the generation calls in order. A call whose prompt extends the previous call's
prompt + output (+ the tool tokens between them) continues the current segment; a call
whose prompt does not is the start of a new one. Segment i = (C_i, y_i): C_i is the
prompt of its first call, y_i every token after it up to and including the output of its
last call. The loss mask is 1 exactly on generated tokens and 0 on tool tokens, so each
generated token is trained once, under the exact context it was generated in.

The rule never looks at what the edit was, so it also handles sliding-window and
summarising baselines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


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


def _field(call: Any, name: str):
    return call[name] if isinstance(call, dict) else getattr(call, name)


def segment_trajectory(calls: Sequence[Any]) -> list[Segment]:
    """Segments of one trajectory.

    Args:
        calls: generation calls in order; each has ``prompt_ids``, ``output_ids`` and
            ``logprobs`` (attributes or dict keys), ``len(logprobs) == len(output_ids)``.
    """
    segments: list[Segment] = []
    cur: Segment | None = None
    context: list[int] = []  # cur.prompt_ids + cur.response_ids
    for i, call in enumerate(calls):
        prompt, output, logprobs = (list(_field(call, k)) for k in ("prompt_ids", "output_ids", "logprobs"))
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
