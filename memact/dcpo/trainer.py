"""DCPO training: the loop of docs/design.md section 4, top to bottom in ``train``.

Each step: sample prompts -> N_traj rollouts per prompt -> rewards -> group advantages (one
per trajectory) -> segments -> segment sampling -> old and reference log-probs ->
micro-batches -> DeepSpeed update(s) -> weights back to the rollout engine -> metrics ->
checkpoint. The helpers below ``train`` each do one of those arrows.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memact.agent.chat import ChatRenderer
from memact.agent.loop import run_episodes
from memact.agent.strategies import parse_strategy
from memact.dcpo.advantages import broadcast_to_segments, control_advantages, group_advantages
from memact.dcpo.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from memact.dcpo.config import Config, DCPOConfig, RolloutConfig, to_yaml
from memact.dcpo.data import MicroBatch, TrainSequence
from memact.dcpo.distributed import (
    DistInfo,
    full_weights,
    init_deepspeed,
    is_idle,
    lockstep,
    optimizer_step,
    start_process,
    step_normalizer,
)
from memact.dcpo.losses import dcpo_loss, tis_weights
from memact.dcpo.metrics import MetricsLogger, StepBar, UpdateStats, step_metrics
from memact.dcpo.modeling import frozen_reference, load_for_training, reference_logprobs, token_logprobs
from memact.dcpo.packing import build_micro_batches
from memact.dcpo.plan import check_world
from memact.dcpo.sampling import sample_segments
from memact.engines.base import SamplingParams, prompt_token_counts
from memact.engines.factory import build_engine, pad_token_id
from memact.env.curriculum import Curriculum
from memact.env.memory import Budget
from memact.env.task import Task
from memact.models.model import torch_dtype
from memact.trajectory import Segment, Trajectory, segment_trajectory
from memact.util.seeds import derive_seed


def train(cfg: Config) -> Path:
    """Run DCPO for ``cfg.run.steps`` steps; returns the run directory."""
    dist = start_process(cfg)
    check_world(cfg, dist.world_size)
    run_dir = Path(cfg.run.out_dir)
    model, tokenizer = load_for_training(cfg)
    ref = frozen_reference(model, cfg) if cfg.dcpo.kl_coef > 0 else None  # the initial policy, frozen
    engine = init_deepspeed(model, cfg, total_steps=cfg.run.steps * cfg.dcpo.ppo_epochs * cfg.dcpo.mini_batches)
    group, n_groups, member = rollout_group(cfg, dist)
    rollout = Rollout(engine.module, tokenizer, cfg.rollout, model_dir=cfg.model.path, model_dtype=cfg.model.dtype,
                      seed=cfg.run.seed + group, colocated=dist.world_size > 1 and torch.cuda.is_available())
    first_step = resume(engine, rollout, cfg.run.resume) if cfg.run.resume else 0
    push_weights(rollout, engine, first_step)  # an engine of its own may hold other weights than the trainer's
    log, bar = open_run(run_dir, cfg, dist, engine, first_step)
    for step in range(first_step, cfg.run.steps):
        t0 = time.perf_counter()
        seed = step_seed(cfg.run.seed, step, group)
        with full_weights(engine):
            drawn = collect_groups(rollout, cfg, step, group, n_groups)
        rollout.sleep()  # a colocated vLLM engine frees the GPU for the update
        trajs, groups = my_share(drawn.trajs, drawn.groups, member, dist.world_size // n_groups)
        t_rollout = time.perf_counter() - t0
        rewards = [t.reward for t in trajs]
        traj_adv = group_advantages(rewards, groups, cfg.dcpo.adv_norm, cfg.dcpo.adv_estimator)
        traj_adv = control_advantages(traj_adv, groups, cfg.dcpo.control,
                                      torch.Generator().manual_seed(derive_seed(cfg.run.seed, "dcpo_control", step,
                                                                                dist.rank)))
        segments = [segment_trajectory(t.calls) for t in trajs]
        seqs = select_segments(segments, traj_adv, groups, cfg.dcpo, random.Random(seed))
        minis = pack_mini_batches(seqs, cfg, rollout.pad_id, engine.device)
        fill_old_and_ref_logprobs(engine, ref, minis, cfg, dist)
        tis = importance_weights(minis, cfg.dcpo)
        snr = step_gradient_snr(engine, seqs, cfg, rollout.pad_id, dist) if cfg.logging.grad_snr else None
        t1, lr = time.perf_counter(), engine.get_lr()[0]
        stats = update(engine, minis, cfg, dist)
        t_update = time.perf_counter() - t1
        stats.tis_weight_sum, stats.tis_truncated, stats.tis_tokens = tis
        stats.grad_snr = snr
        t_push = time.perf_counter()
        push_weights(rollout, engine, step + 1)
        stats.push_s = time.perf_counter() - t_push
        row = step_metrics(step, trajs, traj_adv, segments, seqs, minis, stats, lr, t_rollout, t_update,
                           time.perf_counter() - t0, dist, drawn.summary())
        log.log(row)
        bar.update(step + 1, f"reward {row['reward_mean']:.3f} acc {row['accuracy']:.2f} kl {row['kl']:.1e}")
        if should_save(step, cfg):
            save_checkpoint(engine, tokenizer, run_dir, step + 1, trainer_state(step + 1, rollout),
                            cfg.run.keep_checkpoints, dist.is_main)
    bar.stop()
    log.close()
    rollout.close()
    return run_dir


# ----------------------------------------------------------------------------- rollouts


class StaleWeightsError(RuntimeError):
    """The rollout engine holds other weights than the policy the trainer is at."""


class Rollout:
    """The rollout side: an engine from the factory (``rollout.engine``), plus episode settings.

    The HF engine shares the trained module (no weight copy); an engine with weights of its
    own (vLLM) receives them in :func:`push_weights` after every update. ``weights_step`` is
    the training step whose weights the engine holds: :meth:`run` refuses to roll out for
    another step, so a step that forgot the push stops instead of training on stale samples.
    """

    def __init__(self, model: Any, tokenizer: Any, rc: RolloutConfig, progress: bool = False,
                 model_dir: str = "", model_dtype: str = "float32", seed: int = 0, colocated: bool = False):
        self.pad_id = pad_token_id(tokenizer)
        options = vllm_options(rc, model_dtype)
        if colocated:  # vLLM in this process on this rank's GPU, its TP group from the trainer's torch.distributed
            options["distributed_executor_backend"] = "external_launcher"
        self.engine = build_engine(rc.engine, model, tokenizer, max_batch_size=rc.max_batch_size,
                                   model_dir=model_dir or None, seed=seed, vllm=options,
                                   prefix_cache_tokens=rc.prefix_cache_tokens)
        self.renderer = ChatRenderer(tokenizer)
        self.sampling = SamplingParams(temperature=rc.temperature, top_p=rc.top_p,
                                       max_new_tokens=rc.max_new_tokens)
        self.budget = Budget(rc.context_budget, rc.max_steps)
        self.strategy = parse_strategy(rc.strategy)
        self.curriculum = Curriculum(rc.objectives, tuple(rc.curriculum), rc.curriculum_mode, rc.tasks, rc.retrieval)
        self.progress = progress
        self.weights_step: int | None = None

    @property
    def generator(self) -> torch.Generator:
        return self.engine.generator

    def run(self, tasks: list[Task], groups: list[int], seed: int, step: int | None = None) -> list[Trajectory]:
        """Episodes of ``tasks``; with ``step``, only from the weights of that training step."""
        if step is not None and self.weights_step != step:
            raise StaleWeightsError(
                f"step {step}: the rollout engine holds the weights of step {self.weights_step} "
                "(push_weights was not called after the last update): its samples would be stale")
        self.wake_up()
        return run_episodes(self.engine, tasks, self.renderer, self.sampling, budget=self.budget,
                            strategy=self.strategy, seed=seed, groups=groups, progress=self.progress)

    def sleep(self) -> None:
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()

    def wake_up(self) -> None:
        if hasattr(self.engine, "wake_up"):
            self.engine.wake_up()

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()


def rollout_group(cfg: Config, dist: DistInfo) -> tuple[int, int, int]:
    """(group, number of groups, place in the group) of this rank: the ranks of one
    tensor-parallel vLLM engine form a group, which rolls out one set of prompts together."""
    tp = cfg.rollout.vllm.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
    return dist.rank // tp, dist.world_size // tp, dist.rank % tp


def my_share(trajs: list[Trajectory], groups: list[int], member: int, size: int) -> tuple[list[Trajectory], list[int]]:
    """This rank's whole prompt groups of what its tensor-parallel group rolled out (every member
    holds the same trajectories; each trains a disjoint share, so each token is trained once)."""
    if size == 1:
        return trajs, groups
    keep = set(sorted(set(groups))[member::size])
    mine = [i for i, g in enumerate(groups) if g in keep]
    return [trajs[i] for i in mine], [groups[i] for i in mine]


def vllm_options(rc: RolloutConfig, model_dtype: str) -> dict[str, Any]:
    """``rollout.vllm`` as :class:`memact.engines.vllm.VLLMEngine` keyword arguments."""
    v = rc.vllm
    return {
        "tensor_parallel_size": v.tensor_parallel_size, "gpu_memory_utilization": v.gpu_memory_utilization,
        "cpu_kv_cache_gib": v.cpu_kv_cache_gib, "max_num_seqs": v.max_num_seqs,
        "max_model_len": v.max_model_len or rc.context_budget + rc.max_new_tokens,
        "dtype": model_dtype if v.dtype == "auto" else v.dtype, "enforce_eager": v.enforce_eager,
        "enable_sleep_mode": v.enable_sleep_mode, "enable_prefix_caching": v.enable_prefix_caching,
    }


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed of its own for each (run seed, step, rank): steps replay exactly after a resume."""
    return derive_seed(seed, "dcpo_step", step, rank)


