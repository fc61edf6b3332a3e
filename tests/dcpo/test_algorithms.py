"""DCPO algorithm pieces against hand-computed values."""

import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memact.dcpo.advantages import broadcast_to_segments, group_advantages
from memact.dcpo.losses import StepNormalizer, aggregate, dcpo_loss, kl_k3, policy_loss_terms
from memact.dcpo.sampling import sample_segments

# ---------------------------------------------------------------- advantages

# Group "a" = rewards 1, 2, 3 (mean 2, sample std 1); group "b" = 0, 4 (mean 2, sample std
# sqrt(8) = 2.8284), interleaved so the grouping, not the position, decides.
REWARDS = [1.0, 0.0, 2.0, 4.0, 3.0]
GROUPS = ["a", "b", "a", "b", "a"]


def test_grpo_std_uses_sample_std():
    adv = group_advantages(REWARDS, GROUPS)
    expected = torch.tensor([-1.0, -2 / math.sqrt(8), 0.0, 2 / math.sqrt(8), 1.0])
    assert torch.allclose(adv, expected, atol=1e-5)
    # The population std (sqrt(2/3) for "a") would give 1.2247 here.
    assert abs(adv[4].item() - 1.0) < 1e-5


def test_grpo_norm_none_is_mean_centred_only():
    adv = group_advantages(REWARDS, GROUPS, norm="none")
    assert adv.tolist() == [-1.0, -2.0, 0.0, 2.0, 1.0]


def test_rloo_leave_one_out_baseline():
    # a: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; b: 0 - 4 = -4, 4 - 0 = 4.
    adv = group_advantages(REWARDS, GROUPS, estimator="rloo", norm="none")
    assert adv.tolist() == [-1.5, -4.0, 0.0, 4.0, 1.5]
    adv = group_advantages(REWARDS, GROUPS, estimator="rloo", norm="std")
    expected = torch.tensor([-1.5, -4 / math.sqrt(8), 0.0, 4 / math.sqrt(8), 1.5])
    assert torch.allclose(adv, expected, atol=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("norm", ["std", "none"])
def test_equal_rewards_and_single_member_give_exact_zero(norm, estimator):
    # 0.1 three times: mean and std are off by rounding, which must not become noise or NaN.
    # (In float64, mean([0.1] * 3) - 0.1 = -1.4e-17 and std = 1.7e-17; with eps=0 that is -0.8.)
    rewards = torch.tensor([0.1, 0.1, 0.1, 7.0, 1.0, 0.0], dtype=torch.float64)
    for eps in (1e-6, 0.0):
        adv = group_advantages(rewards, [0, 0, 0, 1, 2, 2], norm=norm, estimator=estimator, eps=eps)
        assert not torch.isnan(adv).any()
        assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert adv[4].item() > 0 > adv[5].item()


def test_group_ids_as_tensor_and_dtype():
    adv = group_advantages(torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([5, 5]), norm="none")
    assert adv.dtype == torch.float64
    assert adv.tolist() == [-1.0, 1.0]


def test_advantage_validation_names_argument():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="norm"):
        group_advantages([1.0], [0], norm="mad")
    with pytest.raises(ValueError, match="estimator"):
        group_advantages([1.0], [0], estimator="ppo")
    with pytest.raises(ValueError, match="rewards"):
        group_advantages([1.0, float("nan")], [0, 0])


def test_broadcast_to_segments():
    adv = torch.tensor([0.5, -1.0, 2.0])
    assert broadcast_to_segments(adv, [0, 0, 2, 1, 2]).tolist() == [0.5, 0.5, 2.0, -1.0, 2.0]
    with pytest.raises(ValueError, match="seg_traj_index"):
        broadcast_to_segments(adv, [3])


# ---------------------------------------------------------------- sampling


def test_all_mode_every_segment_once_in_order():
    assert sample_segments([2, 0, 1]) == [(0, 0), (0, 1), (2, 0)]
    assert sample_segments([0, 0]) == []


