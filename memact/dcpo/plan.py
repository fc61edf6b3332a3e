"""``--dry-run``: check a config and print the batch arithmetic and memory per GPU, loading no weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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
    tp = cfg.rollout.vllm.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
    if world_size % tp:
        raise ConfigError(f"rollout.vllm.tensor_parallel_size={tp}: expected a divisor of the world size {world_size} "
                          "(one engine per group of that many ranks)")
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


def dry_run(cfg: Config, world: World, mode: str = "train", gpu_gib: float = 80.0) -> str:
    """The report ``memact train|sft --dry-run`` prints (DeepSpeed's own estimate table goes to stdout too).

    ``gpu_gib``: memory of one GPU, for the plan of a colocated vLLM engine (``rollout.engine: vllm``).
    """
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
    ref_gib = total * (2 if cfg.model.dtype == "bfloat16" else 4) / 2**30
    if mode == "train" and d.kl_coef > 0 and not cfg.lora.enabled:
        if stage == 3:
            lines.append(f"reference    + {ref_gib / world.size:.1f} GiB per GPU: the frozen initial model, "
                         f"ZeRO-3-sharded over {world.size} rank(s) (a DeepSpeed engine without optimizer; "
                         "kl_coef > 0; LoRA avoids it)")
        else:
            lines.append(f"reference    + {ref_gib:.1f} GiB per GPU: the frozen initial model is a full, unsharded "
                         f"copy at ZeRO stage {stage} (kl_coef > 0; ZeRO 3 shards it, LoRA avoids it)")
    if mode == "train" and r.engine == "vllm":
        ref = ref_gib if d.kl_coef > 0 and not cfg.lora.enabled else 0.0
        lines += vllm_plan(cfg, model.config, total, gib, ref / (world.size if stage == 3 else 1), gpu_gib,
                           world.size)
    print("\n".join(lines), flush=True)
    print_deepspeed_estimates(stage, total, largest, world.gpus_per_node, world.nodes)
    return "\n".join(lines)


GIB = 2**30
VLLM_RESERVE_GIB = 2.0  # vLLM's own activations and buffers inside its share, besides weights and KV cache


def _bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def activation_gib(cfg: Config, hf: Any) -> float:
    """A rough upper bound on the update's activations per GPU: one micro-batch of
    ``batch.max_tokens_per_micro_batch`` tokens (layer inputs kept for every layer with gradient
    checkpointing, else every layer's intermediates), one layer's intermediates, and the fp32
    logits of the output layer (the fused log-prob kernel avoids those)."""
    t = cfg.batch.max_tokens_per_micro_batch
    b = _bytes(cfg.model.dtype)
    hidden, inter, layers = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers
    per_layer = t * (10 * hidden + 3 * inter) * b  # attention and MLP intermediates of one layer
    kept = t * hidden * b * layers if cfg.model.gradient_checkpointing else per_layer * layers
    logits = 0 if cfg.model.fused_logprobs else 2 * t * hf.vocab_size * 4  # logits and their gradient, fp32
    return (kept + per_layer + logits) / GIB


def vllm_plan(cfg: Config, hf: Any, total: int, states_gib: float | None, ref_gib: float, gpu_gib: float,
              ranks: int = 1) -> list[str]:
    """Lines of the dry run for a vLLM engine beside each rank: both phases of a step on one GPU."""
    v, r = cfg.rollout.vllm, cfg.rollout
    dtype = cfg.model.dtype if v.dtype == "auto" else v.dtype
    weights = total * _bytes(dtype) / v.tensor_parallel_size / GIB
    share = v.gpu_memory_utilization * gpu_gib
    kv = share - weights - VLLM_RESERVE_GIB
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * head_dim * _bytes(dtype) / v.tensor_parallel_size
    tokens = max(kv, 0) * GIB / kv_token
    states = states_gib if states_gib is not None else 0.0
    act = activation_gib(cfg, hf)
    trainer_static = states + ref_gib
    lines = [
        f"vllm         one engine per rank (TP {v.tensor_parallel_size}, {dtype}), colocated on a {gpu_gib:g} GiB "
        f"GPU: share {v.gpu_memory_utilization:g} = {share:.1f} GiB = weights {weights:.1f} + KV cache {kv:.1f} + "
        f"~{VLLM_RESERVE_GIB:g} its own",
        f"  KV cache   {kv_token / 2**20:.3f} MiB a token -> {tokens:,.0f} tokens = {tokens / r.context_budget:.1f} "
        f"contexts of {r.context_budget} (prefix caching shares each task's head); "
        f"{r.prompts_per_step * r.n_traj // ranks} episodes a rank a step",
        f"  rollouts   trainer states {states:.1f} + reference {ref_gib:.1f} + vLLM {share:.1f} = "
        f"{trainer_static + share:.1f} GiB of {gpu_gib:g}" + ("" if trainer_static + share <= gpu_gib else
                                                                 "  ** does not fit **"),
    ]
    if v.enable_sleep_mode:
        lines.append(f"  update     vLLM asleep (weights offloaded, KV cache freed): trainer states {states:.1f} + "
                     f"reference {ref_gib:.1f} + activations <= {act:.1f} (rough) = {trainer_static + act:.1f} GiB of "
                     f"{gpu_gib:g}" + ("" if trainer_static + act <= gpu_gib else "  ** does not fit **"))
    else:
        lines.append(f"  update     vLLM awake (enable_sleep_mode false): {trainer_static + share + act:.1f} GiB of "
                     f"{gpu_gib:g} with activations <= {act:.1f} (rough)"
                     + ("" if trainer_static + share + act <= gpu_gib else "  ** does not fit **"))
    if kv <= 0:
        lines.append("  ** the share holds no KV cache: raise rollout.vllm.gpu_memory_utilization or "
                     "tensor_parallel_size **")
    return lines
