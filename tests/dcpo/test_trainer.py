"""DCPO trainer: batching pieces, log-prob alignment, micro-batch invariance, exact resume, LoRA save."""

import json
import random

import pytest
import torch
from conftest import MICRO

from memact.dcpo.config import load_config
from memact.dcpo.data import TrainSequence, collate, micro_batches, pack_micro_batches
from memact.dcpo.distributed import DistInfo
from memact.dcpo.modeling import token_logprobs
from memact.dcpo.trainer import (
    UpdateStats,
    accumulate,
    sample_prompts,
    select_segments,
    split_by_prompt,
)
from memact.trajectory import segment_trajectory

ONE = DistInfo(rank=0, world_size=1, local_rank=0)




@pytest.fixture(scope="module")
def scripted_segments():
    """Segments of 2 scripted K=1 trajectories (memory actions included), as TrainSequences."""
    from memact.agent.rollout import rollout

    trajs = rollout("scripted", 1, 2, progress=False)
    return [TrainSequence.from_segment(s, advantage=1.0 - 2.0 * i, traj_id=i, group=0)
            for i, t in enumerate(trajs) for s in segment_trajectory(t.calls)]


# ----------------------------------------------------------------------------- pieces


def test_pack_respects_budget_and_covers_all():
    lengths = [100, 700, 300, 300, 64, 1000, 5]
    batches = pack_micro_batches(lengths, max_tokens=1024, pad_to_multiple_of=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = -(-max(lengths[i] for i in b) // 64) * 64
        assert width * len(b) <= 1024
    with pytest.raises(ValueError, match="exceeds the micro-batch budget"):
        pack_micro_batches([2000], max_tokens=1024)


def test_collate_aligns_targets_with_trained_tokens():
    seq = TrainSequence(tokens=[10, 11, 12, 20, 21, 30, 22], prompt_len=3, loss_mask=[1, 1, 0, 1],
                        rollout_logprobs=[-0.1, -0.2, 0.0, -0.4])
    mb = collate([seq], [0], pad_id=0, pad_to_multiple_of=8)
    assert mb.input_ids.shape == (1, 8)
    # Target j predicts tokens[j + 1]: the masked-in targets are exactly the generated tokens.
    assert mb.target_ids[mb.loss_mask].tolist() == [20, 21, 22]
    assert mb.rollout_logprobs[mb.loss_mask].tolist() == pytest.approx([-0.1, -0.2, -0.4])
    assert mb.n_real_tokens == 7


def test_sample_prompts_groups_and_ranks():
    rc = load_config(None, ["rollout.prompts_per_step=4", "rollout.n_traj=3"]).rollout
    tasks, groups = sample_prompts(rc, seed=0, step=5, dist=ONE)
    assert groups == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert tasks[0] is tasks[2] and tasks[0].task_id != tasks[3].task_id
    again, _ = sample_prompts(rc, seed=0, step=5, dist=ONE)
    assert [t.task_id for t in again] == [t.task_id for t in tasks]  # a step replays exactly
    other, _ = sample_prompts(rc, seed=0, step=6, dist=ONE)
    assert other[0].task_id != tasks[0].task_id
    _, g1 = sample_prompts(rc, seed=0, step=5, dist=DistInfo(1, 2, 1))
    assert g1 == [1, 1, 1, 3, 3, 3]


def test_select_segments_round_robin_and_advantages():
    from memact.trajectory import Segment

    def seg(n):
        return Segment(prompt_ids=[1, 2], response_ids=[3] * n, loss_mask=[1] * n, logprobs=[0.0] * n)

    segments = [[seg(1), seg(2), seg(3)], [seg(4)], [seg(5), seg(6)], []]
    groups = [0, 0, 1, 1]
    adv = torch.tensor([0.5, -0.5, 1.5, -1.5])
    dc = load_config(None, ["dcpo.segment_sampling=round_robin", "dcpo.n_seg=4"]).dcpo
    seqs = select_segments(segments, adv, groups, dc, random.Random(0))
    assert len(seqs) == 8  # 4 per prompt, with replacement once a trajectory runs out
    g0 = [s for s in seqs if s.group == 0]
    assert sorted(s.traj_id for s in g0[:2]) == sorted(s.traj_id for s in g0[2:]) == [0, 1]  # one each a pass
    assert {s.advantage for s in g0 if s.traj_id == 1} == {-0.5}
    assert {s.traj_id for s in seqs if s.group == 1} == {2}  # the empty trajectory is skipped
    dc_all = load_config(None, ["dcpo.segment_sampling=all"]).dcpo
    assert len(select_segments(segments, adv, groups, dc_all, random.Random(0))) == 6
    parts = split_by_prompt(seqs, 2)
    assert [{s.group for s in p} for p in parts] == [{0}, {1}]


def test_trainer_logprobs_match_engine_and_full_logits(micro_model_dir):
    """The trainer's log-prob of each generated token equals the engine's sampling log-prob."""
    from memact.dcpo.trainer import Rollout
    from memact.env.task import make_tasks
    from memact.models.model import load_policy

    torch.manual_seed(0)
    model, tok = load_policy(micro_model_dir)
    rc = load_config(None, ["rollout.max_new_tokens=12", "rollout.max_steps=2", "rollout.temperature=0.7"]).rollout
    ro = Rollout(model, tok, rc)
    trajs = ro.run(make_tasks(2, 1, seed=0), [0, 1], seed=0)
    seqs = [TrainSequence.from_segment(s, traj_id=i) for i, t in enumerate(trajs) for s in segment_trajectory(t.calls)]
    mb = collate(seqs, list(range(len(seqs))), pad_id=ro.pad_id, pad_to_multiple_of=64)
    with torch.no_grad():
        logp, ent = token_logprobs(model, mb, temperature=0.7)
        full = torch.log_softmax(model(input_ids=mb.input_ids).logits[:, :-1].float() / 0.7, -1)
    ref = full.gather(-1, mb.target_ids[..., None]).squeeze(-1)
    m = mb.loss_mask
    assert m.sum() > 0
    assert torch.allclose(logp[m], ref[m], atol=1e-5)
    assert (logp[m] - mb.rollout_logprobs[m]).abs().max() < 1e-4  # fp32: rounding only
    assert (ent[m] > 0).all() and (logp[~m] == 0).all()


@pytest.mark.parametrize("agg", ["token_mean", "trajectory"])
def test_one_vs_four_micro_batches_same_gradient(micro_model_dir, scripted_segments, agg, shim_engine):
    from memact.models.model import load_policy

    model, tok = load_policy(micro_model_dir)
    model.train()
    cfg = load_config(None, [f"dcpo.loss_agg={agg}", "dcpo.kl_coef=0.05", "dcpo.entropy_coef=0.01",
                             "dcpo.clip_low=0.1", "batch.max_seq_len=4096"])
    seqs = scripted_segments[:4]
    longest = max(len(s) for s in seqs)

    # Per-token noise tied to (sequence, response position), the same whatever the split.
    noise = [torch.randn(len(s.loss_mask), generator=torch.Generator().manual_seed(i)) * 0.3
             for i, s in enumerate(seqs)]

    def grads(budget):
        mbs = micro_batches(seqs, budget, tok.pad_token_id, 64)
        for mb in mbs:  # old/ref log-probs off the current policy, so ratios and the KL are not trivial
            with torch.no_grad():
                cur, _ = token_logprobs(model, mb, 1.0, with_entropy=False)
            z = torch.zeros_like(cur)
            for row, i in enumerate(mb.index):
                start = seqs[i].prompt_len - 1
                z[row, start:start + len(noise[i])] = noise[i]
            z = z * mb.loss_mask
            mb.old_logprobs = cur + z
            mb.ref_logprobs = cur - z.abs()
        model.zero_grad(set_to_none=True)
        stats = UpdateStats(grad_norms=[])
        accumulate(shim_engine(model), mbs, cfg, ONE, stats)
        return len(mbs), stats, [p.grad.clone() for p in model.parameters()]

    n1, s1, g1 = grads(budget=64 * 4 * 64)
    n4, s4, g4 = grads(budget=-(-longest // 64) * 64)
    assert (n1, n4) == (1, 4)
    assert s1.loss == pytest.approx(s4.loss, rel=1e-5, abs=1e-7)
    assert s1.clipped_tokens == s4.clipped_tokens > 0
    for a, b in zip(g1, g4):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- runs through DeepSpeed


def _cfg(model_dir, out, steps, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"run.out_dir={out}", f"run.steps={steps}", "run.threads=1",
        "rollout.prompts_per_step=2", "rollout.n_traj=2", "rollout.max_steps=2", "rollout.max_new_tokens=8",
        "rollout.context_budget=1040", "batch.max_seq_len=1280", "batch.max_tokens_per_micro_batch=4096",
        "dcpo.kl_coef=0.01", "dcpo.entropy_coef=0.01", "optim.lr=1e-2", "optim.warmup_steps=4",
        "logging.progress=false", "logging.table_every=0", "run.keep_checkpoints=0", *extra,
    ])


def _rows(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


KEYS = ("lr", "loss", "pg_loss", "kl", "entropy", "grad_norm", "reward_mean", "context_mean", "trained_tokens",
        "logprob_mismatch_mean")


def test_resume_continues_exactly(micro_model_dir, tmp_path):
    from memact.dcpo.trainer import train
    from memact.models.model import load_policy

    straight = train(_cfg(micro_model_dir, tmp_path / "a", 4))
    half = train(_cfg(micro_model_dir, tmp_path / "b", 2))
    ckpt = half / "checkpoints" / "step_000002"
    train(_cfg(micro_model_dir, tmp_path / "b", 4, f"run.resume={ckpt}"))
    a, b = _rows(straight), _rows(half)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in KEYS} == {k: rb[k] for k in KEYS}
    assert a[3]["entropy"] != a[0]["entropy"]  # the weights did move
    assert a[0]["kl"] == 0 and b[2]["kl"] > 0  # the resumed run starts from the saved weights, not the initial
    assert [r["lr"] for r in b] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])  # warm-up schedule restored
    assert a[0]["logprob_mismatch_max"] < 1e-4
    # Every checkpoint is an HF directory that loads as is.
    model, _ = load_policy(half / "checkpoints" / "step_000004")
    assert model.config.hidden_size == MICRO["hidden_size"]
    assert not list((half / "checkpoints").glob(".*"))  # no temporary leftovers


def test_lora_checkpoint_is_merged(micro_model_dir, tmp_path, shim_engine):
    from memact.dcpo.checkpoint import save_hf
    from memact.dcpo.modeling import load_for_training
    from memact.models.model import load_policy

    cfg = load_config(None, [f"model.path={micro_model_dir}", "lora.enabled=true", "lora.r=4"])
    model, tok = load_for_training(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)  # non-zero adapters, so merging changes the weights
    save_hf(shim_engine(model), tok, tmp_path / "merged")
    merged, _ = load_policy(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


def test_zero3_accumulates_every_micro_batch(micro_model_dir, scripted_segments, shim_engine):
    """Through DeepSpeed ZeRO-3, four micro-batches give the gradient norm of one big batch.

    (Calling the decoder submodule directly, bypassing the engine's forward, kept only the
    last micro-batch's gradient under ZeRO-3; the trainer goes through the engine.)
    """
    from memact.dcpo.distributed import init_deepspeed, optimizer_step
    from memact.dcpo.modeling import load_for_training

    overrides = [f"model.path={micro_model_dir}", "dcpo.kl_coef=0", "optim.max_grad_norm=0", "batch.max_seq_len=4096"]
    cfg = load_config(None, overrides + ["deepspeed.zero_stage=3"])
    plain, tok = load_for_training(load_config(None, overrides + ["deepspeed.zero_stage=0"]))
    seqs = scripted_segments[:4]
    width = -(-max(len(s) for s in seqs) // 64) * 64

    def prepared(budget):
        mbs = micro_batches(seqs, budget, tok.pad_token_id, 64)
        for mb in mbs:
            with torch.no_grad():
                mb.old_logprobs = token_logprobs(plain, mb, 1.0, with_entropy=False)[0] - 0.1 * mb.loss_mask
        return mbs

    one, four = prepared(width * 4), prepared(width)
    assert (len(one), len(four)) == (1, 4)
    plain.zero_grad(set_to_none=True)
    accumulate(shim_engine(plain), one, cfg, ONE, UpdateStats(grad_norms=[]))
    expected = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.parameters()])))
    model, _ = load_for_training(cfg)  # partitioned as it loads: runs only through its engine
    engine = init_deepspeed(model, cfg)
    accumulate(engine, four, cfg, ONE, UpdateStats(grad_norms=[]))
    assert optimizer_step(engine) == pytest.approx(expected, rel=1e-4)