@pytest.mark.parametrize("seed", range(5))
def test_round_robin_counts_and_no_early_reuse(seed):
    picks = sample_segments([1, 2, 5], mode="round_robin", n_seg=12, rng=random.Random(seed))
    assert len(picks) == 12
    # 4 full passes of 3 trajectories, each pass every trajectory once.
    ts = [t for t, _ in picks]
    assert [sorted(ts[i:i + 3]) for i in range(0, 12, 3)] == [[0, 1, 2]] * 4
    per_traj = {t: [s for tt, s in picks if tt == t] for t in range(3)}
    assert per_traj[0] == [0, 0, 0, 0]
    assert sorted(per_traj[1][:2]) == [0, 1]  # both used before any reuse
    assert all(0 <= s < 2 for s in per_traj[1])
    assert len(set(per_traj[2])) == 4  # 4 draws from 5 segments: none reused
    assert all(0 <= s < 5 for s in per_traj[2])


def test_round_robin_partial_pass_and_skips_empty():
    picks = sample_segments([1, 0, 2, 5], mode="round_robin", n_seg=5, rng=random.Random(0))
    ts = [t for t, _ in picks]
    assert sorted(ts[:3]) == [0, 2, 3] and len(set(ts[3:])) == 2 and set(ts[3:]) <= {0, 2, 3}
    assert sample_segments([0, 0], mode="round_robin", n_seg=3) == []


def test_round_robin_partial_pass_favours_no_trajectory():
    # 8 one-segment trajectories, 12 draws: the second pass takes 4 of them. In a fixed order
    # trajectories 0-3 counted twice in every group; at random each does half the time.
    twice = Counter()
    for seed in range(400):
        c = Counter(t for t, _ in sample_segments([1] * 8, "round_robin", 12, random.Random(seed)))
        twice.update(t for t, n in c.items() if n == 2)
    assert all(150 < twice[t] < 250 for t in range(8)), twice


def test_round_robin_is_reproducible_and_covers_before_repeating():
    a = sample_segments([3, 3], mode="round_robin", n_seg=6, rng=random.Random(7))
    b = sample_segments([3, 3], mode="round_robin", n_seg=6, rng=random.Random(7))
    assert a == b
    assert sorted(a) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_sampling_validation():
    with pytest.raises(ValueError, match="n_seg"):
        sample_segments([1, 2], mode="round_robin")
    with pytest.raises(ValueError, match="n_seg"):
        sample_segments([1, 2], mode="round_robin", n_seg=0)
    with pytest.raises(ValueError, match="mode"):
        sample_segments([1], mode="random")
    with pytest.raises(ValueError, match="segments_per_traj"):
        sample_segments([1, -1])


# ---------------------------------------------------------------- clipped surrogate and KL


def test_policy_loss_and_clip_indicator_on_known_ratios():
    ratios = torch.tensor([[0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5]], dtype=torch.float64)
    log_probs = ratios.log().requires_grad_()
    old = torch.zeros_like(ratios)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 4)
    loss, clipped = policy_loss_terms(log_probs, old, adv, mask)
    # A=+1: -min(r, clip(r)) -> clip binds only at 1.5 (1.2); A=-1: binds only at 0.5 (-0.8).
    assert torch.allclose(
        loss, torch.tensor([[-0.5, -0.9, -1.1, -1.2], [0.8, 0.9, 1.1, 1.5]], dtype=torch.float64)
    )
    assert clipped.tolist() == [[False, False, False, True], [True, False, False, False]]
    loss.sum().backward()
    assert log_probs.grad[0, 3] == 0 and log_probs.grad[1, 0] == 0  # clipped tokens get no gradient
    assert torch.isclose(log_probs.grad[0, 0], torch.tensor(-0.5, dtype=torch.float64))

    _, clipped_hi = policy_loss_terms(ratios.log(), old, adv, mask, clip_high=0.6)
    assert clipped_hi.tolist() == [[False] * 4, [True, False, False, False]]

    n = StepNormalizer.from_batch(mask, [0, 1])
    _, metrics = dcpo_loss(ratios.log(), old, adv, mask, n)
    assert metrics["clip_fraction"].item() == pytest.approx(0.25)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    # Masking out the two clipped tokens removes them from the fraction too.
    mask2 = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    _, metrics = dcpo_loss(ratios.log(), old, adv, mask2, StepNormalizer.from_batch(mask2, [0, 1]))
    assert metrics["clip_fraction"].item() == 0.0


