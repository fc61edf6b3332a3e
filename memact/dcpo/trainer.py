"""DCPO training: the loop of design brief section 4, top to bottom in ``train``.

Each step: sample prompts -> N_traj rollouts per prompt -> rewards -> group advantages (one
per trajectory) -> segments -> segment sampling -> old and reference log-probs ->
micro-batches -> DeepSpeed update(s) -> weights back to the rollout engine -> metrics ->
checkpoint. The helpers below ``train`` each do one of those arrows.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memact.agent.chat import ChatRenderer
from memact.agent.loop import run_episodes
from memact.agent.strategies import parse_strategy
from memact.dcpo.advantages import broadcast_to_segments, group_advantages
from memact.dcpo.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from memact.dcpo.config import Config, DCPOConfig, RolloutConfig, to_yaml
from memact.dcpo.data import MicroBatch, TrainSequence
from memact.dcpo.distributed import (
    DistInfo,
    build_engine,
    full_weights,
    is_idle,
    lockstep,
    optimizer_step,
    start_process,
    step_normalizer,
)
from memact.dcpo.losses import dcpo_loss
from memact.dcpo.metrics import MetricsLogger, StepBar, mean, std
from memact.dcpo.modeling import frozen_reference, load_for_training, reference_logprobs, token_logprobs
from memact.dcpo.packing import build_micro_batches
from memact.dcpo.plan import check_world
from memact.dcpo.sampling import sample_segments
from memact.engines.base import SamplingParams
from memact.engines.hf import HFEngine
from memact.env.memory import Budget
from memact.env.task import Task, make_tasks
from memact.trajectory import Segment, Trajectory, segment_trajectory


def train(cfg: Config) -> Path:
    """Run DCPO for ``cfg.run.steps`` steps; returns the run directory."""
    dist = start_process(cfg)
    check_world(cfg, dist.world_size)
    run_dir = Path(cfg.run.out_dir)
    model, tokenizer = load_for_training(cfg)
    ref = frozen_reference(model, cfg) if cfg.dcpo.kl_coef > 0 else None  # the initial policy, frozen
    engine = build_engine(model, cfg, total_steps=cfg.run.steps * cfg.dcpo.ppo_epochs * cfg.dcpo.mini_batches)
    rollout = Rollout(engine.module, tokenizer, cfg.rollout)
    first_step = resume(engine, rollout, cfg.run.resume) if cfg.run.resume else 0
    log, bar = open_run(run_dir, cfg, dist, engine, first_step)
    for step in range(first_step, cfg.run.steps):
        t0 = time.perf_counter()
        seed = step_seed(cfg.run.seed, step, dist.rank)
        tasks, groups = sample_prompts(cfg.rollout, cfg.run.seed, step, dist, cfg.run.steps)
        with full_weights(engine):
            trajs = rollout.run(tasks, groups, seed)
        t_rollout = time.perf_counter() - t0
        rewards = [t.reward for t in trajs]
        traj_adv = group_advantages(rewards, groups, cfg.dcpo.adv_norm, cfg.dcpo.adv_estimator)
        segments = [segment_trajectory(t.calls) for t in trajs]
        seqs = select_segments(segments, traj_adv, groups, cfg.dcpo, random.Random(seed))
        minis = pack_mini_batches(seqs, cfg, rollout.pad_id, engine.device)
        fill_old_and_ref_logprobs(engine, ref, minis, cfg, dist)
        t1, lr = time.perf_counter(), engine.get_lr()[0]
        stats = update(engine, minis, cfg, dist)
        t_update = time.perf_counter() - t1
        sync_weights(rollout.engine, engine)
        row = step_metrics(step, trajs, traj_adv, segments, seqs, minis, stats, lr, t_rollout, t_update,
                           time.perf_counter() - t0, dist)
        log.log(row)
        bar.update(step + 1, f"reward {row['reward_mean']:.3f} acc {row['accuracy']:.2f} kl {row['kl']:.1e}")
        if should_save(step, cfg):
            save_checkpoint(engine, tokenizer, run_dir, step + 1, trainer_state(step + 1, rollout),
                            cfg.run.keep_checkpoints, dist.is_main)
    bar.stop()
    log.close()
    return run_dir


# ----------------------------------------------------------------------------- rollouts


class Rollout:
    """The rollout side: an engine that generates from the trained model, plus episode settings.

    On the CPU the engine shares the trained model object (no weight copy); ``sync_weights``
    is the seam where a separate engine (vLLM) will receive new weights.
    """

    def __init__(self, model: Any, tokenizer: Any, rc: RolloutConfig, progress: bool = False):
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.engine = HFEngine(model, eos_token_id=eos, pad_token_id=self.pad_id,
                               max_batch_size=rc.max_batch_size)
        self.renderer = ChatRenderer(tokenizer)
        self.sampling = SamplingParams(temperature=rc.temperature, top_p=rc.top_p,
                                       max_new_tokens=rc.max_new_tokens)
        self.budget = Budget(rc.context_budget, rc.max_steps)
        self.strategy = parse_strategy(rc.strategy)
        self.progress = progress

    @property
    def generator(self) -> torch.Generator:
        return self.engine.generator

    def run(self, tasks: list[Task], groups: list[int], seed: int) -> list[Trajectory]:
        return run_episodes(self.engine, tasks, self.renderer, self.sampling, budget=self.budget,
                            strategy=self.strategy, seed=seed, groups=groups, progress=self.progress)


def objectives_at(rc: RolloutConfig, step: int, total_steps: int = 0, prompt: int = 0) -> int:
    """Sub-questions of prompt ``prompt`` at ``step``: ``rollout.curriculum`` split evenly over the
    run, or with ``curriculum_mode: mixed`` cycled through the step's prompts."""
    if rc.curriculum and rc.curriculum_mode == "mixed":
        return int(rc.curriculum[(step * rc.prompts_per_step + prompt) % len(rc.curriculum)])
    if not rc.curriculum or total_steps <= 0:
        return rc.objectives
    stage = min(step * len(rc.curriculum) // total_steps, len(rc.curriculum) - 1)
    return int(rc.curriculum[stage])


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed of its own for each (run seed, step, rank): steps replay exactly after a resume."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def sample_prompts(rc: RolloutConfig, seed: int, step: int, dist: DistInfo,
                   total_steps: int = 0) -> tuple[list[Task], list[int]]:
    """This rank's prompts of the step, each repeated ``n_traj`` times, and their group ids.

    Prompt g of the step goes to rank g % world_size; group ids are the step-wide prompt index.
    """
    ks = [objectives_at(rc, step, total_steps, g) for g in range(rc.prompts_per_step)]
    if len(set(ks)) == 1:
        prompts = make_tasks(rc.prompts_per_step, ks[0], seed=seed * 10_007 + step)
    else:  # mixed K: each K's prompts from their own seed, in prompt order
        by_k = {k: iter(make_tasks(ks.count(k), k, seed=(seed * 10_007 + step) * 31 + k)) for k in set(ks)}
        prompts = [next(by_k[k]) for k in ks]
    mine = [g for g in range(rc.prompts_per_step) if g % dist.world_size == dist.rank]
    tasks = [prompts[g] for g in mine for _ in range(rc.n_traj)]
    groups = [g for g in mine for _ in range(rc.n_traj)]
    return tasks, groups