def sample_prompts(rc: RolloutConfig, seed: int, step: int, dist: DistInfo,
                   total_steps: int = 0) -> tuple[list[Task], list[int]]:
    """This rank's prompts of the step (``memact.env.curriculum``), each repeated ``n_traj``
    times, and their group ids.

    Prompt g of the step goes to rank g % world_size; group ids are the step-wide prompt index.
    """
    curriculum = Curriculum(rc.objectives, tuple(rc.curriculum), rc.curriculum_mode, rc.tasks, rc.retrieval)
    prompts = curriculum.prompts(seed, step, rc.prompts_per_step, total_steps)
    mine = [g for g in range(rc.prompts_per_step) if g % dist.world_size == dist.rank]
    tasks = [prompts[g] for g in mine for _ in range(rc.n_traj)]
    groups = [g for g in mine for _ in range(rc.n_traj)]
    return tasks, groups


@dataclass
class Drawn:
    """What one step rolled out (this rank's prompts): the groups it trains, and the counts
    dynamic sampling reports."""

    trajs: list[Trajectory]
    groups: list[int]
    all_trajs: list[Trajectory] = field(default_factory=list)
    """Every trajectory rolled out, the dropped groups' included (their reward is the policy's)."""
    groups_drawn: int = 0
    groups_uniform: int = 0
    groups_dropped: int = 0
    rounds: int = 1
    prompt_prefilled: int = 0
    """Prompt tokens the engine computed over the step's rollouts."""
    prompt_reused: int = 0
    """Prompt tokens whose KV the engine kept from the episode's previous turn."""
    groups_failed: int = 0
    """Groups left out because an episode of theirs failed (:func:`failed_groups`)."""

    def summary(self) -> dict[str, Any]:
        return {"groups_drawn": self.groups_drawn, "groups_uniform": self.groups_uniform,
                "groups_failed": self.groups_failed,
                "groups_dropped": self.groups_dropped, "draws_max": self.rounds,
                "prompt_prefilled": self.prompt_prefilled, "prompt_reused": self.prompt_reused,
                "drawn_reward": [t.reward for t in self.all_trajs],
                "drawn_gen_tokens": sum(len(c.output_ids) for t in self.all_trajs for c in t.calls)}