def test_masked_garbage_does_not_leak():
    log_probs = torch.tensor([[-1.0, 80.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -80.0]])
    mask = torch.tensor([[1, 0]])
    loss, _ = dcpo_loss(log_probs, old, torch.tensor([1.0]), mask, StepNormalizer.from_batch(mask, [0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_probs.grad).all()
    assert log_probs.grad[0, 1] == 0


def test_kl_k3_known_values():
    lp = torch.tensor([math.log(0.5), math.log(0.3)], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25), math.log(0.3)], dtype=torch.float64)
    kl = kl_k3(lp, ref)
    assert kl[0].item() == pytest.approx(0.5 + math.log(2) - 1)  # 0.1931
    assert kl[1].item() == 0.0
    # Clamped log-ratio: r = 20 instead of 1000.
    big = kl_k3(torch.tensor([0.0]), torch.tensor([1000.0]))
    assert big.item() == pytest.approx(math.exp(20) - 21, rel=1e-6)
    assert kl_k3(torch.randn(50), torch.randn(50)).min() >= 0


def test_dcpo_loss_kl_and_entropy_terms():
    lp = torch.full((1, 2), math.log(0.5), dtype=torch.float64)
    ref = torch.full((1, 2), math.log(0.25), dtype=torch.float64)
    ent = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    n = StepNormalizer.from_batch(mask, [0])
    # ratio 1, A = 2: pg = -2; kl = 0.1931 per token; entropy mean 2.
    loss, m = dcpo_loss(
        lp, lp, torch.tensor([2.0]), mask, n, kl_coef=0.1, ref_log_probs=ref, entropy_coef=0.01, entropy=ent
    )
    assert loss.item() == pytest.approx(-2.0 + 0.1 * (math.log(2) - 0.5) - 0.01 * 2.0)
    assert m["kl_mean"].item() == pytest.approx(math.log(2) - 0.5)
    assert m["entropy_mean"].item() == pytest.approx(2.0)
    assert m["pg_loss"].item() == pytest.approx(-2.0)


