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

from memact.dcpo.config import Config
from memact.dcpo.data import MicroBatch


def core_model(model: Any) -> Any:
    """The Hugging Face causal LM inside DeepSpeed and peft wrappers."""
    model = getattr(model, "module", model)  # DeepSpeedEngine
    if hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers are injected in place
        model = model.get_base_model()
    return model


def load_for_training(cfg: Config) -> tuple[Any, Any]:
    """Model and tokenizer from ``cfg.model.path``, LoRA applied.

    Weights load in ``model.dtype`` (bf16 halves host memory for a large model; DeepSpeed
    keeps the fp32 master copy in its optimizer).
    """
    from transformers import AutoModelForCausalLM

    from memact.policy.model import load_tokenizer

    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={cfg.model.path!r} is not a model directory (no config.json); build one with "
            "`memact new-model --preset tiny --out DIR` or point it at a local checkpoint"
        )
    tokenizer = load_tokenizer(path)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                 attn_implementation=cfg.model.attn_implementation)
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


def frozen_reference(model: Any) -> Any:
    """A frozen copy of the initial policy for the KL term (None with LoRA: the adapters are
    switched off instead, which gives the initial model without a second copy)."""
    if hasattr(model, "disable_adapter"):
        return None
    ref = copy.deepcopy(core_model(model))
    ref.requires_grad_(False)
    ref.eval()
    return ref


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