def test_zero3_loads_partitioned_and_shards_the_reference(micro_model_dir, tmp_path):
    """ZeRO-3: the policy and the KL reference are built under zero.Init (no rank holds a whole
    model), the reference is a DeepSpeed ZeRO-3 engine without optimizer, and two DCPO steps
    give the metrics and weights of ZeRO 1."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from memact.dcpo.modeling import frozen_reference, load_for_training
    from memact.dcpo.trainer import train
    from memact.models.model import load_policy

    cfg = _cfg(micro_model_dir, tmp_path / "z3", 2, "deepspeed.zero_stage=3")
    model, _ = load_for_training(cfg)
    params = list(model.parameters())
    assert params and all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 and p.ds_numel > 0
                          for p in params)
    ref = frozen_reference(model, cfg)
    assert ref.zero_optimization_stage() == 3 and ref.optimizer.__class__.__name__ == "DeepSpeedZeRoOffload"
    assert all(p.numel() == 0 and not p.requires_grad for p in ref.module.parameters())
    assert not is_deepspeed_zero3_enabled()  # a later from_pretrained loads a plain model again
    assert all(p.numel() > 0 for p in AutoModelForCausalLM.from_pretrained(micro_model_dir).parameters())
    del model, ref

    z3 = train(cfg)
    z1 = train(_cfg(micro_model_dir, tmp_path / "z1", 2, "deepspeed.zero_stage=1"))
    for a, b in zip(_rows(z1), _rows(z3), strict=True):
        for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "reward_mean", "trained_tokens"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), k
    assert _rows(z3)[1]["kl"] > 0  # the sharded reference was used
    w1, _ = load_policy(z1 / "checkpoints" / "step_000002")
    w3, _ = load_policy(z3 / "checkpoints" / "step_000002")
    for (n, a), (_, b) in zip(w1.named_parameters(), w3.named_parameters()):
        assert torch.allclose(a, b, atol=1e-4), n


def test_zero3_refuses_fused_logprobs(micro_model_dir):
    """The fused kernel reads the LM head's weight outside its module call: an empty shard under ZeRO-3."""
    from memact.dcpo.config import ConfigError
    from memact.dcpo.modeling import load_for_training

    cfg = load_config(None, [f"model.path={micro_model_dir}", "deepspeed.zero_stage=3", "model.fused_logprobs=true"])
    with pytest.raises(ConfigError, match="fused_logprobs=true is not supported with ZeRO stage 3"):
        load_for_training(cfg)


