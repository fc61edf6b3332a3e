"""Micro-batches with several segments per row: packing, and shared prefixes laid out as a tree.

Four layouts of the same micro-batch, chosen by ``batch.layout``:

- ``rows`` (default): one right-padded row per segment; micro-batches bin segments of similar
  length (``memact.dcpo.data.micro_batches``), so padding is small.
- ``prefix``: rows, grouped so that neighbours share a head, which runs once; its KV cache
  serves every row's suffix (``prefix_micro_batches``).
- ``packed``: segments placed one after another in rows of at most ``batch.packed_row_len``
  tokens; ``position_ids`` restart at 0 for each segment and a block-diagonal causal mask
  keeps segments from seeing each other.
- ``tree``: as packed, but a segment reuses the slots of the tokens it shares with the
  segment placed before it (``memact.dcpo.prefix``); its tokens attend along its own path.

Why a 4D mask rather than transformers' own packed-sequence path: transformers 5.19 does
detect packing from ``position_ids`` that restart (``masking_utils.find_packed_sequence_indices``,
applied for sdpa too when no 2D mask is given), but that only expresses block-diagonal
segments, not a shared prefix; a 4D mask passed as ``attention_mask`` is used as is
(``_preprocess_mask_arguments``: "If the mask is already 4D, simply return as-is"), and
covers both. flash_attention_2 takes no 4D mask, so these layouts need sdpa or eager.

The loss never sees the packed rows: :class:`MicroBatch` keeps its one-row-per-segment
[B, L-1] tensors, and ``PackedRows.gather_index`` maps each trained target to the packed
slot whose hidden state predicts it (``memact.dcpo.modeling.token_logprobs``).
"""

from __future__ import annotations

from typing import Any

import torch

from memact.dcpo.data import (
    MicroBatch,
    PackedRows,
    TrainSequence,
    collate,
    micro_batches,
    pack_micro_batches,
    padded_length,
)
from memact.dcpo.prefix import Row, common_prefix_len, plan_rows

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # take a 4D attention mask
LAYOUTS = ("rows", "prefix", "packed", "tree")


def pack_rows(seqs: list[TrainSequence], rows: list[Row], pad_id: int, pad_to_multiple_of: int = 1,
              mask_dtype: torch.dtype = torch.bool) -> PackedRows:
    """Tensors of ``rows`` (as planned by ``plan_rows`` over ``seqs``) for one micro-batch.

    The segments' order in the micro-batch (its [B, ...] tensors) is the rows' member order.

    Args:
        mask_dtype: torch.bool for sdpa (True = attend), or a float dtype for eager (an
            additive mask: 0 = attend, dtype min = blocked).
    """
    width = padded_length(max(r.width for r in rows), pad_to_multiple_of)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    # A pad slot sees itself only: an all-blocked softmax row would be NaN (and NaN gradients).
    allowed = torch.eye(width, dtype=torch.bool).repeat(n_rows, 1, 1)
    gather: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        for i, slots in zip(row.members, row.slots):
            s = seqs[i]
            idx = torch.tensor(slots, dtype=torch.long)  # [L] slot of each token
            input_ids[r, idx] = torch.tensor(s.tokens, dtype=torch.long)
            position_ids[r, idx] = torch.arange(len(s))
            # Token j sees tokens 0..j of its own segment; shared slots get the same rows from
            # every segment holding them, since their paths agree up to there.
            causal = torch.ones(len(s), len(s), dtype=torch.bool).tril()
            allowed[r][idx[:, None], idx[None, :]] |= causal
            # Target position j (predicting token j + 1) is read from token j's slot.
            start, mask = s.prompt_len - 1, torch.tensor(s.loss_mask, dtype=torch.bool)
            trained = torch.arange(start, start + len(s.loss_mask))[mask]
            gather.append(r * width + idx[trained])
    if mask_dtype == torch.bool:
        attention_mask = allowed[:, None]
    else:
        attention_mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(
            ~allowed, torch.finfo(mask_dtype).min)[:, None]
    return PackedRows(input_ids, position_ids, attention_mask,
                      torch.cat(gather) if gather else torch.zeros(0, dtype=torch.long),
                      n_slots=sum(r.width for r in rows))


