"""One typed config tree for the SFT and DCPO trainers.

Every field is declared here, once, with its unit and default in the docstring under it.
YAML files in ``configs/`` only set values; ``load_config`` merges, in order: these
defaults, the YAML file, then ``key=value`` overrides from the command line
(``optim.lr=3e-4 rollout.n_traj=4``). A key that is not declared here is an error, so a
typo in a YAML file or an override cannot be silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memact.dcpo.advantages import CONTROLS, ESTIMATORS, NORMS
from memact.dcpo.losses import AGG_MODES, TIS_MODES
from memact.dcpo.packing import LAYOUTS
from memact.dcpo.sampling import MODES as SEGMENT_SAMPLING
from memact.dcpo.schedules import SCHEDULES
from memact.engines.factory import ENGINES, VLLM_DTYPES
from memact.env.curriculum import CURRICULUM_MODES
from memact.env.memory import DEFAULT_CONTEXT_BUDGET, DEFAULT_MAX_STEPS
from memact.models.model import DTYPES


@dataclass
class ArchitectureConfig:
    """Shape of a model whose weights are not on this machine (dry runs, memory estimates).

    Used only when ``model.path`` has no ``config.json``. Defaults are 0 (unset); a dry run
    with neither a local config nor this block is an error.
    """

    model_type: str = "qwen2"
    """Hugging Face ``model_type`` (``qwen2``, ``qwen3``, ``llama``); picks the config class."""
    hidden_size: int = 0
    """Width of the residual stream (Qwen2.5-14B: 5120)."""
    num_hidden_layers: int = 0
    """Decoder layers (Qwen2.5-14B: 48)."""
    num_attention_heads: int = 0
    """Query heads (Qwen2.5-14B: 40)."""
    num_key_value_heads: int = 0
    """Key/value heads, grouped-query attention (Qwen2.5-14B: 8)."""
    intermediate_size: int = 0
    """MLP inner width (Qwen2.5-14B: 13824)."""
    vocab_size: int = 0
    """Rows of the embedding and LM head (Qwen2.5-14B: 152064)."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head (False for Qwen2.5-14B)."""


@dataclass
class ModelConfig:
    """The policy being trained."""

    path: str = ""
    """Local model directory (``config.json``, weights, tokenizer): a ``memact new-model`` output,
    an SFT checkpoint, or a real checkpoint such as Qwen2.5-14B-Instruct. Required."""
    architecture: ArchitectureConfig | None = None
    """Shape to use when ``path`` holds no ``config.json`` (dry runs only)."""
    dtype: str = "float32"
    """Training precision: ``float32``, or ``bfloat16`` (DeepSpeed bf16: bf16 weights and
    activations, fp32 master weights in the optimizer). fp32 keeps the rollout/trainer
    log-prob mismatch at rounding level on the CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 1/3 more compute)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: ``sdpa`` (CPU and GPU), ``flash_attention_2`` (GPU extra), ``eager``."""
    fused_logprobs: bool = False
    """Compute log-probs and entropy with ``memact_kernels.linear_logprobs`` (no [N, V]
    logits in memory) instead of the LM head + log_softmax. Off by default."""