def test_tensor_parallel_groups_roll_out_together_and_train_disjoint_shares():
    from memact.dcpo.trainer import my_share, rollout_group

    cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2", "rollout.prompts_per_step=8"])
    assert [rollout_group(cfg, DistInfo(r, 4, r)) for r in range(4)] == [(0, 2, 0), (0, 2, 1), (1, 2, 0), (1, 2, 1)]
    assert rollout_group(load_config(None, []), DistInfo(3, 4, 3)) == (3, 4, 0)  # HF: every rank its own
    rc = cfg.rollout
    _, groups = sample_prompts(rc, seed=0, step=0, dist=DistInfo(0, 2, 0))  # group 0 of 2: prompts 0, 2, 4, 6
    trajs = list(range(len(groups)))
    shares = [my_share(trajs, groups, m, 2) for m in (0, 1)]
    assert sorted(set(shares[0][1])) == [0, 4] and sorted(set(shares[1][1])) == [2, 6]  # whole prompts each
    assert sorted(shares[0][0] + shares[1][0]) == trajs  # every trajectory trained by exactly one member
    assert my_share(trajs, groups, 0, 1) == (trajs, groups)


def test_dry_run_refuses_a_tensor_parallel_size_that_does_not_divide_the_world():
    from memact.dcpo.config import ConfigError
    from memact.dcpo.plan import check_world

    cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=3", "rollout.prompts_per_step=8"])
    with pytest.raises(ConfigError, match="tensor_parallel_size=3: expected a divisor of the world size 4"):
        check_world(cfg, 4)


