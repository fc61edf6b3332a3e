"""The policy as the trainers see it: loading (dtype, LoRA, checkpointing) and token log-probs.

Log-probs are computed only where they are trained: the decoder runs over the whole
micro-batch, but the LM head is applied to the hidden states of the masked-in positions
only, so a 150K-entry vocabulary costs [N_trained, V] logits, not [B, L, V].
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from memact.dcpo.config import Config, ConfigError
from memact.dcpo.data import MicroBatch
from memact.dcpo.distributed import deepspeed_config, zero3_init, zero_stage
from memact.models.model import torch_dtype


def core_model(model: Any) -> Any:
    """The Hugging Face causal LM inside DeepSpeed and peft wrappers."""
    model = getattr(model, "module", model)  # DeepSpeedEngine
    if hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers are injected in place
        model = model.get_base_model()
    return model


def _load_weights(cfg: Config) -> Any:
    """``from_pretrained`` of ``cfg.model.path`` in ``model.dtype``; under ZeRO-3 partitioned as it
    loads (``zero3_init``: every parameter is a ZeRO-3 shard from the start)."""
    from transformers import AutoModelForCausalLM

    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={cfg.model.path!r} is not a model directory (no config.json); build one with "
            "`memact new-model --preset tiny --out DIR` or point it at a local checkpoint"
        )
    dtype = torch_dtype(cfg.model.dtype)
    with zero3_init(cfg):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                    attn_implementation=cfg.model.attn_implementation)


def model_vocab_size(path: str | Path) -> int | None:
    """The embedding rows of the model at ``path`` (its config's ``vocab_size``); None where
    ``path`` is no model directory (loading it reports that)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return getattr(config.get_text_config(), "vocab_size", None)


def load_for_training(cfg: Config) -> tuple[Any, Any]:
    """Model and tokenizer from ``cfg.model.path``, LoRA applied.

    Weights load in ``model.dtype`` (bf16 halves host memory for a large model; DeepSpeed
    keeps the fp32 master copy in its optimizer). With ZeRO stage 3 the model is built inside
    ``deepspeed.zero.Init`` through transformers' DeepSpeed integration, so no rank
    materialises the whole model (``distributed.zero3_init``); LoRA adapters, created after,
    are small and are partitioned by ``deepspeed.initialize``. Such a model runs only through
    its DeepSpeed engine (its parameters are empty shards outside the engine's forward).
    """
    from memact.models.model import load_tokenizer

    if cfg.model.fused_logprobs and zero_stage(cfg) == 3:
        # The kernel reads the LM head's weight outside the module call, where ZeRO-3 leaves
        # an empty shard (measured: "weight must be a 2-D [V, H] tensor, got (0,)").
        raise ConfigError("model.fused_logprobs=true is not supported with ZeRO stage 3; use stage 0-2")
    model = _load_weights(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
        ))
    model.train()
    return model, tokenizer


def frozen_reference(model: Any, cfg: Config) -> Any:
    """The initial policy, frozen, for the KL term. Call it before any update.

    - LoRA: None. The adapters are switched off instead (``reference_logprobs``), which gives
      the initial model with no second copy.
    - ZeRO-3: ``model.path`` loaded a second time, partitioned as it loads (``zero3_init``),
      and wrapped in a DeepSpeed engine with the same ZeRO-3 config and no optimizer
      (DeepSpeed's ZeRO-3 inference mode: its forward gathers each module's parameters and
      releases them after). Each rank holds 1/world of the reference, as of the policy.
    - ZeRO 0-2: a deep copy of the loaded model. Those stages keep the whole trained model on
      every rank anyway; the reference is one more full (frozen, gradient-free) copy per rank.
    """
    if hasattr(model, "disable_adapter"):
        return None
    if zero_stage(cfg) == 3:
        import deepspeed

        ref = _load_weights(cfg)
        ref.requires_grad_(False)
        ds = deepspeed_config(cfg)
        ds["zero_optimization"].pop("offload_optimizer", None)  # no optimizer here
        engine, _, _, _ = deepspeed.initialize(model=ref, config=ds)
        engine.eval()
        return engine
    ref = copy.deepcopy(core_model(model))
    ref.requires_grad_(False)
    ref.eval()
    return ref