@dataclass
class LoraConfig:
    """Low-rank adapters (peft). Saved checkpoints have the adapters merged in."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scale numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter input (0 keeps old and new log-probs comparable)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get adapters."""


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed shards and steps the model."""

    config: str = "ds_zero1.json"
    """DeepSpeed JSON (ZeRO stage, bf16, offload). A relative path is looked up next to the
    YAML file first, then in the working directory, then in the packaged ``configs/``."""
    zero_stage: int | None = None
    """Override the JSON's ZeRO stage (0-3); None keeps the JSON's."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO 1-3; the GPU holds params and grads)."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (linear warm-up, then constant or cosine decay)."""

    lr: float = 1e-6
    """Peak learning rate (published DCPO: 1e-6; a from-scratch tiny model wants 1e-3..3e-3)."""
    warmup_steps: int = 5
    """Optimizer steps of linear warm-up from 0 to ``lr`` (published: 5)."""
    schedule: str = "constant"
    """After warm-up: ``constant`` (published DCPO) or ``cosine`` (decay to ``lr * min_lr_ratio``
    at the last optimizer step of the run; what a from-scratch SFT wants)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine schedule, as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm to this; 0 disables clipping."""


@dataclass
class BatchConfig:
    """Packing sequences into micro-batches."""

    max_tokens_per_micro_batch: int = 4096
    """Token budget of one micro-batch on one rank: rows x padded length, in tokens."""
    max_seq_len: int = 2048
    """Longest training sequence (prompt + response), in tokens; longer is an error."""
    pad_to_multiple_of: int = 64
    """Round each micro-batch's length up to this, in tokens: fewer distinct shapes, so the
    CPU kernels (oneDNN) are not rebuilt every step."""
    layout: str = "rows"
    """How segments sit in a micro-batch (``memact.dcpo.packing.LAYOUTS``); every layout gives the
    same log-probs, loss and gradients (tested). ``rows``: one right-padded row per segment,
    segments of similar length binned together. ``packed``: several segments per row, position
    ids restarting per segment, a 4D block-diagonal causal mask (sdpa or eager only).
    ``prefix``: the head a micro-batch's segments share runs once and its keys/values are reused
    for every segment's suffix (gradients flow into the prefix). ``tree``: packed rows in which
    segments share the slots of a common prefix. On the 2-core CPU with the tiny model every
    layout but ``rows`` ran slower (benchmarks/README.md), hence the default."""
    packed_row_len: int = 0
    """Longest packed row, in tokens (0: ``max_seq_len``). Attention over a row costs row
    length squared on the CPU whatever the mask, so rows much longer than a segment lose."""


@dataclass
class VLLMConfig:
    """What the vLLM engine needs (``rollout.engine: vllm``); read by ``memact.engines.vllm.VLLMEngine``."""

    tensor_parallel_size: int = 1
    """GPUs per engine. The training loop runs one engine per DeepSpeed rank, so only 1 there;
    ``memact rollout`` and ``memact eval`` take any size."""
    gpu_memory_utilization: float = 0.5
    """Share of each GPU's memory vLLM may take (its weights and KV cache), beside the
    trainer's weights, gradients and optimizer state: ``memact train --dry-run`` shows the
    plan. Ignored on the CPU, where ``cpu_kv_cache_gib`` sizes the cache."""
    cpu_kv_cache_gib: float = 1.0
    """KV cache of vLLM's CPU backend, GiB (``VLLM_CPU_KVCACHE_SPACE``; the environment wins)."""
    max_num_seqs: int = 256
    """Sequences vLLM schedules at once."""
    max_model_len: int = 0
    """Longest prompt plus output, tokens; 0: ``rollout.context_budget + rollout.max_new_tokens``."""
    dtype: str = "auto"
    """``auto`` (the trainer's ``model.dtype``), ``float32``, ``bfloat16`` or ``float16``; float32 for
    rollouts that match the trainer's log-probs to rounding."""
    enforce_eager: bool = False
    """No CUDA graphs / compilation: faster start-up (seconds instead of tens), slower decoding."""
    enable_sleep_mode: bool = True
    """GPU only: the engine frees its memory (weights offloaded, KV cache dropped) while DeepSpeed
    updates, and wakes for the next rollouts. No effect on the CPU."""
    enable_prefix_caching: bool = True
    """Reuse the keys and values of shared prompt prefixes (a task's trajectories share the head);
    reset after every weight push."""