def select_segments(segments: list[list[Segment]], traj_adv: torch.Tensor, groups: list[int], dc: DCPOConfig,
                    rng: random.Random) -> list[TrainSequence]:
    """Sample each prompt's segments (``all``, or ``round_robin`` N_seg); each gets its trajectory's advantage.

    Args:
        segments: [n_traj] the segments of each trajectory.
        traj_adv: [n_traj] advantage of each trajectory.
        groups: [n_traj] prompt index of each trajectory.
    """
    picks: list[tuple[int, int]] = []  # (trajectory, segment)
    for g in sorted(set(groups)):
        members = [t for t, gt in enumerate(groups) if gt == g]
        counts = [len(segments[t]) for t in members]
        picks += [(members[ti], si) for ti, si in sample_segments(counts, dc.segment_sampling, dc.n_seg, rng)]
    seg_adv = broadcast_to_segments(traj_adv, [t for t, _ in picks]).tolist()
    return [TrainSequence.from_segment(segments[t][s], advantage=a, traj_id=t, group=groups[t])
            for (t, s), a in zip(picks, seg_adv)]


def split_by_prompt(seqs: list[TrainSequence], parts: int) -> list[list[TrainSequence]]:
    """Split the step's sequences into ``parts`` mini-batches, whole prompts in each."""
    prompts = sorted({s.group for s in seqs})
    chunks = [prompts[i::parts] for i in range(parts)]
    return [part for part in ([s for s in seqs if s.group in set(c)] for c in chunks) if part]