def uniform_groups(trajs: list[Trajectory], groups: list[int]) -> set[int]:
    """The groups whose rewards are all equal: their advantages are 0, they carry no gradient."""
    rewards: dict[int, set[float]] = {}
    for t, g in zip(trajs, groups):
        rewards.setdefault(g, set()).add(t.reward)
    return {g for g, r in rewards.items() if len(r) == 1}


def failed_groups(trajs: list[Trajectory], groups: list[int]) -> set[int]:
    """The groups with an episode that failed through no fault of the policy (``Trajectory.error``:
    a retrieval server down, an engine error): their rewards say nothing about the policy."""
    return {g for t, g in zip(trajs, groups) if t.error is not None}


def collect_groups(rollout: Rollout, cfg: Config, step: int, group: int, n_groups: int) -> Drawn:
    """The step's rollouts of this rank's (tensor-parallel group's) prompts.

    With ``rollout.dynamic_sampling`` the groups whose rewards are all equal are dropped and
    further prompts (same K per prompt index, other tasks, seeded by step, round and rank)
    rolled out until the rank's share of ``prompts_per_step`` has signal or ``max_draws``
    rounds are spent; each round draws what is missing over the share kept so far (at least a
    quarter), at most ``prompts_per_step``, and the surplus with signal is dropped too. If no
    group of the step has signal, the first round's groups are trained as they are
    (advantages 0: only the KL term acts), as without dynamic sampling.
    """
    engine = getattr(rollout, "engine", None)
    counts = prompt_token_counts(engine)
    out = _draw_groups(rollout, cfg, step, group, n_groups)
    out.prompt_prefilled, out.prompt_reused = (b - a for a, b in zip(counts, prompt_token_counts(engine)))
    return out