def test_metrics_have_each_step_once_after_a_resume_and_a_fresh_run(micro_model_dir, tmp_path, capfd):
    """Issue 21, item 6: a row is written before its step's checkpoint, so a kill between the two
    and a resume used to give steps [0, 1, 2, 2, 3]; a fresh run into the same directory gave
    [0, 1, 0, 1] without a word. Item 7: a truncated trainer_state.pt named no file."""
    from memact.dcpo.trainer import train

    run = train(_cfg(micro_model_dir, tmp_path / "r", 3, "run.save_every=2"))
    with open(run / "metrics.jsonl", "a") as f:  # killed while writing step 3's row
        f.write('{"step": 3, "reward_me')
    train(_cfg(micro_model_dir, tmp_path / "r", 4, f"run.resume={run / 'checkpoints' / 'step_000002'}"))
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3]
    assert "dropped 2 rows" in capfd.readouterr().err

    train(_cfg(micro_model_dir, tmp_path / "r", 2))  # a fresh run into a directory with rows
    assert [r["step"] for r in _rows(run)] == [0, 1]
    assert [r["step"] for r in _rows_of(run / "metrics.jsonl.old")] == [0, 1, 2, 3]
    assert "metrics.jsonl.old" in capfd.readouterr().err

    state = run / "checkpoints" / "step_000002" / "trainer" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="trainer_state.pt' is unreadable.*resume from an earlier one"):
        train(_cfg(micro_model_dir, tmp_path / "r", 4, f"run.resume={state.parent.parent}"))


def _rows_of(path):
    return [json.loads(line) for line in open(path)]


def test_dcpo_trains_on_history_tasks(micro_model_dir, tmp_path):
    """`rollout.tasks: history:FILE` (the research memory's task family) goes through the same
    trainer as QA: the config check, rollouts in the history environment, segments, an update."""
    from memact.dcpo.trainer import train
    from memact.research.histories import write_histories

    write_histories(tmp_path / "h.jsonl", runs=4, experiments=12, seed=0)
    run = train(_cfg(micro_model_dir, tmp_path / "run", 1, f"rollout.tasks=history:{tmp_path / 'h.jsonl'}",
                     "rollout.objectives=1", "rollout.max_steps=6", "rollout.max_new_tokens=16",
                     "rollout.context_budget=2048", "batch.max_seq_len=2560", "rollout.dynamic_sampling=false"))
    (row,) = _rows(run)
    # A random model never reaches the end of the 4 results: every episode gets the history penalty.
    assert row["reward_mean"] == pytest.approx(-0.1) and row["trained_tokens"] > 0