def pack_mini_batches(seqs: list[TrainSequence], cfg: Config, pad_id: int, device: Any
                      ) -> list[list[MicroBatch]]:
    """Mini-batches (one optimizer step each) of micro-batches within the token budget, on ``device``.

    The layout (one row per segment, packed, or prefix tree) follows ``cfg.batch``.
    """
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    return [[mb.to(device) for mb in build_micro_batches(part, cfg.batch, pad_id, cfg.model.attn_implementation, dtype)]
            for part in split_by_prompt(seqs, cfg.dcpo.mini_batches)]


# ----------------------------------------------------------------------------- log-probs and update


def trainer_temperature(cfg: Config) -> float:
    """The temperature of the rollout log-probs (greedy rollouts report T = 1)."""
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


@torch.no_grad()
def fill_old_and_ref_logprobs(engine: Any, ref: Any, minis: list[list[MicroBatch]], cfg: Config,
                              dist: DistInfo | None = None) -> None:
    """Old log-probs from the current policy before any update (the ratio's denominator), and
    reference log-probs when the KL term is on. The engine's rollout log-probs stay for the
    mismatch metric only: the trainer's forward is the consistent baseline for the ratio."""
    dist = dist or DistInfo(0, 1, 0)
    temp = trainer_temperature(cfg)
    mine = [mb for mbs in minis for mb in mbs]
    for mb in lockstep(mine, dist, engine):  # ZeRO-3: every rank runs as many forwards
        mb.old_logprobs, _ = token_logprobs(engine, mb, temp, with_entropy=False, fused=cfg.model.fused_logprobs)
        if cfg.dcpo.kl_coef > 0:
            mb.ref_logprobs = reference_logprobs(engine, ref, mb, temp, fused=cfg.model.fused_logprobs)


@dataclass
class UpdateStats:
    loss: float = 0.0
    pg_loss: float = 0.0
    clipped_tokens: int = 0
    kl_sum: float = 0.0
    entropy_sum: float = 0.0
    ratio_max: float = 0.0
    tokens: int = 0  # trained tokens, summed over optimizer steps
    fed_tokens: int = 0  # real tokens through forward+backward
    grad_norms: list[float] | None = None
    optimizer_steps: int = 0
    micro_batches: int = 0


def update(engine: Any, minis: list[list[MicroBatch]], cfg: Config, dist: DistInfo) -> UpdateStats:
    """``ppo_epochs`` passes; each mini-batch is one optimizer step accumulated over its micro-batches."""
    stats = UpdateStats(grad_norms=[])
    for _ in range(cfg.dcpo.ppo_epochs):
        for mbs in minis:
            accumulate(engine, mbs, cfg, dist, stats)
            stats.grad_norms.append(optimizer_step(engine))
            stats.optimizer_steps += 1
    stats.loss /= max(stats.optimizer_steps, 1)  # each optimizer step's loss is a whole-step mean
    stats.pg_loss /= max(stats.optimizer_steps, 1)
    return stats


