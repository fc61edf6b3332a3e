"""Shared-prefix row planning (``memact.dcpo.prefix``) and the tree layout against one row per segment."""

from __future__ import annotations

import pytest
import torch

from memact.dcpo.prefix import common_prefix_len, plan_rows


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([7, 8], [7, 8]) == 2


def test_plan_rows_shares_prefix_slots_and_respects_row_len():
    toks = [[1, 2, 3, 9], [5, 6], [1, 2, 3, 4, 4], [1, 2, 7]]
    rows = plan_rows(toks, row_len=10, share_prefix=True)
    placed = sorted(i for r in rows for i in r.members)
    assert placed == [0, 1, 2, 3]
    for r in rows:
        assert r.width <= 10
        for i, slots in zip(r.members, r.slots):
            assert len(slots) == len(toks[i])
            assert slots == sorted(slots) and len(set(slots)) == len(slots)
    # sorted order [1,2,3,4,4], [1,2,3,9], [1,2,7], [5,6]: 5 + 1 + 1 + 2 = 9 slots in one row
    first = rows[0]
    by_member = dict(zip(first.members, first.slots))
    assert by_member[2][:3] == by_member[0][:3]  # [1, 2, 3] computed once
    assert by_member[3][:2] == by_member[2][:2]
    assert sum(r.width for r in rows) == 5 + 1 + 1 + 2


def test_plan_rows_without_sharing_is_block_packing():
    toks = [[1, 2, 3], [1, 2, 3], [4]]
    rows = plan_rows(toks, row_len=4, share_prefix=False)
    assert [r.width for r in rows] == [3, 4]  # [1,2,3] alone (the copy does not fit), then [1,2,3] + [4]
    assert all(len(set(s for ss in r.slots for s in ss)) == r.width for r in rows)


@pytest.mark.parametrize("share", [False, True])
def test_pack_rows_mask_is_each_segments_causal_path(share):
    from memact.dcpo.data import TrainSequence
    from memact.dcpo.packing import packed_micro_batches

    seqs = [TrainSequence([1, 2, 3, 4], 2, [1, 1], [0.0, 0.0]), TrainSequence([1, 2, 5], 2, [1], [0.0])]
    (mb,) = packed_micro_batches(seqs, max_tokens=64, pad_id=0, pad_to_multiple_of=8, share_prefix=share)
    p = mb.packed
    assert p.n_slots == (5 if share else 7)
    m = p.attention_mask[0, 0]
    assert m.shape == (8, 8) and m.diagonal().all()  # pad slots see themselves
    # every query's allowed keys are exactly the slots of its own prefix, by position id
    for q in range(p.n_slots):
        keys = m[q].nonzero().flatten()
        assert p.position_ids[0, keys].tolist() == list(range(int(p.position_ids[0, q]) + 1))
    assert p.gather_index.numel() == int(mb.loss_mask.sum()) == 3
    # the slot read for each trained target holds the token just before it, as in the unpacked rows
    assert torch.equal(p.input_ids.flatten()[p.gather_index], mb.input_ids[:, :-1][mb.loss_mask])
