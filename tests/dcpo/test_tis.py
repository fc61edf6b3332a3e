"""Truncated importance sampling of the rollout/trainer mismatch: weights, truncation, gradient."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memact.dcpo.losses import StepNormalizer, dcpo_loss, tis_weights

OLD = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -3.0, -0.2]])
ROLL = torch.tensor([[-1.0, -3.0, -0.2, 0.0], [-1.5, -1.0, -1.0, -9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)


def test_token_weights_are_the_probability_ratio_cut_at_the_cap():
    w, cut = tis_weights(OLD, ROLL, MASK, "token", cap=2.0)
    want = torch.tensor([[1.0, 2.0, math.exp(-0.3), 0.0], [math.exp(0.5), 1.0, math.exp(-2.0), 0.0]])
    assert torch.allclose(w, want)  # e^1 = 2.72 is cut to 2; padding (mask 0) weighs 0 whatever its log-probs
    assert cut.tolist() == [[False, True, False, False], [False, False, False, False]]


def test_sequence_weights_are_one_product_per_row():
    w, cut = tis_weights(OLD, ROLL, MASK, "sequence", cap=2.0)
    row0 = min(math.exp(0.0 + 1.0 - 0.3), 2.0)  # exp(0.7) = 2.01: cut
    row1 = math.exp(0.5 + 0.0 - 2.0)
    assert torch.allclose(w, torch.tensor([[row0] * 3 + [0.0], [row1] * 3 + [0.0]]))
    assert cut.tolist() == [[True, True, True, False], [False] * 4]


def test_bad_mode_or_cap_names_the_input():
    with pytest.raises(ValueError, match="TIS mode 'both'"):
        tis_weights(OLD, ROLL, MASK, "both")
    with pytest.raises(ValueError, match="cap must be > 0, got 0"):
        tis_weights(OLD, ROLL, MASK, "token", cap=0)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        tis_weights(OLD, ROLL[:, :3], MASK)


@settings(max_examples=40, deadline=None)
@given(diff=st.lists(st.floats(-30, 30), min_size=1, max_size=12), cap=st.floats(0.5, 10))
def test_weights_never_exceed_the_cap_and_never_overflow(diff, cap):
    old = torch.tensor([diff])
    w, cut = tis_weights(old, torch.zeros_like(old), torch.ones_like(old, dtype=torch.bool), "token", cap)
    assert torch.isfinite(w).all() and (w <= cap + 1e-6).all() and (w > 0).all()
    assert cut.tolist()[0] == [d > math.log(cap) for d in diff]


def test_the_weights_scale_each_tokens_gradient_and_carry_none_themselves():
    logp = OLD.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    norm = StepNormalizer.from_batch(MASK, [0, 1])
    w, _ = tis_weights(OLD, ROLL, MASK, "token", cap=2.0)
    w.requires_grad_(True)  # a weight that carried a gradient would show up below
    loss, _ = dcpo_loss(logp, OLD, adv, MASK, norm, kl_coef=0.0, is_weights=w)
    loss.backward()
    plain = OLD.clone().requires_grad_(True)
    ref, _ = dcpo_loss(plain, OLD, adv, MASK, norm, kl_coef=0.0)
    ref.backward()
    # ratio 1 at the start: each token's gradient is the plain one times its weight
    assert torch.allclose(logp.grad, plain.grad * w.detach())
    assert w.grad is None
    with pytest.raises(ValueError, match="is_weights"):
        dcpo_loss(logp, OLD, adv, MASK, norm, kl_coef=0.0, is_weights=w[:, :2])


def test_config_takes_the_options_and_refuses_bad_ones():
    from memact.dcpo.config import ConfigError, load_config

    cfg = load_config(None, ["dcpo.tis=sequence", "dcpo.tis_cap=3", "rollout.engine=vllm",
                             "rollout.vllm.gpu_memory_utilization=0.4"])
    assert (cfg.dcpo.tis, cfg.dcpo.tis_cap, cfg.rollout.engine, cfg.rollout.vllm.gpu_memory_utilization) == \
        ("sequence", 3.0, "vllm", 0.4)
    for bad, key in [("dcpo.tis=yes", "dcpo.tis"), ("dcpo.tis_cap=0", "dcpo.tis_cap"),
                     ("rollout.engine=sglang", "rollout.engine"), ("rollout.vllm.dtype=int8", "rollout.vllm.dtype"),
                     ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization"),
                     ("rollout.vllm.tensor_parallel_size=0", "rollout.vllm.tensor_parallel_size")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])


def test_a_run_with_token_tis_on_the_hf_engine_weighs_about_one(micro_model_dir, tmp_path):
    """The shared HF engine samples from the trained module itself: no token is truncated."""
    import json

    from memact.dcpo.config import load_config
    from memact.dcpo.trainer import train

    out = train(load_config(None, [
        f"model.path={micro_model_dir}", f"run.out_dir={tmp_path / 'run'}", "run.steps=2", "run.threads=1",
        "rollout.prompts_per_step=2", "rollout.n_traj=2", "rollout.max_steps=2", "rollout.max_new_tokens=8",
        "batch.max_seq_len=1280", "dcpo.tis=token", "dcpo.tis_cap=1.5", "dcpo.entropy_coef=0.01",
        "optim.lr=1e-2", "logging.progress=false", "logging.table_every=0", "run.keep_checkpoints=0"]))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for r in rows:
        assert r["tis_truncated_frac"] == 0.0 and r["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["push_s"] >= 0
