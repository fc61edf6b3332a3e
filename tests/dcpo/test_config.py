"""Config tree: presets load, overrides merge, bad keys and values are named; dry run of the 14B preset."""

import json

import pytest

from memact.dcpo.config import ConfigError, configs_dir, load_config
from memact.dcpo.distributed import deepspeed_config
from memact.dcpo.plan import check_world

PRESETS = ["tiny_cpu_sft.yaml", "tiny_cpu_dcpo.yaml", "qwen2.5_14b_dcpo_8xh100.yaml"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    cfg = load_config(configs_dir() / name)
    assert cfg.source.endswith(name)
    ds = deepspeed_config(cfg)
    # Our accumulation: one micro-batch per backward, DeepSpeed does not count micro-steps.
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["managed_gradient_accumulation"] is False
    assert "auto" not in json.dumps(ds)


def test_published_settings_in_14b_preset():
    cfg = load_config(configs_dir() / "qwen2.5_14b_dcpo_8xh100.yaml")
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (1e-6, 5)
    assert (cfg.dcpo.clip_low, cfg.dcpo.clip_high, cfg.dcpo.kl_coef) == (0.2, 0.2, 0.001)
    assert (cfg.rollout.n_traj, cfg.dcpo.n_seg, cfg.rollout.prompts_per_step) == (8, 12, 128)
    assert (cfg.rollout.context_budget, cfg.rollout.max_steps) == (20000, 40)
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True


def test_overrides_merge_over_yaml():
    cfg = load_config(configs_dir() / "tiny_cpu_dcpo.yaml", ["optim.lr=3e-3", "rollout.n_traj=4",
                                                              "deepspeed.zero_stage=2"])
    assert cfg.optim.lr == 3e-3 and cfg.rollout.n_traj == 4
    assert deepspeed_config(cfg)["zero_optimization"]["stage"] == 2


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match="n_trajs"):
        load_config(None, ["rollout.n_trajs=3"])


def test_bad_value_names_key_and_expectation():
    with pytest.raises(ConfigError, match=r"dcpo.segment_sampling='random'.*one of"):
        load_config(None, ["dcpo.segment_sampling=random"])
    with pytest.raises(ConfigError, match="rollout.context_budget"):
        check_world(load_config(None, ["rollout.context_budget=5000", "batch.max_seq_len=2048"]), 1)
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=abc"])


def test_dry_run_14b_without_weights(capsys, tmp_path):
    from memact.dcpo.cli_train import main

    # model.path points nowhere: the architecture block gives the shape, on the meta device.
    rc = main(["train", "--config", str(configs_dir() / "qwen2.5_14b_dcpo_8xh100.yaml"), "--dry-run",
               "--num-gpus", "8", f"model.path={tmp_path / 'absent'}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ZeRO stage 3" in out
    assert "14.77B parameters" in out  # Qwen2.5-14B
    assert "1024 trajectories (128 per rank)" in out and "1536 (192 per rank" in out
    assert "per GPU" in out and "GiB" in out
    # The paper's "40 steps" is the per-episode turn budget; training steps are a separate knob.
    assert "40 turns per episode (rollout.max_steps)" in out and "DCPO training steps (run.steps)" in out
    assert "reference    + 3.4 GiB per GPU: the frozen initial model, ZeRO-3-sharded over 8 rank(s)" in out
    # The colocated vLLM plan: weights 14.77B x 2 bytes, the rest of the share is KV cache, both phases fit.
    assert "share 0.7 = 56.0 GiB = weights 27.5 + KV cache 26.5" in out and "0.188 MiB a token" in out
    assert "rollouts   trainer states 6.3 + reference 3.4 + vLLM 56.0 = 65.8 GiB of 80" in out
    assert "vLLM asleep" in out and "does not fit" not in out
    rc = main(["train", "--config", str(configs_dir() / "qwen2.5_14b_dcpo_8xh100.yaml"), "--dry-run",
               "--num-gpus", "8", f"model.path={tmp_path / 'absent'}", "deepspeed.offload_optimizer=false",
               "rollout.vllm.enable_sleep_mode=false"])
    assert rc == 0 and "does not fit" in capsys.readouterr().out  # Adam states on the GPU and vLLM awake


def test_dry_run_rejects_uneven_world(tmp_path):
    from memact.dcpo.cli_train import main

    with pytest.raises(SystemExit, match="prompts_per_step=128: expected a multiple of the world size 3"):
        main(["train", "--config", "qwen2.5_14b_dcpo_8xh100.yaml", "--dry-run", "--num-gpus", "3"])


def test_mixed_curriculum_samples_every_k_in_every_step():
    from memact.dcpo.config import RolloutConfig
    from memact.dcpo.distributed import DistInfo
    from memact.dcpo.trainer import sample_prompts

    rc = RolloutConfig(curriculum=[2, 4, 6, 8], curriculum_mode="mixed", prompts_per_step=4, n_traj=2)
    for step in range(3):
        tasks, groups = sample_prompts(rc, seed=0, step=step, dist=DistInfo(0, 1, 0), total_steps=3)
        assert sorted({t.k for t in tasks}) == [2, 4, 6, 8]
        assert groups == [0, 0, 1, 1, 2, 2, 3, 3]
        assert all(tasks[2 * g].task_id == tasks[2 * g + 1].task_id for g in range(4))  # a group shares its prompt
        assert len({t.task_id for t in tasks}) == 4
    # stages mode: the tasks of a step are unchanged by the mixed code path
    staged = RolloutConfig(curriculum=[2, 4], curriculum_mode="stages", prompts_per_step=3, n_traj=1)
    tasks, _ = sample_prompts(staged, seed=5, step=1, dist=DistInfo(0, 1, 0), total_steps=2)
    from memact.env.task import make_tasks

    assert [t.task_id for t in tasks] == [t.task_id for t in make_tasks(3, 4, seed=5 * 10_007 + 1)]  # step 1 of 2: K=4


def test_curriculum_mode_is_checked():
    with pytest.raises(ConfigError, match="rollout.curriculum_mode"):
        load_config(configs_dir() / "tiny_cpu_dcpo.yaml", ["rollout.curriculum_mode=shuffled"])


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    from memact.dcpo.schedules import warmup_then_constant, warmup_then_cosine

    f = warmup_then_cosine(warmup_steps=4, total_steps=13, min_ratio=0.1)  # decays over steps 4..12
    assert [f(s) for s in range(4)] == [warmup_then_constant(4)(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert abs(f(8) - 0.55) < 1e-12  # half-way down: 0.1 + 0.9 * 0.5
    assert abs(f(12) - 0.1) < 1e-12 and abs(f(100) - 0.1) < 1e-12
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_schedule_must_be_known():
    from memact.dcpo.config import Config, validate

    cfg = Config()
    cfg.optim.schedule = "linear"
    with pytest.raises(ConfigError, match="optim.schedule"):
        validate(cfg)


@pytest.mark.parametrize("override,key", [("optim.lrr=1e-3", "optim.lrr"), ("run.steps=ten", "run.steps")])
def test_a_mistyped_override_is_named_not_blamed_on_the_file(override, key):
    """Issue 21, item 7: a bad command-line override was reported as an error in the YAML file."""
    path = configs_dir() / "tiny_cpu_dcpo.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optim.lr=3e-3", override])
    message = str(err.value)
    assert f"command-line override {override!r}" in message and key.split(".")[-1] in message
    assert str(path) not in message
