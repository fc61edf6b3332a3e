"""What tells signal from noise in a DCPO step: the control advantages, the gradient SNR,
and dynamic sampling (groups without signal dropped and replaced)."""

import json
import zlib
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memact.dcpo.advantages import control_advantages, group_advantages
from memact.dcpo.config import ConfigError, load_config
from memact.dcpo.snr import snr_from_sums
from memact.dcpo.trainer import collect_groups, uniform_groups
from memact.env.curriculum import Curriculum

# ----------------------------------------------------------------------------- controls


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-1, 1, allow_nan=False)), min_size=1, max_size=24),
       st.integers(0, 10_000))
def test_shuffle_permutes_within_each_group(rows, seed):
    groups = [g for g, _ in rows]
    adv = torch.tensor([a for _, a in rows], dtype=torch.float64)
    out = control_advantages(adv, groups, "shuffle", torch.Generator().manual_seed(seed))
    for g in set(groups):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        assert Counter(out[idx].tolist()) == Counter(adv[idx].tolist())  # the same values, so the same size
    again = control_advantages(adv, groups, "shuffle", torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)


def test_shuffle_moves_advantages_and_reverse_flips_them():
    rewards = [1.0, 0.0, 0.0, 0.0] * 50
    groups = [i // 4 for i in range(200)]
    adv = group_advantages(rewards, groups)
    out = control_advantages(adv, groups, "shuffle", torch.Generator().manual_seed(0))
    moved = sum(int(out[i] != adv[i]) for i in range(0, 200, 4))
    assert 25 < moved < 50  # the rewarded trajectory keeps its advantage a quarter of the time
    assert torch.equal(control_advantages(adv, groups, "reverse"), -adv)
    assert control_advantages(adv, groups, "none") is adv
    with pytest.raises(ValueError, match="mode"):
        control_advantages(adv, groups, "random")
    with pytest.raises(ConfigError, match="dcpo.control"):
        load_config(None, ["dcpo.control=sideways"])


# ----------------------------------------------------------------------------- SNR


def test_snr_is_about_zero_for_noise_and_large_for_signal():
    gen = torch.Generator().manual_seed(0)
    noise = []
    for _ in range(200):
        g = torch.randn(16, 50, generator=gen)  # 16 groups, zero-mean gradients
        noise.append(snr_from_sums(g.sum(0), float(g.pow(2).sum()), 16))
    assert abs(sum(noise) / len(noise)) < 0.2  # unbiased: the mean ratio of pure noise is 0
    g = torch.randn(16, 50, generator=gen) + 2.0  # a shared direction, norm^2 200 against noise 50/16
    assert snr_from_sums(g.sum(0), float(g.pow(2).sum()), 16) > 30
    same = torch.ones(4, 10)
    assert snr_from_sums(same.sum(0), float(same.pow(2).sum()), 4) == float("inf")
    assert snr_from_sums(same.sum(0), 40.0, 1) is None  # one group: no scatter to measure


# ----------------------------------------------------------------------------- dynamic sampling


class FakeRollout:
    """Rewards by task: a task whose id ends in a digit below ``cut`` has a group with signal."""

    def __init__(self, cut: int):
        self.cut, self.calls = cut, []

    def run(self, tasks, groups, seed, step):
        self.calls.append(len(set(groups)))
        out = []
        for i, t in enumerate(tasks):
            signal = zlib.crc32(t.task_id.encode()) % 10 < self.cut
            out.append(SimpleNamespace(reward=float(i % 2) if signal else -0.1, calls=[], error=None))
        return out


class FailingRollout(FakeRollout):
    """Every group has signal, but one episode of each group in ``failing`` failed (a search server down)."""

    def __init__(self, failing):
        super().__init__(10)
        self.failing = set(failing)

    def run(self, tasks, groups, seed, step):
        out = super().run(tasks, groups, seed, step)
        for t, g in zip(out, groups):
            if g in self.failing and t.reward == 0.0:
                t.error, t.reward = "search failed: POST http://127.0.0.1:1/retrieve: ...", -0.1
        return out


def _cfg(*extra):
    return load_config(None, ["rollout.prompts_per_step=8", "rollout.n_traj=2", "rollout.objectives=1", *extra])


@pytest.mark.parametrize("cut", [3, 6, 10])
def test_dynamic_sampling_fills_the_step_with_groups_that_have_signal(cut):
    cfg = _cfg("rollout.dynamic_sampling=true", "rollout.max_draws=8")
    fake = FakeRollout(cut)
    drawn = collect_groups(fake, cfg, step=3, group=0, n_groups=1)
    kept = set(drawn.groups)
    assert len(kept) == 8 and not uniform_groups(drawn.trajs, drawn.groups)
    assert len(drawn.trajs) == 16 and Counter(drawn.groups) == {g: 2 for g in kept}
    assert drawn.groups_drawn == sum(fake.calls) and drawn.rounds == len(fake.calls) <= 8
    assert drawn.groups_dropped == drawn.groups_drawn - 8
    assert len(drawn.all_trajs) == 2 * drawn.groups_drawn


def test_dynamic_sampling_off_or_without_signal_trains_the_first_draw():
    off = collect_groups(FakeRollout(3), _cfg(), step=3, group=0, n_groups=1)
    assert off.groups == [g for g in range(8) for _ in range(2)] and off.rounds == 1
    fake = FakeRollout(0)  # no group ever has signal
    none = collect_groups(fake, _cfg("rollout.dynamic_sampling=true", "rollout.max_draws=3"), 3, 0, 1)
    assert none.groups == off.groups and none.rounds == 3 and len(fake.calls) == 3
    assert none.groups_uniform == none.groups_drawn and none.groups_dropped == none.groups_drawn - 8


@pytest.mark.parametrize("dynamic", [False, True])
def test_groups_with_a_failed_episode_are_not_trained(dynamic):
    """Its reward says nothing about the policy: with dynamic sampling others replace it, without
    it the step trains the rest; either way it is counted."""
    cfg = _cfg(*(["rollout.dynamic_sampling=true", "rollout.max_draws=4"] if dynamic else []))
    drawn = collect_groups(FailingRollout({1, 4}), cfg, step=3, group=0, n_groups=1)
    assert all(t.error is None for t in drawn.trajs) and not {1, 4} & set(drawn.groups)
    assert drawn.groups_failed >= 2 and len(set(drawn.groups)) == (8 if dynamic else 6)
    everything = collect_groups(FailingRollout(range(8)), _cfg(), step=3, group=0, n_groups=1)
    assert len(set(everything.groups)) == 8  # nothing else to train: the step is kept (advantages 0 or not)


def test_further_draws_are_other_tasks_of_the_same_k():
    c = Curriculum(2, (1, 2, 4), "mixed")
    first = c.prompts(0, 5, 6, 10)
    more = c.prompts(0, 5, 6, 10, draw=(1, 0))
    other_rank = c.prompts(0, 5, 6, 10, draw=(1, 1))
    assert [t.k for t in first] == [t.k for t in more] == [t.k for t in other_rank]
    ids = [t.task_id for t in first], [t.task_id for t in more], [t.task_id for t in other_rank]
    assert not set(ids[0]) & set(ids[1]) and not set(ids[1]) & set(ids[2])


def test_a_step_with_every_tool_on_logs_them(micro_model_dir, tmp_path):
    from memact.dcpo.trainer import train

    cfg = load_config(None, [
        f"model.path={micro_model_dir}", f"run.out_dir={tmp_path}", "run.steps=1", "run.threads=1",
        "rollout.prompts_per_step=2", "rollout.n_traj=2", "rollout.max_steps=2", "rollout.max_new_tokens=8",
        "batch.max_seq_len=1280", "rollout.dynamic_sampling=true", "rollout.max_draws=2", "dcpo.control=shuffle",
        "logging.grad_snr=true", "logging.progress=false", "logging.table_every=0",
    ])
    row = json.loads((train(cfg) / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("rollout_reward_mean", "groups_drawn", "groups_uniform_frac", "groups_dropped_frac",
                "rollout_draws", "trained_token_share"):
        assert key in row, key
    assert row["trained_token_share"] == pytest.approx(1.0)  # segment_sampling all: every generated token
    assert row["groups_drawn"] >= 2 and 1 <= row["rollout_draws"] <= 2