def test_loss_validation_names_argument():
    x = torch.zeros(2, 3)
    n = StepNormalizer.from_batch(torch.ones(2, 3), [0, 1])
    with pytest.raises(ValueError, match="advantages"):
        policy_loss_terms(x, x, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="old_log_probs"):
        policy_loss_terms(x, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss_mask"):
        policy_loss_terms(x, x, torch.zeros(2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="loss_mask"):
        policy_loss_terms(x, x, torch.zeros(2), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="ref_log_probs"):
        dcpo_loss(x, x, torch.zeros(2), torch.ones(2, 3), n, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        dcpo_loss(x, x, torch.zeros(2), torch.ones(2, 3), n, entropy_coef=0.1)
    with pytest.raises(ValueError, match="traj_index"):
        aggregate(x, torch.ones(2, 3), "trajectory", n)
    with pytest.raises(ValueError, match="mode"):
        aggregate(x, torch.ones(2, 3), "sum", n)
    with pytest.raises(ValueError, match="traj_index"):
        StepNormalizer.from_batch(torch.ones(2, 3), [0])


# ---------------------------------------------------------------- aggregation

VALUES = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4)
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]])
TRAJ = [0, 0, 1]
# Row sums over the mask: 1+2 = 3 (2 tokens), 5+6+7 = 18 (3), 10+11+12 = 33 (3).
EXPECTED = {
    "token_mean": 54 / 8,  # 6.75
    "seq_mean": (3 / 2 + 18 / 3 + 33 / 3) / 3,  # 6.1667
    "trajectory": ((3 + 18) / 5 + 33 / 3) / 2,  # traj 0 has 5 tokens, traj 1 has 3 -> 7.6
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_aggregate_hand_computed(mode):
    n = StepNormalizer.from_batch(MASK, TRAJ)
    assert (n.token_count, n.n_seqs, n.n_traj, n.traj_token_counts.tolist()) == (8, 3, 2, [5, 3])
    assert aggregate(VALUES, MASK, mode, n, TRAJ).item() == pytest.approx(EXPECTED[mode])
    # Row by row (three micro-batches) sums to the same.
    parts = [aggregate(VALUES[i : i + 1], MASK[i : i + 1], mode, n, TRAJ[i : i + 1]) for i in range(3)]
    assert sum(p.item() for p in parts) == pytest.approx(EXPECTED[mode])


def test_normalizer_skips_empty_sequences_and_accepts_ragged():
    n = StepNormalizer.from_batch([torch.tensor([1, 1, 0]), torch.zeros(5), torch.ones(2)], [2, 0, 2])
    assert (n.token_count, n.n_seqs, n.n_traj, n.traj_token_counts.tolist()) == (4, 2, 1, [0, 0, 4])


def _tiny_model_step(mode, chunks):
    """Loss and parameter grads of a tiny linear policy, with the step split into `chunks`."""
    g = torch.Generator().manual_seed(0)
    n_seq, t, d, v = 8, 5, 3, 4
    feats = torch.randn(n_seq, t, d, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (n_seq, t), generator=g)
    mask = (torch.rand(n_seq, t, generator=g) > 0.3).long()
    mask[5] = 0  # a sequence with nothing to train
    traj = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    adv = torch.randn(n_seq, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    model = torch.nn.Linear(d, v).double()

    def policy(rows):
        logp_all = torch.log_softmax(model(feats[rows]), dim=-1)
        lp = logp_all.gather(-1, tokens[rows, :, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return lp, ent

    with torch.no_grad():
        lp0, _ = policy(slice(None))
        old = lp0 + 0.3 * torch.randn(n_seq, t, generator=g, dtype=torch.float64)  # some ratios clip
        ref = lp0 + 0.5 * torch.randn(n_seq, t, generator=g, dtype=torch.float64)
    normalizer = StepNormalizer.from_batch(mask, traj)
    total = torch.zeros((), dtype=torch.float64)
    for rows in torch.tensor_split(torch.arange(n_seq), chunks):
        lp, ent = policy(rows)
        loss, _ = dcpo_loss(
            lp,
            old[rows],
            adv[rows],
            mask[rows],
            normalizer,
            traj_index=traj[rows],
            kl_coef=0.05,
            ref_log_probs=ref[rows],
            entropy_coef=0.01,
            entropy=ent,
            agg=mode,
        )
        loss.backward()  # gradient accumulation, as the trainer does
        total += loss.detach()
    return total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["token_mean", "trajectory", "seq_mean"])
def test_micro_batches_give_same_loss_and_gradient(mode):
    loss1, grads1 = _tiny_model_step(mode, 1)
    loss4, grads4 = _tiny_model_step(mode, 4)
    assert loss1.abs() > 1e-3
    assert torch.allclose(loss1, loss4, atol=1e-12)
    for g1, g4 in zip(grads1, grads4):
        assert g1.abs().sum() > 0
        assert torch.allclose(g1, g4, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n_seq=st.integers(1, 8),
    t=st.integers(1, 6),
    mode=st.sampled_from(["token_mean", "trajectory", "seq_mean"]),
)
def test_splitting_never_changes_loss(data, n_seq, t, mode):
    mask = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=n_seq, max_size=n_seq))
    )
    traj = data.draw(st.lists(st.integers(0, 3), min_size=n_seq, max_size=n_seq))
    seed = data.draw(st.integers(0, 2**16))
    splits = sorted(data.draw(st.sets(st.integers(1, max(n_seq - 1, 1)), max_size=4)))
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(n_seq, t, generator=g, dtype=torch.float64)
    old = lp + 0.3 * torch.randn(n_seq, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n_seq, generator=g, dtype=torch.float64)
    normalizer = StepNormalizer.from_batch(mask, traj)
    traj_t = torch.tensor(traj)

    whole, _ = dcpo_loss(lp, old, adv, mask, normalizer, traj_index=traj_t, agg=mode)
    parts = sum(
        dcpo_loss(lp[r], old[r], adv[r], mask[r], normalizer, traj_index=traj_t[r], agg=mode)[0].item()
        for r in torch.tensor_split(torch.arange(n_seq), splits)
        if len(r)
    )
    assert parts == pytest.approx(whole.item(), abs=1e-12, rel=1e-9)