@dataclass
class RolloutConfig:
    """How DCPO samples prompts and trajectories each step."""

    tasks: str = "synthetic"
    """Where the prompts come from (``memact.env.sources``, docs/data.md): ``synthetic``,
    ``long[:WORDS]`` (documents padded to retrieved-passage length), ``hotpotqa:PATH`` or
    ``qa:PATH`` (a file's ``train`` split: `memact eval` uses its ``eval`` split)."""
    retrieval: str = "task"
    """What a file source's ``search`` queries (``memact.env.retrieval``): ``task`` (bm25s over the
    file's own documents), ``index:DIR`` (a corpus index from `memact index`) or ``http:URL`` (a
    Search-R1-format retrieval server)."""
    objectives: int = 2
    """Sub-questions per task (K) when ``curriculum`` is empty."""
    curriculum: list[int] = field(default_factory=list)
    """K per stage, e.g. [1, 2, 4]: the run's steps are split into equal consecutive stages, one
    per entry (from one objective upward). Empty: every step uses ``objectives``."""
    curriculum_mode: str = "mixed"
    """``mixed``: every step's prompts cycle through the curriculum's K, so each K is sampled in
    every step once ``prompts_per_step`` >= its length. ``stages``: the curriculum's K one after
    another (above); a K no longer sampled drifted (docs/reproduce.md, runs E and F), hence the
    default."""
    prompts_per_step: int = 4
    """Distinct tasks (prompts) per step, over all ranks (published: 128)."""
    n_traj: int = 8
    """Trajectories per prompt: the group of the group-normalised advantage (published: 8)."""
    dynamic_sampling: bool = False
    """Drop the groups whose rewards are all equal (their advantages are 0: no gradient) and
    roll out more prompts until the step holds ``prompts_per_step`` groups with signal, as
    DAPO does; ``max_draws`` bounds the extra rollouts. The share dropped is logged
    (``groups_dropped_frac``; ``groups_uniform_frac`` is logged either way)."""
    max_draws: int = 4
    """With ``dynamic_sampling``: rollout rounds per step at most, the first included. A step
    that is still short after them trains on the groups it has."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 keeps the policy's distribution (the ratio needs it)."""
    max_new_tokens: int = 128
    """Longest assistant turn, in tokens."""
    context_budget: int = DEFAULT_CONTEXT_BUDGET
    """Largest context of one call, in tokens (published: 20K); breaking it ends the episode
    with the penalty reward."""
    max_steps: int = DEFAULT_MAX_STEPS
    """Step budget of one EPISODE: the most agent turns (generation calls) before it ends with
    the penalty reward (published: 40). Not the number of training steps (``run.steps``)."""
    strategy: str = "memact"
    """How the context is managed: ``memact`` (the ``prune_context`` tool, what DCPO trains),
    ``full``, ``sliding_window[:K]`` or ``summarize[:F]`` (baselines; see memact.agent.strategies)."""
    max_batch_size: int = 64
    """Prompts per engine forward pass."""
    prefix_cache_tokens: int = 262_144
    """HF engine: most tokens of key/value cache a rollout keeps from one turn to the next, so
    each turn prefills only what follows the previous turn (or the last context edit); 0 turns
    it off. Greedy outputs are the same either way (docs/engines.md). vLLM caches prefixes itself."""
    engine: str = "hf"
    """Rollout engine (``memact.engines.factory.ENGINES``): ``hf``, Hugging Face transformers on the
    module DeepSpeed trains (no weight copy), or ``vllm``, an engine of its own beside each rank
    that receives the weights after every update (``rollout.vllm``)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the vLLM engine."""


@dataclass
class DCPOConfig:
    """The algorithm: advantages, segment sampling and the loss."""

    segment_sampling: str = "all"
    """``all`` (every segment of every trajectory: each generated token trained once) or
    ``round_robin`` (``n_seg`` segments per prompt, one per trajectory per pass, the
    trajectories of each pass in a random order; the published setting). ``round_robin`` with
    12 per prompt trained about 18% of the generated tokens at K=6 while the update was a
    fifth to a third of a step on the CPU (docs/training.md), hence the default."""
    n_seg: int = 12
    """Segments drawn per prompt with ``round_robin`` (published: 12)."""
    adv_norm: str = "std"
    """``std`` (GRPO) or ``none`` (Dr.GRPO: centred, not scaled)."""
    adv_estimator: str = "grpo"
    """Baseline: ``grpo`` (group mean) or ``rloo`` (mean of the others)."""
    clip_low: float = 0.2
    """Ratio clip below: 1 - clip_low (published: 0.2)."""
    clip_high: float = 0.2
    """Ratio clip above: 1 + clip_high (clip-higher when > clip_low)."""
    kl_coef: float = 0.001
    """Weight of the k3 KL to the frozen initial model (published: 0.001); 0 skips the
    reference model entirely."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    loss_agg: str = "token_mean"
    """``token_mean``, ``trajectory`` (one trajectory one unit) or ``seq_mean``."""
    ppo_epochs: int = 1
    """Passes over each step's segments."""
    mini_batches: int = 1
    """Optimizer steps per pass: the step's prompts are split into this many groups."""
    tis: str = "off"
    """Truncated importance sampling of the rollout/trainer mismatch: ``off``, ``token`` (each
    token's surrogate weighted by min(pi_trainer / pi_rollout, ``tis_cap``)) or ``sequence`` (one
    weight per segment: the product over its tokens). For engines other than the trained
    module (``rollout.engine: vllm``, bf16); docs/training.md says when."""
    tis_cap: float = 2.0
    """Upper truncation of the importance weight (> 0)."""
    control: str = "none"
    """``none``, or a control run: ``shuffle`` permutes the advantages within each group (an
    update of the same size and distribution that carries no signal: what noise alone does to
    the policy) and ``reverse`` flips their sign. Run a ``shuffle`` control beside every RL
    claim (docs/training.md, "Controls")."""