def packed_micro_batches(seqs: list[TrainSequence], max_tokens: int, pad_id: int, pad_to_multiple_of: int = 1,
                         row_len: int = 2048, share_prefix: bool = True, mask_dtype: torch.dtype = torch.bool
                         ) -> list[MicroBatch]:
    """The step's sequences as micro-batches of packed rows within the token budget.

    Args:
        max_tokens: budget of a micro-batch: rows x padded row width.
        row_len: most slots in one row.
        share_prefix: tree layout (shared prefixes computed once) instead of plain packing.

    Returns:
        Micro-batches whose ``packed`` field is set; their one-row-per-segment tensors (what
        the loss reads) hold the same segments in the rows' member order.
    """
    rows = plan_rows([s.tokens for s in seqs], max(row_len, 1), share_prefix)
    out = []
    for group in pack_micro_batches([r.width for r in rows], max_tokens, pad_to_multiple_of):
        mb_rows = [rows[g] for g in group]
        index = [i for r in mb_rows for i in r.members]
        # Renumber members to positions within this micro-batch for pack_rows.
        local = [TrainSequence(**vars(seqs[i])) for i in index]
        pos, renumbered = 0, []
        for r in mb_rows:
            renumbered.append(Row(list(range(pos, pos + len(r.members))), r.slots, r.width))
            pos += len(r.members)
        mb = collate(local, index, pad_id, pad_to_multiple_of)
        mb.packed = pack_rows(local, renumbered, pad_id, pad_to_multiple_of, mask_dtype)
        out.append(mb)
    return out


def prefix_micro_batches(seqs: list[TrainSequence], max_tokens: int, pad_id: int, pad_to_multiple_of: int = 1
                         ) -> list[MicroBatch]:
    """Micro-batches of one row per segment whose common head runs once (``MicroBatch.shared_prefix``).

    Segments are taken in sorted token order, so neighbours share the longest heads (the
    segments of one trajectory, then the trajectories of one prompt), and a micro-batch is
    filled while its computed tokens, P + rows x (padded width - P), fit ``max_tokens``.
    """
    order = sorted(range(len(seqs)), key=lambda i: (seqs[i].tokens, i))
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        trial = cur + [i]
        width = padded_length(max(len(seqs[j]) for j in trial), pad_to_multiple_of)
        shared = min(common_prefix_len(seqs[trial[0]].tokens, seqs[i].tokens), width - 1)
        if cur and shared + len(trial) * (width - shared) > max_tokens:
            groups.append(cur)
            trial = [i]
        cur = trial
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        mb = collate([seqs[i] for i in g], g, pad_id, pad_to_multiple_of)
        width = mb.input_ids.shape[1]
        # Sorted order: the head the first and last rows share is shared by all of them.
        shared = min(common_prefix_len(seqs[g[0]].tokens, seqs[g[-1]].tokens), width - 1)
        mb.shared_prefix = shared if len(g) > 1 else 0
        out.append(mb)
    return out


def build_micro_batches(seqs: list[TrainSequence], batch_cfg: Any, pad_id: int, attn_implementation: str = "sdpa",
                        dtype: torch.dtype = torch.float32) -> list[MicroBatch]:
    """Micro-batches in the layout the config asks for (``batch.layout``).

    Args:
        batch_cfg: a ``BatchConfig``.
        attn_implementation: the model's attention kernel (packed layouts need a 4D mask).
        dtype: the model's dtype (eager takes an additive mask of that dtype).
    """
    b = batch_cfg
    if b.layout not in LAYOUTS:
        raise ValueError(f"batch.layout={b.layout!r}: expected one of {LAYOUTS}")
    if b.layout == "rows":
        return micro_batches(seqs, b.max_tokens_per_micro_batch, pad_id, b.pad_to_multiple_of)
    if b.layout == "prefix":
        return prefix_micro_batches(seqs, b.max_tokens_per_micro_batch, pad_id, b.pad_to_multiple_of)
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"batch.layout={b.layout} needs model.attn_implementation in "
                         f"{ATTN_IMPLEMENTATIONS} (a 4D attention mask), got {attn_implementation!r}")
    mask_dtype = torch.bool if attn_implementation == "sdpa" else dtype
    return packed_micro_batches(seqs, b.max_tokens_per_micro_batch, pad_id, b.pad_to_multiple_of,
                                row_len=b.packed_row_len or b.max_seq_len, share_prefix=b.layout == "tree",
                                mask_dtype=mask_dtype)