def _draw_groups(rollout: Rollout, cfg: Config, step: int, group: int, n_groups: int) -> Drawn:
    rc, seed = cfg.rollout, cfg.run.seed
    tasks, ids = sample_prompts(rc, seed, step, DistInfo(group, n_groups, 0), cfg.run.steps)
    trajs = rollout.run(tasks, ids, step_seed(seed, step, group), step)
    failed = failed_groups(trajs, ids)
    uniform = uniform_groups(trajs, ids) | failed
    quota = len(set(ids))
    out = Drawn(trajs, ids, list(trajs), quota, len(uniform), 0, 1, groups_failed=len(failed))
    if failed and not rc.dynamic_sampling and len(failed) < quota:
        out.trajs = [t for t, g in zip(trajs, ids) if g not in failed]
        out.groups = [g for g in ids if g not in failed]
    if not rc.dynamic_sampling or not uniform:
        out.groups_dropped = out.groups_drawn - len(set(out.groups))
        return out
    keep_t = [t for t, g in zip(trajs, ids) if g not in uniform]
    keep_g = [g for g in ids if g not in uniform]
    for rnd in range(1, rc.max_draws):
        missing = quota - len(set(keep_g))
        if missing <= 0:
            break
        rate = max((out.groups_drawn - out.groups_uniform) / out.groups_drawn, 0.25)
        n = min(rc.prompts_per_step, math.ceil(missing / rate))
        curriculum = Curriculum(rc.objectives, tuple(rc.curriculum), rc.curriculum_mode, rc.tasks, rc.retrieval)
        prompts = curriculum.prompts(seed, step, n, cfg.run.steps, draw=(rnd, group))
        more_ids = [rc.prompts_per_step * (rnd * n_groups + group) + i for i in range(n) for _ in range(rc.n_traj)]
        more = rollout.run([p for p in prompts for _ in range(rc.n_traj)], more_ids,
                           derive_seed(seed, "dcpo_episodes_more", step, rnd, group), step)
        more_failed = failed_groups(more, more_ids)
        out.groups_failed += len(more_failed)
        more_uniform = uniform_groups(more, more_ids) | more_failed
        out.all_trajs += more
        out.groups_drawn += n
        out.groups_uniform += len(more_uniform)
        out.rounds = rnd + 1
        with_signal = [g for g in dict.fromkeys(more_ids) if g not in more_uniform][:missing]
        keep_t += [t for t, g in zip(more, more_ids) if g in set(with_signal)]
        keep_g += [g for g in more_ids if g in set(with_signal)]
    if keep_t:
        out.trajs, out.groups = keep_t, keep_g
    out.groups_dropped = out.groups_drawn - len(set(out.groups))
    return out


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
    dtype = torch_dtype(cfg.model.dtype)
    return [[mb.to(device) for mb in build_micro_batches(part, cfg.batch, pad_id, cfg.model.attn_implementation, dtype)]
            for part in split_by_prompt(seqs, cfg.dcpo.mini_batches)]


# ----------------------------------------------------------------------------- log-probs and update


def trainer_temperature(cfg: Config) -> float:
    """The temperature of the rollout log-probs (greedy rollouts report T = 1)."""
    return SamplingParams(temperature=cfg.rollout.temperature).logprob_temperature


