"""DeepSpeed set-up shared by the SFT and DCPO trainers.

One process on a CPU and N processes under the ``deepspeed`` launcher go through the same
``init_deepspeed``. Gradient accumulation is ours, not DeepSpeed's: micro-batches are packed by
a token budget, so their number changes from step to step. DeepSpeed runs with
``managed_gradient_accumulation: false``: each ``engine.backward`` only accumulates, and
``engine.step()`` is the boundary (reduce, clip, update, scheduler step). The losses passed
to ``backward`` are already normalised over the whole optimizer step (``StepNormalizer``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from memact.dcpo.config import Config, ConfigError, resolve_path
from memact.dcpo.data import MicroBatch, TrainSequence, collate
from memact.dcpo.losses import StepNormalizer
from memact.dcpo.schedules import lr_multiplier
from memact.util.threads import set_threads


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_env() -> DistInfo:
    """Fill the rendezvous variables a single process lacks; the launchers set them for N."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def start_process(cfg: Config) -> DistInfo:
    """Rendezvous variables, CPU threads and seeds: the first thing a trainer does."""
    import random

    dist = init_env()
    set_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    return dist


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on the CPU (about 24 s).

    The op serves only ``inference_all_reduce`` (tensor-parallel inference); training
    collectives go through gloo either way. DeepSpeed builds it when its probe table says the
    op is compatible; that table is a module-level dict meant to persist edits.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON named by ``cfg.deepspeed.config`` with its ``"auto"`` keys filled."""
    path = resolve_path(cfg, cfg.deepspeed.config, "deepspeed.config")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config={str(path)!r}: not valid JSON ({err})") from err
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}  # "_comment" keys are for readers
    # Accumulation is ours (see the module docstring): one micro-batch per backward, the
    # caller decides when a step ends.
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds["managed_gradient_accumulation"] = False
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(cfg.optim.max_grad_norm)
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = cfg.model.dtype == "bfloat16"
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    if cfg.deepspeed.offload_optimizer:
        if zero.get("stage", 0) == 0:
            raise ConfigError("deepspeed.offload_optimizer=true needs ZeRO stage 1-3, the config has stage 0")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW, not DeepSpeedCPUAdam (a JIT build)
    return ds


def zero_stage(cfg: Config) -> int:
    return int(deepspeed_config(cfg).get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def zero3_init(cfg: Config):
    """Under ZeRO-3, ``from_pretrained`` inside this block builds the model already partitioned.

    transformers' DeepSpeed integration: while an ``HfDeepSpeedConfig`` of a stage-3 config is
    alive, ``from_pretrained`` constructs the model inside ``deepspeed.zero.Init`` (each rank
    allocates only its shard of every parameter) and loads the checkpoint one module at a time
    (gather the module's parameters, rank 0 copies the weights in, re-partition). No rank ever
    holds the whole model on its device. (The checkpoint tensors are read on the host,
    memory-mapped from the safetensors files.)

    The config object is dropped on exit: after loading, nothing on our path asks transformers
    about ZeRO-3 (its ``generate(synced_gpus=...)`` would; the rollout engine has its own loop),
    and a later ``from_pretrained`` in the same process (a test, an evaluation) must load a
    plain model again. Re-entrant; a no-op for stages 0-2.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if zero_stage(cfg) != 3 or is_deepspeed_zero3_enabled():
        yield
        return
    init_env()  # zero.Init needs the process group; it starts it from these variables
    from transformers.integrations import HfDeepSpeedConfig

    _skip_shm_comm_build()
    keep_alive = HfDeepSpeedConfig(deepspeed_config(cfg))  # noqa: F841 (transformers holds a weakref)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def lr_lambda(cfg: Config, total_steps: int | None):
    """The LR multiplier of ``optim.schedule`` at each optimizer step."""
    o = cfg.optim
    if o.schedule == "cosine" and not total_steps:
        raise ConfigError("optim.schedule=cosine needs the run's number of optimizer steps")
    return lr_multiplier(o.schedule, o.warmup_steps, total_steps or 0, o.min_lr_ratio)


def init_deepspeed(model: torch.nn.Module, cfg: Config, total_steps: int | None = None) -> Any:
    """``deepspeed.initialize`` with a torch AdamW (no fused-Adam JIT build) and the LR schedule.

    ``total_steps`` (optimizer steps of the whole run) is needed by ``optim.schedule=cosine``.
    """
    init_env()
    import deepspeed

    _skip_shm_comm_build()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (lora.target_modules matched nothing?)")
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    return engine


def optimizer_step(engine: Any) -> float:
    """``engine.step()`` (reduce, clip, update, LR schedule); returns the gradient norm before clipping.

    DeepSpeed reports the norm for ZeRO 1-3; at stage 0 with a client optimizer it reports
    None, so the norm of the local gradients is taken before the step.
    """
    local = None
    if engine.zero_optimization_stage() == 0:
        norms = [torch.linalg.vector_norm(p.grad.float()) for p in engine.module.parameters() if p.grad is not None]
        local = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    engine.step()
    reported = engine.get_global_grad_norm()
    return float(reported) if reported is not None else (local or 0.0)


@contextlib.contextmanager
def full_weights(engine: Any):
    """Every parameter whole for the duration (ZeRO-3 shards them; other stages are whole already).

    Generation with the shared HF engine and ``save_pretrained`` need whole weights.
    """
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def barrier() -> None:
    """Wait for every rank (nothing to do in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    """Where a tensor must live for a collective: NCCL takes only GPU tensors, gloo CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float], world_size: int) -> list[float]:
    """Sum scalars over ranks (identity in one process)."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def max_over_ranks(n: int, world_size: int) -> int:
    """The largest ``n`` of any rank (identity in one process)."""
    if world_size == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def idle_micro_batch(device: Any, pad_id: int = 0) -> MicroBatch:
    """A stand-in micro-batch that trains nothing: one row of two tokens, an empty loss mask.

    Run through ``token_logprobs`` it calls the same modules as a real micro-batch (the whole
    decoder, the LM head), so ZeRO-3 gathers the same parameters; its loss is 0 and every
    parameter gets an all-zero gradient.
    """
    seq = TrainSequence(tokens=[pad_id, pad_id], prompt_len=2, loss_mask=[], rollout_logprobs=[])
    return collate([seq], [], pad_id).to(device)


def lockstep(mbs: list[MicroBatch], dist: DistInfo, engine: Any) -> list[MicroBatch]:
    """``mbs`` followed by idle stand-ins up to the largest micro-batch count of any rank.

    Micro-batches are packed by a token budget, so ranks can have different numbers of them
    in a step (or none: an SFT step with fewer segments than ranks). Every rank must still
    run the same sequence of forward and backward passes: ZeRO-3 all-gathers each module's
    parameters in its forward and reduce-scatters gradients in every backward, ZeRO-2
    reduces gradients in backward, and ``engine.step()`` reduces at the boundary. A rank that
    ran fewer passes left the others' collectives unmatched (measured on 2 ranks: ZeRO-1
    failed in ``step()`` when a rank had no micro-batch, ZeRO-3 aborted in gloo with 4
    micro-batches against 3). The stand-ins train nothing (``idle_micro_batch``); step
    normalisers are computed from the real micro-batches only.
    """
    n = max_over_ranks(len(mbs), dist.world_size)
    return list(mbs) + [idle_micro_batch(engine.device) for _ in range(n - len(mbs))]


def is_idle(mb: MicroBatch) -> bool:
    """A stand-in from ``idle_micro_batch``: nothing to train, only there to keep ranks in step."""
    return not mb.index and not bool(mb.loss_mask.any())


def step_normalizer(mbs: list[MicroBatch], dist: DistInfo) -> StepNormalizer:
    """Denominators of one optimizer step, over all its micro-batches (and all ranks)."""
    norm = StepNormalizer.from_batch([m for mb in mbs for m in mb.loss_mask],
                                     [int(t) for mb in mbs for t in mb.traj_index])
    if dist.world_size > 1:
        tokens, n_seqs, n_traj = all_reduce_sum([norm.token_count, norm.n_seqs, norm.n_traj], dist.world_size)
        norm = StepNormalizer(int(tokens), int(n_seqs), int(n_traj), norm.traj_token_counts)
    return norm


# ----------------------------------------------------------------------------- memory estimate


def model_from_config(cfg: Config) -> Any:
    """The model on the meta device (no weights, no memory): from ``model.path/config.json``,
    else from ``model.architecture``."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(cfg.model.path) if cfg.model.path else None
    if path is not None and (path / "config.json").is_file():
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        arch = cfg.model.architecture
        if arch is None or arch.hidden_size <= 0:
            raise ConfigError(
                f"model.path={cfg.model.path!r} has no config.json and model.architecture is not set: "
                "give one of them (hidden_size, num_hidden_layers, num_attention_heads, "
                "num_key_value_heads, intermediate_size, vocab_size)"
            )
        for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                    "vocab_size"):
            if getattr(arch, key) <= 0:
                raise ConfigError(f"model.architecture.{key}={getattr(arch, key)}: expected > 0")
        hf_config = AutoConfig.for_model(
            arch.model_type, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_hidden_layers,
            num_attention_heads=arch.num_attention_heads, num_key_value_heads=arch.num_key_value_heads,
            intermediate_size=arch.intermediate_size, vocab_size=arch.vocab_size,
            tie_word_embeddings=arch.tie_word_embeddings,
        )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total parameters, largest single module's own parameters); tied weights counted once."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def estimate_gib_per_gpu(stage: int, total: int, largest: int, gpus_per_node: int, nodes: int,
                         offload_optimizer: bool) -> float | None:
    """DeepSpeed's estimate of model-state memory per GPU (params, grads, optimizer), GiB.

    Activations are not included. ZeRO 0 and 1 have no DeepSpeed estimator: stage 0 is the
    stage-2 figure on one GPU (nothing sharded); stage 1 returns None.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes,
                                                          cpu_offload=offload_optimizer, cpu_offload_params=False,
                                                          zero_init=True)
    elif stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=offload_optimizer)
    elif stage == 0:
        _, gpu = estimate_zero2_model_states_mem_needs(total, 1, 1, cpu_offload=False)
    else:
        return None
    return gpu / 2**30


def print_deepspeed_estimates(stage: int, total: int, largest: int, gpus_per_node: int, nodes: int) -> None:
    """DeepSpeed's own table of options (``estimate_zero{2,3}_model_states_mem_needs_all_cold``)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    if stage == 3:
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, gpus_per_node, nodes)
    else:
        estimate_zero2_model_states_mem_needs_all_cold(total, gpus_per_node, nodes)


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