@dataclass
class SFTConfig:
    """Supervised cold start on trajectories (``memact rollout`` JSONL)."""

    data: str = ""
    """Trajectories JSONL; every segment's loss-mask tokens are trained."""
    epochs: int = 3
    """Passes over the data."""
    segments_per_step: int = 32
    """Segments per optimizer step (the last step of an epoch may have fewer)."""
    shuffle: bool = True
    """Shuffle segments each epoch (seeded by ``run.seed`` and the epoch)."""
    max_minutes: float = 0.0
    """Time box: stop after the optimizer step during which this many minutes of training
    have passed, and save as usual (0: run every step of ``epochs``). The lr schedule is still
    laid out over every step, so a cut run ends before its schedule does."""


@dataclass
class RunConfig:
    """Where and how long."""

    out_dir: str = "runs/dcpo"
    """Run directory: metrics.jsonl, config.yaml, checkpoints/."""
    steps: int = 10
    """DCPO training steps of the run (each: rollouts, then ``ppo_epochs * mini_batches``
    optimizer steps). Not the per-episode turn budget (``rollout.max_steps``)."""
    seed: int = 0
    """Seed of tasks, record ids, sampling, segment choice and shuffling."""
    threads: int = 0
    """torch CPU threads; 0: ``$MEMACT_THREADS``, else 1 on machines with up to 4 cores
    (``memact.util.threads``: on 2 shared cores 1 thread trained the tiny model about 3x faster
    than 2); raise it on an idle or larger CPU."""
    save_every: int = 0
    """Checkpoint every this many steps; 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Newest step checkpoints kept; older ones are deleted (0 keeps all)."""
    resume: str = ""
    """Checkpoint directory to continue from (``checkpoints/step_XXXXXX``); empty starts fresh."""


@dataclass
class LoggingConfig:
    """Where metrics go."""

    progress: bool = True
    """Rich progress bars on stderr."""
    table_every: int = 5
    """Print a metrics table every this many steps (0: never)."""
    wandb: bool = False
    """Log to Weights & Biases (``wandb_mode`` offline writes local files only)."""
    wandb_project: str = "memact"
    """W&B project name."""
    wandb_mode: str = "offline"
    """``offline`` or ``online``; the WANDB_MODE environment variable wins."""
    tensorboard: bool = False
    """Also write TensorBoard event files under ``out_dir/tb`` (needs the tensorboard package)."""
    grad_snr: bool = False
    """Log the policy gradient's signal-to-noise ratio each step (``grad_snr``,
    ``memact.dcpo.snr``): one more forward and backward per prompt group before the update, at
    the rollout policy. ZeRO stages 0-2."""


