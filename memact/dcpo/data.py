"""Training sequences: from trajectories (JSONL or in memory) to padded micro-batches.

A training sequence is one DCPO segment: ``tokens = prompt_ids + response_ids``; the model
predicts ``tokens[1:]`` from ``tokens[:-1]``, and the targets that are trained are the
response tokens whose loss mask is 1 (the generated ones). Everything per token below is
aligned to the *targets*: position j holds the prediction of ``tokens[j + 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memact.trajectory import Segment, TrajectoryFormatError, read_jsonl


class DataError(ValueError):
    """Bad training data; the message names the file, line and segment."""


@dataclass
class TrainSequence:
    """One segment ready for training.

    Attributes:
        tokens: [P + R] prompt ids then response ids.
        prompt_len: P, tokens of the segment's context C_i.
        loss_mask: [R] 1 on generated (trained) tokens, 0 on tool tokens.
        rollout_logprobs: [R] engine log-probs of the generated tokens (0.0 elsewhere), nats.
        advantage: the trajectory's advantage (DCPO; 0 for SFT).
        traj_id: trajectory id, unique within the optimizer step (for the ``trajectory`` loss).
        group: prompt index within the step.
    """

    tokens: list[int]
    prompt_len: int
    loss_mask: list[int]
    rollout_logprobs: list[float]
    advantage: float = 0.0
    traj_id: int = 0
    group: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)

    @classmethod
    def from_segment(cls, seg: Segment, **kw: Any) -> TrainSequence:
        return cls(seg.prompt_ids + seg.response_ids, len(seg.prompt_ids), list(seg.loss_mask), list(seg.logprobs),
                   **kw)


def read_trajectories(path: str | Path, max_seq_len: int, vocab_size: int | None = None) -> list[TrainSequence]:
    """Every segment of a trajectory JSONL file (``memact.trajectory``), checked before any
    training starts.

    Each sequence's ``traj_id`` is its line's index (0-based), ``group`` the file's group field.

    Raises:
        DataError: what :func:`memact.trajectory.read_jsonl` rejects, a segment longer than
            ``max_seq_len``, or (given ``vocab_size``) a token id outside ``0..vocab_size-1``;
            the message names the line (1-based) and segment index.
    """
    out: list[TrainSequence] = []
    try:
        for row in read_jsonl(path):
            for s, seg in enumerate(row.segments):
                if len(seg) > max_seq_len:
                    raise DataError(f"{path}:{row.line} segment {s}: {len(seg)} tokens is longer than "
                                    f"batch.max_seq_len={max_seq_len}; raise batch.max_seq_len or roll out with a "
                                    "smaller --context-budget")
                if vocab_size is not None:
                    bad = next((t for t in (*seg.prompt_ids, *seg.response_ids) if not 0 <= t < vocab_size), None)
                    if bad is not None:
                        raise DataError(f"{path}:{row.line} segment {s}: token id {bad} is outside the model's "
                                        f"vocabulary (0..{vocab_size - 1}); was this file rolled out with another "
                                        "tokenizer?")
                out.append(TrainSequence.from_segment(seg, traj_id=row.index, group=row.group))
    except TrajectoryFormatError as err:
        raise DataError(str(err)) from None
    if not out:
        raise DataError(f"trajectories file {str(path)!r} holds no segments")
    return out


def pack_micro_batches(lengths: list[int], max_tokens: int, pad_to_multiple_of: int = 1) -> list[list[int]]:
    """Split sequences into micro-batches whose padded size (rows x length) fits ``max_tokens``.

    Sequences are taken longest first so that rows of similar length share a batch (little
    padding); the result is deterministic for given lengths.

    Returns:
        Lists of indices into ``lengths``; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_len = 0
    for i in order:
        width = padded_length(max(cur_len, lengths[i]), pad_to_multiple_of)
        if cur and width * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, cur_len = [], 0
            width = padded_length(lengths[i], pad_to_multiple_of)
        if width > max_tokens:
            raise ValueError(f"a sequence of {lengths[i]} tokens (padded {width}) exceeds the micro-batch "
                             f"budget batch.max_tokens_per_micro_batch={max_tokens}")
        cur.append(i)
        cur_len = max(cur_len, lengths[i])
    if cur:
        batches.append(cur)
    return batches


