"""Packed and prefix-tree micro-batches give the log-probs, loss and gradients of one row per segment."""

from __future__ import annotations

import pytest
import torch

from memact.dcpo.config import load_config
from memact.dcpo.data import TrainSequence, micro_batches
from memact.dcpo.distributed import DistInfo
from memact.dcpo.modeling import token_logprobs
from memact.dcpo.packing import build_micro_batches, packed_micro_batches, prefix_micro_batches
from memact.dcpo.trainer import UpdateStats, accumulate
from memact.trajectory import segment_trajectory

ONE = DistInfo(rank=0, world_size=1, local_rank=0)
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def model_and_segments(tokenizer):
    """A 2-layer random fp32 model and the segments of 2 scripted K=2 trajectories,
    which share their system prompt and, within a trajectory, the task and surviving records."""
    from memact.agent.rollout import rollout
    from memact.models.model import ModelPreset, build_model

    torch.manual_seed(0)
    model = build_model(ModelPreset(**TINY), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id).float()
    model.config._attn_implementation = "sdpa"
    model.train()
    trajs = rollout("scripted", 2, 2, progress=False)
    seqs = [TrainSequence.from_segment(s, advantage=1.0 - i, traj_id=i, group=i // 2)
            for i, t in enumerate(trajs) for s in segment_trajectory(t.calls)]
    return model, tokenizer.pad_token_id, seqs


def _by_segment(mbs, logp):
    """{segment index: its trained log-probs} from per-micro-batch [B, L-1] tensors."""
    out = {}
    for mb, lp in zip(mbs, logp):
        for row, i in enumerate(mb.index):
            out[i] = lp[row][mb.loss_mask[row]]
    return out


def _set_old(mbs, seqs, noise):
    """Old / reference log-probs tied to (segment, response position): equal across layouts."""
    for mb in mbs:
        old = torch.zeros(mb.loss_mask.shape)
        for row, i in enumerate(mb.index):
            start = seqs[i].prompt_len - 1
            old[row, start:start + len(noise[i])] = noise[i]
        mb.old_logprobs = old * mb.loss_mask
        mb.ref_logprobs = (old - 0.1) * mb.loss_mask


@pytest.mark.parametrize("layout", ["packed", "tree", "kv_prefix"])
def test_packed_logprobs_loss_and_grads_match_one_row_per_segment(model_and_segments, layout, shim_engine):
    model, pad_id, seqs = model_and_segments
    cfg = load_config(None, ["dcpo.kl_coef=0.05", "dcpo.entropy_coef=0.01", "dcpo.clip_low=0.1",
                             "batch.max_seq_len=4096"])
    naive = micro_batches(seqs, 8192, pad_id, 64)
    if layout == "kv_prefix":  # budget for a few micro-batches, so several heads are reused
        packed = prefix_micro_batches(seqs, 1500, pad_id, 64)
        assert len(packed) > 1 and all(mb.shared_prefix > 0 for mb in packed if len(mb.index) > 1)
    else:
        packed = packed_micro_batches(seqs, 8192, pad_id, 64, row_len=2048, share_prefix=layout == "tree")
    assert sorted(i for mb in packed for i in mb.index) == list(range(len(seqs)))
    if layout == "tree":  # the shared heads are computed once
        assert sum(mb.packed.n_slots for mb in packed) < 0.7 * sum(len(s) for s in seqs)

    with torch.no_grad():
        a = _by_segment(naive, [token_logprobs(model, mb, 0.8)[0] for mb in naive])
        b = _by_segment(packed, [token_logprobs(model, mb, 0.8)[0] for mb in packed])
    for i in range(len(seqs)):
        torch.testing.assert_close(b[i], a[i], atol=1e-5, rtol=0)

    # Old log-probs around the current ones, so the clip binds on some tokens.
    noise = {i: a[i] + 0.3 * torch.randn(len(a[i]), generator=torch.Generator().manual_seed(i)) for i in a}
    full = {i: torch.zeros(len(s.loss_mask)) for i, s in enumerate(seqs)}
    for i, s in enumerate(seqs):
        full[i][torch.tensor(s.loss_mask, dtype=torch.bool)] = noise[i]
    losses, grads = [], []
    for mbs in (naive, packed):
        _set_old(mbs, seqs, full)
        model.zero_grad(set_to_none=True)
        stats = UpdateStats(grad_norms=[])
        accumulate(shim_engine(model), mbs, cfg, ONE, stats)
        losses.append(stats)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[0].loss == pytest.approx(losses[1].loss, abs=1e-6)
    assert losses[0].clipped_tokens == losses[1].clipped_tokens > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


def test_build_micro_batches_follows_config(model_and_segments):
    _, pad_id, seqs = model_and_segments
    kv = load_config(None, ["batch.layout=prefix", "batch.max_seq_len=4096"]).batch
    assert all(mb.packed is None and mb.shared_prefix > 0 for mb in build_micro_batches(seqs, kv, pad_id))
    b = load_config(None, ["batch.layout=tree", "batch.max_seq_len=4096"]).batch
    mbs = build_micro_batches(seqs, b, pad_id)
    assert all(mb.packed is not None and mb.packed.attention_mask.dtype == torch.bool for mb in mbs)
    eager = build_micro_batches(seqs, b, pad_id, "eager", torch.float32)
    assert eager[0].packed.attention_mask.dtype == torch.float32
    with pytest.raises(ValueError, match="attn_implementation"):
        build_micro_batches(seqs, b, pad_id, "flash_attention_2")
    plain = load_config(None, ["batch.max_seq_len=4096"]).batch
    assert all(mb.packed is None for mb in build_micro_batches(seqs, plain, pad_id))
