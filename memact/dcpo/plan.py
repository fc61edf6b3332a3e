"""``--dry-run``: check a config and print the batch arithmetic and memory per GPU, loading no weights."""

from __future__ import annotations

import os
from dataclasses import dataclass

from memact.dcpo.config import Config, ConfigError
from memact.dcpo.distributed import (
    ceil_div,
    deepspeed_config,
    estimate_gib_per_gpu,
    model_from_config,
    parameter_counts,
    print_deepspeed_estimates,
    zero_stage,
)


@dataclass
class World:
    size: int
    gpus_per_node: int

    @property
    def nodes(self) -> int:
        return ceil_div(self.size, self.gpus_per_node)


def resolve_world(num_gpus: int | None = None) -> World:
    """World size from ``--num-gpus`` (one node), else WORLD_SIZE / LOCAL_WORLD_SIZE, else 1."""
    if num_gpus is not None:
        if num_gpus < 1:
            raise ConfigError(f"--num-gpus={num_gpus}: expected >= 1")
        return World(num_gpus, num_gpus)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(size, int(os.environ.get("LOCAL_WORLD_SIZE", str(size))))


def check_world(cfg: Config, world_size: int) -> None:
    """DCPO-only checks: sequences fit, and every rank gets the same number of prompts and
    mini-batches (ranks step together)."""
    r, b = cfg.rollout, cfg.batch
    if r.context_budget > b.max_seq_len:
        raise ConfigError(f"rollout.context_budget={r.context_budget}: expected <= batch.max_seq_len "
                          f"({b.max_seq_len}); a segment can be as long as the context budget")
    p = cfg.rollout.prompts_per_step
    if p % world_size:
        raise ConfigError(f"rollout.prompts_per_step={p}: expected a multiple of the world size {world_size}")
    if p // world_size < cfg.dcpo.mini_batches:
        raise ConfigError(f"dcpo.mini_batches={cfg.dcpo.mini_batches}: expected <= prompts per rank "
                          f"({p // world_size})")
    if b.layout in ("prefix", "tree") and world_size > 1 and zero_stage(cfg) == 3:
        # ZeRO-3 gathers parameters module call by module call, so ranks must call the same
        # modules in the same order; a prefix-reuse micro-batch runs the decoder twice, a
        # micro-batch without a shared prefix once.
        raise ConfigError(f"batch.layout={b.layout}: not supported with ZeRO stage 3 on more than one rank")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def dry_run(cfg: Config, world: World, mode: str = "train") -> str:
    """The report ``memact train|sft --dry-run`` prints (DeepSpeed's own estimate table goes to stdout too)."""
    if mode == "train":
        check_world(cfg, world.size)
    ds = deepspeed_config(cfg)
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    model = model_from_config(cfg)
    total, largest = parameter_counts(model)
    source = "config.json" if cfg.model.path and os.path.isfile(os.path.join(cfg.model.path, "config.json")) \
        else "model.architecture (no local weights)"
    r, d, b = cfg.rollout, cfg.dcpo, cfg.batch
    lines = [
        f"config       {cfg.source or '(defaults)'}",
        f"model        {cfg.model.path or '-'} [{source}]: {_count(total)} parameters, largest module "
        f"{_count(largest)}",
        f"world        {world.size} rank(s) = {world.nodes} node(s) x {world.gpus_per_node}",
        f"deepspeed    {cfg.deepspeed.config}: ZeRO stage {stage} | bf16 {ds.get('bf16', {}).get('enabled')} | "
        f"offload optimizer {cfg.deepspeed.offload_optimizer} | gradient checkpointing "
        f"{cfg.model.gradient_checkpointing} | LoRA {cfg.lora.enabled}",
        f"optimizer    AdamW lr {cfg.optim.lr:g}, {cfg.optim.warmup_steps} warm-up steps, clip grad norm "
        f"{cfg.optim.max_grad_norm:g}",
    ]
    budget = b.max_tokens_per_micro_batch
    per_mb = max(budget // b.max_seq_len, 1)  # worst case: every sequence max_seq_len long
    if mode == "train":
        per_rank = r.prompts_per_step // world.size
        if d.segment_sampling == "round_robin":
            seg_rank = per_rank * d.n_seg
            seg_text = f"{r.prompts_per_step * d.n_seg} ({seg_rank} per rank; round_robin N_seg={d.n_seg})"
        else:
            seg_rank = None
            seg_text = "all segments of every trajectory (count varies with the edits)"
        lines += [
            f"step         {r.prompts_per_step} prompts ({per_rank} per rank) x N_traj {r.n_traj} = "
            f"{r.prompts_per_step * r.n_traj} trajectories ({per_rank * r.n_traj} per rank); K = {r.objectives}; "
            f"context budget {r.context_budget} tokens, {r.max_steps} turns per episode (rollout.max_steps)",
            f"segments     {seg_text}",
            f"updates      {d.ppo_epochs} epoch(s) x {d.mini_batches} mini-batch(es) = "
            f"{d.ppo_epochs * d.mini_batches} optimizer step(s) per DCPO step; {cfg.run.steps} DCPO training "
            "steps (run.steps)",
        ]
        if seg_rank is not None:
            seg_opt = ceil_div(seg_rank, d.mini_batches)
            lines.append(
                f"micro-batch  token budget {budget} per rank, sequences <= {b.max_seq_len} tokens -> "
                f">= {per_mb} sequence(s) each; {seg_opt} segments per optimizer step per rank -> gradient "
                f"accumulation over <= {ceil_div(seg_opt, per_mb)} micro-batches")
        lines.append(f"loss         {d.loss_agg}, clip [{1 - d.clip_low:g}, {1 + d.clip_high:g}], KL coef "
                     f"{d.kl_coef:g}{' (reference model kept)' if d.kl_coef > 0 else ''}, entropy coef "
                     f"{d.entropy_coef:g}")
    else:
        lines.append(f"sft          {cfg.sft.segments_per_step} segments per optimizer step over all ranks, "
                     f"{cfg.sft.epochs} epochs; token budget {budget} per micro-batch")
    gib = estimate_gib_per_gpu(stage, total, largest, world.gpus_per_node, world.nodes,
                               cfg.deepspeed.offload_optimizer)
    if gib is None:
        lines.append("memory       ZeRO 1 has no DeepSpeed estimator; see the ZeRO 2 table below (a lower bound)")
    else:
        lines.append(f"memory       DeepSpeed estimate of model states (params, grads, optimizer) per GPU: "
                     f"{gib:.1f} GiB (activations not included)")
    if mode == "train" and d.kl_coef > 0 and not cfg.lora.enabled:
        ref_gib = total * (2 if cfg.model.dtype == "bfloat16" else 4) / 2**30
        if stage == 3:
            lines.append(f"reference    + {ref_gib / world.size:.1f} GiB per GPU: the frozen initial model, "
                         f"ZeRO-3-sharded over {world.size} rank(s) (a DeepSpeed engine without optimizer; "
                         "kl_coef > 0; LoRA avoids it)")
        else:
            lines.append(f"reference    + {ref_gib:.1f} GiB per GPU: the frozen initial model is a full, unsharded "
                         f"copy at ZeRO stage {stage} (kl_coef > 0; ZeRO 3 shards it, LoRA avoids it)")
    print("\n".join(lines), flush=True)
    print_deepspeed_estimates(stage, total, largest, world.gpus_per_node, world.nodes)
    return "\n".join(lines)