def padded_length(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


@dataclass
class PackedRows:
    """The model's view of a micro-batch when segments share rows (``memact.dcpo.packing``).

    The loss still sees the one-row-per-segment tensors of :class:`MicroBatch`; only the
    decoder runs on these rows, and ``gather_index`` maps its output back.

    Attributes:
        input_ids: [R, W] packed tokens (pad_id where nothing is placed).
        position_ids: [R, W] each token's position within its own segment (restarts at 0 per
            segment; a shared prefix token has the same position in every segment holding it).
        attention_mask: [R, 1, W, W] True where query token q may attend to key k (bool for
            sdpa; an additive float mask for eager). A pad slot attends to itself only, so no
            softmax row is empty (an empty row gives NaN, and NaN leaks into gradients).
        gather_index: [N] for each trained target of the micro-batch (row-major order of
            ``MicroBatch.loss_mask``), the flat index r * W + w of the packed slot whose hidden
            state predicts it.
        n_slots: filled slots (shared tokens counted once): the tokens the decoder really computes.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    gather_index: torch.Tensor
    n_slots: int = 0

    def to(self, device: torch.device | str) -> PackedRows:
        return PackedRows(self.input_ids.to(device), self.position_ids.to(device), self.attention_mask.to(device),
                          self.gather_index.to(device), self.n_slots)


@dataclass
class MicroBatch:
    """Padded tensors of a few sequences; per-token tensors are [B, L-1], aligned to targets.

    Attributes:
        input_ids: [B, L] right-padded tokens (padding is after every real token, so causal
            attention never lets a real token see it: no attention mask is needed).
        target_ids: [B, L-1] the token predicted at each position.
        loss_mask: [B, L-1] bool, True where the target is a trained (generated) token.
        rollout_logprobs: [B, L-1] engine log-probs on the mask, 0 elsewhere (nats).
        advantages: [B] one advantage per sequence.
        traj_index: [B] trajectory ids.
        old_logprobs, ref_logprobs: [B, L-1] filled by the trainer (nats), or None.
        is_weights: [B, L-1] truncated importance weights of the rollout mismatch (``dcpo.tis``), or None.
        index: positions of these sequences in the step's list.
        n_real_tokens: tokens of the sequences before padding (throughput counts these).
        packed: the packed rows the decoder runs on instead of ``input_ids``, or None.
        shared_prefix: leading tokens every row has in common, run once and reused through the
            KV cache (``memact.dcpo.modeling.final_hidden_states``); 0 = no reuse.
    """

    input_ids: torch.Tensor
    target_ids: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    advantages: torch.Tensor
    traj_index: torch.Tensor
    index: list[int]
    n_real_tokens: int = 0
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    packed: PackedRows | None = None
    shared_prefix: int = 0
    is_weights: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> MicroBatch:
        def mv(t):
            return None if t is None else t.to(device)
        return MicroBatch(mv(self.input_ids), mv(self.target_ids), mv(self.loss_mask), mv(self.rollout_logprobs),
                          mv(self.advantages), mv(self.traj_index), self.index, self.n_real_tokens, mv(self.old_logprobs),
                          mv(self.ref_logprobs), None if self.packed is None else self.packed.to(device),
                          self.shared_prefix, mv(self.is_weights))


def collate(seqs: list[TrainSequence], index: list[int], pad_id: int, pad_to_multiple_of: int = 1) -> MicroBatch:
    """Right-pad ``seqs`` into one :class:`MicroBatch` (``index``: their positions in the step)."""
    width = padded_length(max(len(s) for s in seqs), pad_to_multiple_of)
    b = len(seqs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width - 1), dtype=torch.bool)
    rollout = torch.zeros((b, width - 1), dtype=torch.float32)
    for row, s in enumerate(seqs):
        input_ids[row, :len(s)] = torch.tensor(s.tokens, dtype=torch.long)
        # response token i is target position prompt_len - 1 + i
        start, n_resp = s.prompt_len - 1, len(s.loss_mask)
        mask[row, start:start + n_resp] = torch.tensor(s.loss_mask, dtype=torch.bool)
        rollout[row, start:start + n_resp] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    return MicroBatch(
        input_ids=input_ids,
        target_ids=input_ids[:, 1:].clone(),
        loss_mask=mask,
        rollout_logprobs=rollout.masked_fill(~mask, 0.0),
        advantages=torch.tensor([s.advantage for s in seqs], dtype=torch.float32),
        traj_index=torch.tensor([s.traj_id for s in seqs], dtype=torch.long),
        index=list(index),
        n_real_tokens=sum(len(s) for s in seqs),
    )


def micro_batches(seqs: list[TrainSequence], max_tokens: int, pad_id: int, pad_to_multiple_of: int = 1
                  ) -> list[MicroBatch]:
    """Pack and collate: the step's sequences as micro-batches within the token budget."""
    groups = pack_micro_batches([len(s) for s in seqs], max_tokens, pad_to_multiple_of)
    return [collate([seqs[i] for i in g], g, pad_id, pad_to_multiple_of) for g in groups]