@torch.no_grad()
def fill_old_and_ref_logprobs(engine: Any, ref: Any, minis: list[list[MicroBatch]], cfg: Config,
                              dist: DistInfo | None = None) -> None:
    """Old log-probs from the current policy before any update (the ratio's denominator), and
    reference log-probs when the KL term is on. The engine's rollout log-probs serve the
    mismatch metric and the truncated importance weights pi_old / pi_rollout
    (:func:`importance_weights`): the trainer's forward is the consistent baseline for the ratio."""
    dist = dist or DistInfo(0, 1, 0)
    temp = trainer_temperature(cfg)
    mine = [mb for mbs in minis for mb in mbs]
    for mb in lockstep(mine, dist, engine):  # ZeRO-3: every rank runs as many forwards
        mb.old_logprobs, _ = token_logprobs(engine, mb, temp, with_entropy=False, fused=cfg.model.fused_logprobs)
        if cfg.dcpo.kl_coef > 0:
            mb.ref_logprobs = reference_logprobs(engine, ref, mb, temp, fused=cfg.model.fused_logprobs)


def importance_weights(minis: list[list[MicroBatch]], dc: DCPOConfig) -> tuple[float, int, int]:
    """The truncated importance weights of the step, once: set on each micro-batch with ``dcpo.tis``;
    with it off, the token-level ones it would give are only counted (a measure of the mismatch).

    Returns the weights' sum, how many tokens hit ``dcpo.tis_cap``, and the trained tokens.
    """
    mode = dc.tis if dc.tis != "off" else "token"
    total, cut_n, tokens = 0.0, 0, 0
    for mb in (mb for mbs in minis for mb in mbs):
        if is_idle(mb):
            continue
        w, cut = tis_weights(mb.old_logprobs, mb.rollout_logprobs, mb.loss_mask, mode, dc.tis_cap)
        if dc.tis != "off":
            mb.is_weights = w
        total, cut_n, tokens = total + float(w.sum()), cut_n + int(cut.sum()), tokens + int(mb.loss_mask.sum())
    return total, cut_n, tokens


def step_gradient_snr(engine: Any, seqs: list[TrainSequence], cfg: Config, pad_id: int,
                      dist: DistInfo) -> float | None:
    """``grad_snr`` of the step (``memact.dcpo.snr``), at the rollout policy, before the update."""
    from memact.dcpo.snr import gradient_snr

    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        raise RuntimeError("logging.grad_snr needs the full parameters on every rank: ZeRO stage 0-2, not 3")
    dtype = torch_dtype(cfg.model.dtype)

    def micro_batches(part: list[TrainSequence]) -> list[MicroBatch]:
        return [mb.to(engine.device) for mb in
                build_micro_batches(part, cfg.batch, pad_id, cfg.model.attn_implementation, dtype)]

    value, _ = gradient_snr(engine.module, seqs, micro_batches, trainer_temperature(cfg),
                            fused=cfg.model.fused_logprobs, world_size=dist.world_size)
    return value


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
                            entropy_coef=dc.entropy_coef, entropy=ent, agg=dc.loss_agg, is_weights=mb.is_weights)
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


def push_weights(rollout: Rollout, engine: Any, step: int) -> None:
    """Give the rollout engine the trainer's weights; from now on it rolls out for ``step``.

    The HF engine shares the trained module: nothing to copy. An engine with its own weights
    (``sync_weights(named_tensors)``) gets them under the HF checkpoint's names: LoRA merged in
    (``merged_lora_state_dict``, inside ``full_weights`` under ZeRO-3), ZeRO-3 parameters
    gathered a bucket at a time (``iter_zero3_params``), the tied output layer added by the
    engine. Every rank runs this (gathering is collective); each rank's own engine receives the
    weights.
    """
    from memact.dcpo.modeling import core_model, merged_lora_state_dict

    if getattr(rollout.engine, "model", None) is not engine.module:
        sync = getattr(rollout.engine, "sync_weights", None)
        if sync is None:
            raise RuntimeError("the rollout engine neither shares the trained model nor has sync_weights()")
        rollout.wake_up()
        if hasattr(engine.module, "get_base_model"):  # LoRA: what a merged checkpoint would hold
            with full_weights(engine):
                sync(merged_lora_state_dict(engine.module).items())
        elif getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
            from memact.engines.vllm import iter_zero3_params

            sync(iter_zero3_params(core_model(engine.module)))
        else:
            sync(core_model(engine.module).named_parameters())
    rollout.weights_step = step


# ----------------------------------------------------------------------------- state


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
    log = MetricsLogger(run_dir, cfg, dist.is_main, first_step=first_step)
    bar = StepBar(cfg.run.steps, cfg.logging.progress and dist.is_main, "dcpo", first_step)
    log.console = bar.console
    return log, bar