@dataclass
class Config:
    """Everything a training run reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dcpo: DCPOConfig = field(default_factory=DCPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = ""
    """The YAML file this config was loaded from (set by ``load_config``; resolves relative paths)."""


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


def configs_dir() -> Path:
    """The repository's ``configs/`` (YAML presets and DeepSpeed JSONs)."""
    return Path(__file__).resolve().parents[2] / "configs"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, checked.

    Args:
        path: a YAML file; None uses the defaults only.
        overrides: dotted ``key=value`` strings, e.g. ``["optim.lr=1e-3", "run.steps=4"]``.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Config)
    merged = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            layer = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in several types
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        try:
            merged = OmegaConf.merge(schema, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"bad config in {str(path)!r}: {_first_line(err)}") from err
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    for override in overrides:  # one at a time, so that the message names the one at fault
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as err:
            raise ConfigError(f"command-line override {override!r}: {_first_line(err)}") from err
    try:
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad config: {_first_line(err)}") from err
    cfg.source = str(Path(path).resolve()) if path is not None else ""
    validate(cfg)
    return cfg


def _first_line(err: Exception) -> str:
    """OmegaConf's message without its ``full_key/reference_type`` trailer, with the key it names."""
    lines = str(err).splitlines()
    key = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("full_key:")), "")
    head = lines[0] if lines else type(err).__name__
    return f"{head} (key {key})" if key and key not in head else head


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check_tasks(r: RolloutConfig) -> None:
    """``rollout.tasks`` names a source; a file's rows are all read and checked here, before any
    weights load, and its ``train`` split must hold the largest K of the run."""
    from memact.env.sources import parse_source

    try:
        parse_source(r.tasks, r.retrieval).check("train", max([r.objectives, *r.curriculum]))
    except (ValueError, OSError) as err:
        raise ConfigError(f"rollout.tasks={r.tasks!r}, rollout.retrieval={r.retrieval!r}: {err}") from None


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def validate(cfg: Config) -> None:
    """Reject values no run could use, naming the key and what was expected."""
    m, b, r, d, o = cfg.model, cfg.batch, cfg.rollout, cfg.dcpo, cfg.optim
    _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
    _check(o.lr > 0, "optim.lr", o.lr, "> 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    _check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"one of {SCHEDULES}")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    _check(o.max_grad_norm >= 0, "optim.max_grad_norm", o.max_grad_norm, ">= 0 (0 disables clipping)")
    _check(b.max_seq_len >= 2, "batch.max_seq_len", b.max_seq_len, ">= 2")
    _check(b.layout in LAYOUTS, "batch.layout", b.layout, f"one of {LAYOUTS}")
    _check(b.pad_to_multiple_of >= 1, "batch.pad_to_multiple_of", b.pad_to_multiple_of, ">= 1")
    _check(b.packed_row_len >= 0, "batch.packed_row_len", b.packed_row_len, ">= 0 (0 = batch.max_seq_len)")
    _check(b.max_tokens_per_micro_batch >= b.max_seq_len, "batch.max_tokens_per_micro_batch",
           b.max_tokens_per_micro_batch, f">= batch.max_seq_len ({b.max_seq_len}) so every sequence fits")
    _check(r.objectives >= 1, "rollout.objectives", r.objectives, ">= 1")
    _check(all(int(k) >= 1 for k in r.curriculum), "rollout.curriculum", r.curriculum, "a list of K >= 1")
    _check(r.curriculum_mode in CURRICULUM_MODES, "rollout.curriculum_mode", r.curriculum_mode,
           f"one of {CURRICULUM_MODES}")
    _check(r.engine in ENGINES, "rollout.engine", r.engine, f"one of {ENGINES}")
    v = r.vllm
    _check(v.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size", v.tensor_parallel_size, ">= 1")
    _check(0 < v.gpu_memory_utilization < 1, "rollout.vllm.gpu_memory_utilization", v.gpu_memory_utilization,
           "in (0, 1)")
    _check(v.cpu_kv_cache_gib > 0, "rollout.vllm.cpu_kv_cache_gib", v.cpu_kv_cache_gib, "> 0")
    _check(v.max_num_seqs >= 1, "rollout.vllm.max_num_seqs", v.max_num_seqs, ">= 1")
    _check(v.max_model_len >= 0, "rollout.vllm.max_model_len", v.max_model_len, ">= 0 (0: budget + max_new_tokens)")
    _check(v.dtype in VLLM_DTYPES, "rollout.vllm.dtype", v.dtype, f"one of {VLLM_DTYPES}")
    _check(r.prompts_per_step >= 1, "rollout.prompts_per_step", r.prompts_per_step, ">= 1")
    _check(r.n_traj >= 1, "rollout.n_traj", r.n_traj, ">= 1 (>= 2 for a non-zero advantage)")
    _check(r.temperature >= 0, "rollout.temperature", r.temperature, ">= 0 (0 is greedy)")
    try:
        from memact.agent.strategies import parse_strategy

        parse_strategy(r.strategy)
    except ValueError as err:
        raise ConfigError(f"rollout.strategy={r.strategy!r}: {err}") from None
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "in (0, 1]")
    _check_tasks(r)
    _check(d.segment_sampling in SEGMENT_SAMPLING, "dcpo.segment_sampling", d.segment_sampling,
           f"one of {SEGMENT_SAMPLING}")
    _check(d.n_seg >= 1, "dcpo.n_seg", d.n_seg, ">= 1")
    _check(d.adv_norm in NORMS, "dcpo.adv_norm", d.adv_norm, f"one of {NORMS}")
    _check(d.adv_estimator in ESTIMATORS, "dcpo.adv_estimator", d.adv_estimator, f"one of {ESTIMATORS}")
    _check(d.loss_agg in AGG_MODES, "dcpo.loss_agg", d.loss_agg, f"one of {AGG_MODES}")
    _check(d.clip_low >= 0 and d.clip_high >= 0, "dcpo.clip_low/clip_high", (d.clip_low, d.clip_high), ">= 0")
    _check(d.kl_coef >= 0, "dcpo.kl_coef", d.kl_coef, ">= 0")
    _check(d.ppo_epochs >= 1, "dcpo.ppo_epochs", d.ppo_epochs, ">= 1")
    _check(d.tis in TIS_MODES, "dcpo.tis", d.tis, f"one of {TIS_MODES}")
    _check(d.tis_cap > 0, "dcpo.tis_cap", d.tis_cap, "> 0")
    _check(d.control in CONTROLS, "dcpo.control", d.control, f"one of {CONTROLS}")
    _check(r.prefix_cache_tokens >= 0, "rollout.prefix_cache_tokens", r.prefix_cache_tokens, ">= 0 (0: off)")
    _check(r.max_draws >= 1, "rollout.max_draws", r.max_draws, ">= 1 (the first rollout included)")
    _check(1 <= d.mini_batches <= r.prompts_per_step, "dcpo.mini_batches", d.mini_batches,
           f"in [1, rollout.prompts_per_step={r.prompts_per_step}]")
    _check(cfg.sft.epochs >= 1, "sft.epochs", cfg.sft.epochs, ">= 1")
    _check(cfg.sft.segments_per_step >= 1, "sft.segments_per_step", cfg.sft.segments_per_step, ">= 1")
    _check(cfg.sft.max_minutes >= 0, "sft.max_minutes", cfg.sft.max_minutes, ">= 0 (0: no limit)")
    _check(cfg.run.steps >= 0, "run.steps", cfg.run.steps, ">= 0")
    _check(cfg.run.threads >= 0, "run.threads", cfg.run.threads, ">= 0 (0: $MEMACT_THREADS or the machine default)")
    _check(cfg.run.save_every >= 0, "run.save_every", cfg.run.save_every, ">= 0")
    zs = cfg.deepspeed.zero_stage
    _check(zs is None or zs in (0, 1, 2, 3), "deepspeed.zero_stage", zs, "None or 0-3")
    _check(cfg.lora.r >= 1, "lora.r", cfg.lora.r, ">= 1")
    _check(bool(cfg.lora.target_modules), "lora.target_modules", cfg.lora.target_modules, "a non-empty list")


def resolve_path(cfg: Config, value: str, what: str) -> Path:
    """A file named in the config: absolute, next to the YAML file, in the cwd, or in ``configs/``."""
    p = Path(value)
    candidates = [p] if p.is_absolute() else (
        ([Path(cfg.source).parent / p] if cfg.source else []) + [Path.cwd() / p, configs_dir() / p]
    )
    for c in candidates:
        if c.exists():
            return c
    raise ConfigError(f"{what}={value!r}: file not found (looked in {', '.join(str(c) for c in candidates)})")