def accumulate(engine: Any, mbs: list[MicroBatch], cfg: Config, dist: DistInfo, stats: UpdateStats) -> None:
    """Backward of one optimizer step's loss, micro-batch by micro-batch.

    The normaliser covers all of ``mbs``, so the summed gradient does not depend on how the
    step was split into micro-batches.
    """
    dc, temp = cfg.dcpo, trainer_temperature(cfg)
    norm = step_normalizer(mbs, dist)
    for mb in lockstep(mbs, dist, engine):  # as many passes as the busiest rank
        logp, ent = token_logprobs(engine, mb, temp, fused=cfg.model.fused_logprobs,
                                   entropy_grad=dc.entropy_coef != 0)
        if is_idle(mb):
            engine.backward(logp.sum() * 0.0, scale_wrt_gas=False)
            continue
        loss, m = dcpo_loss(logp, mb.old_logprobs, mb.advantages, mb.loss_mask, norm,
                            traj_index=mb.traj_index, clip_low=dc.clip_low, clip_high=dc.clip_high,
                            kl_coef=dc.kl_coef, ref_log_probs=mb.ref_logprobs,
                            entropy_coef=dc.entropy_coef, entropy=ent, agg=dc.loss_agg)
        # DeepSpeed averages gradients over ranks; the normaliser is already global.
        engine.backward(loss * dist.world_size, scale_wrt_gas=False)
        n = float(m["n_tokens"])
        stats.loss += loss.item()
        stats.pg_loss += float(m["pg_loss"])
        stats.clipped_tokens += round(float(m["clip_fraction"]) * n)  # a count: clip_fraction is count / n
        stats.kl_sum += float(m.get("kl_mean", 0.0)) * n
        stats.entropy_sum += float(m.get("entropy_mean", 0.0)) * n
        stats.ratio_max = max(stats.ratio_max, float(m["ratio_max"]))
        stats.tokens += int(n)
        stats.fed_tokens += mb.n_real_tokens
        stats.micro_batches += 1


def sync_weights(rollout_engine: Any, engine: Any) -> None:
    """Push the updated weights to the rollout engine (``SyncsWeights.sync_weights(named_tensors)``).

    The CPU ``HFEngine`` shares the trained module, so its copy is skipped tensor by tensor;
    an engine with its own weights (vLLM, another device) copies them here.
    """
    sync = getattr(rollout_engine, "sync_weights", None)
    if sync is None:
        if getattr(rollout_engine, "model", None) is not engine.module:
            raise RuntimeError("the rollout engine neither shares the trained model nor has sync_weights()")
        return
    with full_weights(engine):
        sync(engine.module.state_dict(keep_vars=True).items())


# ----------------------------------------------------------------------------- metrics, state