def merged_lora_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The state dict a plain HF model with the LoRA adapters merged in would have.

    Every LoRA-wrapped layer's base weight plus its adapters' delta (``get_delta_weight``:
    scale * B @ A), under the names without peft's ``base_layer`` / ``lora_*`` parts; every
    other tensor as is. What ``merge_and_unload()`` would save, without copying the model or
    touching the trained one. Needs whole weights (inside ``full_weights`` under ZeRO-3).
    """
    from peft.tuners.lora import LoraLayer

    base = core_model(model)
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    d = module.get_delta_weight(adapter)
                    key = f"{name}.weight"
                    deltas[key] = deltas[key] + d if key in deltas else d
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        key = ".".join(p for p in parts if p != "base_layer")
        value = value.detach()
        if key in deltas:
            value = (value.float() + deltas.pop(key).float()).to(value.dtype)
        out[key] = value
    if deltas:
        raise RuntimeError(f"LoRA deltas without a base weight: {sorted(deltas)}")
    return out


@torch.no_grad()
def reference_logprobs(model: Any, ref: Any, mb: MicroBatch, temperature: float, fused: bool = False
                       ) -> torch.Tensor:
    """[B, L-1] log-probs under the initial policy: ``ref``, or ``model`` with its LoRA adapters off."""
    if ref is not None:
        return token_logprobs(ref, mb, temperature, with_entropy=False, fused=fused)[0]
    with getattr(model, "module", model).disable_adapter():
        return token_logprobs(model, mb, temperature, with_entropy=False, fused=fused)[0]


def fused_kernel():
    """``memact_kernels.linear_logprobs`` if it imports, else None."""
    try:
        from memact_kernels import linear_logprobs
    except ImportError:
        return None
    return linear_logprobs


def final_hidden_states(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, H] output of the decoder stack, through the full forward of ``model``.

    ``position_ids`` [B, L] and a 4D ``attention_mask`` [B, 1, L, L] describe packed rows
    (``memact.dcpo.packing``); without them each row is one causal sequence.

    The call goes through the DeepSpeed engine's forward, not the decoder submodule: ZeRO-3
    does per-micro-step bookkeeping there, and bypassing it dropped all but the last
    micro-batch's gradients when accumulating (measured). A hook on the decoder captures its
    output; ``logits_to_keep=1`` keeps the model's own LM head to one position, since the
    caller applies the head only where tokens are trained.
    """
    captured: list[torch.Tensor] = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    hook = core_model(model).get_decoder().register_forward_hook(grab)
    try:
        extra = {} if position_ids is None else {"position_ids": position_ids, "attention_mask": attention_mask}
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **extra)
    finally:
        hook.remove()
    return captured[0]


def prefix_reuse_hidden_states(model: Any, input_ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """[B, L, H] decoder output of rows that all start with the same ``prefix_len`` tokens.

    The prefix runs once (batch 1, causal, ``use_cache``); its keys/values are repeated to the
    batch and the suffixes [B, L - P] run on top with positions P.. . The cache tensors stay in
    the autograd graph (``DynamicLayer.update`` concatenates, ``batch_repeat_interleave``
    copies), so gradients flow into the prefix computation and the result equals running
    every full row. Attention stays causal with no [L, L] mask: on the CPU a masked row costs
    more than the tokens a tree layout saves (benchmarks/README.md).
    """
    b, n = input_ids.shape
    if not 0 < prefix_len < n:
        raise ValueError(f"shared_prefix={prefix_len} must be in [1, {n - 1}] for rows of {n} tokens")
    captured: list[torch.Tensor] = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    hook = core_model(model).get_decoder().register_forward_hook(grab)
    try:
        out = model(input_ids=input_ids[:1, :prefix_len], use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(b)
        positions = torch.arange(prefix_len, n, device=input_ids.device).expand(b, -1)
        model(input_ids=input_ids[:, prefix_len:], position_ids=positions, past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    finally:
        hook.remove()
    return torch.cat([captured[0].expand(b, -1, -1), captured[1]], dim=1)


def token_logprobs(model: Any, mb: MicroBatch, temperature: float = 1.0, with_entropy: bool = True,
                   fused: bool = False, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each trained target token under softmax(logits / T), and the entropy there.

    Args:
        model: a causal LM (possibly wrapped by DeepSpeed / peft).
        mb: the micro-batch; only positions with ``mb.loss_mask`` are computed. With
            ``mb.packed`` the decoder runs on the packed rows; the result is laid out as if not.
        temperature: the sampling temperature of the rollouts (> 0).
        with_entropy: also return the entropy of the next-token distribution (nats).
        fused: use ``memact_kernels.linear_logprobs`` instead of LM head + log_softmax.
        entropy_grad: keep the entropy's graph (only an entropy bonus needs it).

    Returns:
        logprobs: [B, L-1] float32, 0 off the mask; differentiable if grad is enabled.
        entropy: [B, L-1] float32 or None.
    """
    lm = core_model(model)
    if mb.shared_prefix:
        hidden = prefix_reuse_hidden_states(model, mb.input_ids, mb.shared_prefix)  # [B, L, H]
        picked = hidden[:, :-1][mb.loss_mask]  # [N, H]
    elif mb.packed is None:
        hidden = final_hidden_states(model, mb.input_ids)  # [B, L, H]
        picked = hidden[:, :-1][mb.loss_mask]  # [N, H]
    else:  # packed rows: read each trained target's hidden state from its slot
        p = mb.packed
        hidden = final_hidden_states(model, p.input_ids, p.position_ids, p.attention_mask)  # [R, W, H]
        picked = hidden.reshape(-1, hidden.shape[-1])[p.gather_index]  # [N, H]
    targets = mb.target_ids[mb.loss_mask]  # [N]
    head = lm.get_output_embeddings()
    if fused:
        kernel = fused_kernel()
        if kernel is None:
            raise RuntimeError("model.fused_logprobs=true but `from memact_kernels import linear_logprobs` fails")
        if getattr(head, "bias", None) is not None:
            raise RuntimeError("model.fused_logprobs=true needs an LM head without bias")
        logp, ent = kernel(picked, head.weight, targets, temperature)
        logp, ent = logp.float(), ent.float()
    else:
        logits = head(picked).float() / temperature  # [N, V]
        logz = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
        ent = None
        if with_entropy:
            # Usually only reported: without a bonus its graph would be memory for nothing.
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent = logz - (logits.softmax(-1) * logits).sum(-1)
    out = torch.zeros(mb.loss_mask.shape, dtype=torch.float32, device=logp.device)
    logp_full = out.masked_scatter(mb.loss_mask, logp)
    ent_full = None
    if with_entropy and ent is not None:
        ent_full = torch.zeros_like(out).masked_scatter(mb.loss_mask, ent)
    return logp_full, ent_full