def step_metrics(step: int, trajs: list[Trajectory], traj_adv: torch.Tensor, segments: list[list[Segment]],
                 seqs: list[TrainSequence], minis: list[list[MicroBatch]], stats: UpdateStats, lr: float,
                 t_rollout: float, t_update: float, t_step: float, dist: DistInfo | None = None) -> dict[str, float]:
    """One row of metrics.jsonl (names explained in docs/training.md), over every rank's
    trajectories and updates (rank 0's wall times)."""
    diffs = [mb.rollout_logprobs[mb.loss_mask] - mb.old_logprobs[mb.loss_mask] for mbs in minis for mb in mbs]
    diff = torch.cat(diffs).abs() if diffs else torch.zeros(0)
    part = {  # this rank's share: lists are concatenated over ranks, numbers summed (maxima: max)
        "rewards": [t.reward for t in trajs],
        "correct": [float(c) for t in trajs for c in t.correct],
        "adv": traj_adv.tolist(),
        "segments": [len(s) for s in segments],
        "context_mean": [t.metrics["mean_context_tokens"] for t in trajs],
        "context_peak": [t.metrics["peak_context_tokens"] for t in trajs],
        "memory_actions": [t.metrics["memory_actions"] for t in trajs],
        "overflow": [float(t.metrics["overflow"]) for t in trajs],
        "turns": [t.metrics["steps"] for t in trajs],
        "gen_tokens": sum(len(c.output_ids) for t in trajs for c in t.calls),
        "segments_trained": len(seqs),
        "loss": stats.loss,  # each rank's share of the step's globally normalised loss
        "pg_loss": stats.pg_loss,
        "clipped_tokens": stats.clipped_tokens,
        "kl_sum": stats.kl_sum,
        "entropy_sum": stats.entropy_sum,
        "tokens": stats.tokens,
        "fed_tokens": stats.fed_tokens,
        "micro_batches": stats.micro_batches,
        "diff_sum": float(diff.sum()),
        "diff_n": diff.numel(),
        "diff_max": float(diff.max()) if diff.numel() else 0.0,
        "ratio_max": stats.ratio_max,
    }
    a = gather_parts(part, dist or DistInfo(0, 1, 0))
    adv, tokens = a["adv"], max(a["tokens"], 1)
    return {
        "step": step,
        "reward_mean": mean(a["rewards"]),
        "reward_std": std(a["rewards"]),
        "accuracy": mean(a["correct"]),
        "adv_mean": mean(adv),
        "adv_std": std(adv),
        "adv_abs_mean": mean([abs(x) for x in adv]),
        "adv_zero_frac": mean([float(x == 0) for x in adv]),
        "loss": a["loss"],
        "pg_loss": a["pg_loss"],
        "clip_fraction": a["clipped_tokens"] / tokens,
        "ratio_max": a["ratio_max"],
        "kl": a["kl_sum"] / tokens,
        "entropy": a["entropy_sum"] / tokens,
        "grad_norm": mean(stats.grad_norms or []),  # already global
        "lr": lr,  # the rate of this step's first update
        "logprob_mismatch_mean": a["diff_sum"] / a["diff_n"] if a["diff_n"] else 0.0,
        "logprob_mismatch_max": a["diff_max"],
        "segments_per_traj": mean(a["segments"]),
        "segments_trained": a["segments_trained"],
        "micro_batches": a["micro_batches"],
        "optimizer_steps": stats.optimizer_steps,
        "trained_tokens": a["tokens"],
        "context_mean": mean(a["context_mean"]),
        "context_peak": max(a["context_peak"], default=0),
        "memory_actions": mean(a["memory_actions"]),
        "overflow_rate": mean(a["overflow"]),
        "turns": mean(a["turns"]),
        "rollout_tok_s": a["gen_tokens"] / max(t_rollout, 1e-9),
        "update_tok_s": a["fed_tokens"] / max(t_update, 1e-9),
        "rollout_s": t_rollout,
        "update_s": t_update,
        "step_s": t_step,
    }


def gather_parts(part: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    """Every rank's ``part`` combined: lists concatenated, ``*_max`` by max, other numbers summed."""
    if dist.world_size == 1:
        return part
    parts: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, part)
    out: dict[str, Any] = {}
    for key, value in part.items():
        values = [p[key] for p in parts]
        if isinstance(value, list):
            out[key] = [x for v in values for x in v]
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values)
    return out


def should_save(step: int, cfg: Config) -> bool:
    last = step + 1 == cfg.run.steps
    return last or (cfg.run.save_every > 0 and (step + 1) % cfg.run.save_every == 0)


def trainer_state(next_step: int, rollout: Rollout) -> dict[str, Any]:
    return {"step": next_step, "rng": rng_state(rollout.generator)}


def resume(engine: Any, rollout: Rollout, ckpt: str) -> int:
    """Restore a checkpoint; returns the step to continue from."""
    state = load_checkpoint(engine, ckpt)
    set_rng_state(state["rng"], rollout.generator)
    return int(state["step"])


def open_run(run_dir: Path, cfg: Config, dist: DistInfo, engine: Any, first_step: int
             ) -> tuple[MetricsLogger, StepBar]:
    """Create the run directory, record the config, say how DeepSpeed is set up; logger and bar."""
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        print(f"[memact] DeepSpeed ZeRO stage {engine.zero_optimization_stage()} | world size "
              f"{dist.world_size} | bf16 {engine.bfloat16_enabled()} | run dir {run_dir}", flush=True)
    log = MetricsLogger(run_dir, cfg, dist.is_main)
    bar = StepBar(cfg.run.steps, cfg.logging.progress and dist.is_main, "dcpo", first_step)
    log.console = bar.console
    return log, bar
