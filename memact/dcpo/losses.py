"""DCPO loss: clipped policy-gradient surrogate, optional k3 KL and entropy bonus.

Everything here is a pure function of tensors. Per-token tensors are [B, T]: B sequences
(segments) of a micro-batch, T token positions, padded; ``loss_mask`` is 1 on the tokens
that are trained (generated tokens) and 0 elsewhere. Log-probabilities are natural-log
(nats) of the sampled token.

Reductions use normalisers of the WHOLE optimizer step (``StepNormalizer``), so summing
the losses of the micro-batches of a step gives the same value and gradient as one big
batch, whatever the split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

AGG_MODES = ("token_mean", "trajectory", "seq_mean")
TIS_MODES = ("off", "token", "sequence")
"""Truncated importance sampling of the rollout/trainer mismatch (:func:`tis_weights`)."""


def _check_mask(loss_mask: torch.Tensor, like: torch.Tensor, like_name: str) -> torch.Tensor:
    if loss_mask.shape != like.shape:
        raise ValueError(
            f"loss_mask must have the shape of {like_name} {tuple(like.shape)}, got {tuple(loss_mask.shape)}"
        )
    if loss_mask.dtype != torch.bool:
        if not ((loss_mask == 0) | (loss_mask == 1)).all():
            raise ValueError("loss_mask must hold only 0 and 1")
        loss_mask = loss_mask.bool()
    return loss_mask


def _check_2d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {tuple(x.shape)}")


def _check_same(x: torch.Tensor | None, name: str, ref: torch.Tensor) -> None:
    if x is not None and x.shape != ref.shape:
        raise ValueError(f"{name} must have shape [B, T] = {tuple(ref.shape)}, got {tuple(x.shape)}")


def policy_loss_terms(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate with separate low/high clip (clip-higher).

    Args:
        log_probs: [B, T] log-prob of each token under the policy being trained (nats).
        old_log_probs: [B, T] log-prob under the policy that sampled it (nats).
        advantages: [B] (one per sequence) or [B, T].
        loss_mask: [B, T] 1 on trained tokens.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].

    Returns:
        loss: [B, T] -min(ratio * A, clip(ratio) * A), 0 where the mask is 0.
        clipped: [B, T] bool, True on masked-in tokens where the clipped branch is strictly
            smaller, i.e. the clip is active and binding (those tokens get no gradient).
    """
    _check_2d(log_probs, "log_probs")
    _check_same(old_log_probs, "old_log_probs", log_probs)
    mask = _check_mask(loss_mask, log_probs, "log_probs")
    if advantages.shape == log_probs.shape[:1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != log_probs.shape:
        raise ValueError(
            f"advantages must have shape [B] = {tuple(log_probs.shape[:1])} or [B, T] = "
            f"{tuple(log_probs.shape)}, got {tuple(advantages.shape)}"
        )
    # Zero the log-ratio off the mask so padding garbage can't overflow exp() into inf/NaN.
    log_ratio = torch.where(mask, log_probs - old_log_probs, torch.zeros_like(log_probs))
    ratio = torch.exp(log_ratio)
    surr = ratio * advantages
    surr_clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(surr, surr_clipped)
    clipped = (surr_clipped < surr) & mask
    return loss.masked_fill(~mask, 0.0), clipped


def kl_k3(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, log_ratio_clamp: float | None = 20.0
) -> torch.Tensor:
    """Per-token k3 (low-variance, unbiased, >= 0) estimate of KL(policy || reference).

    k3 = exp(r) - r - 1 with r = ref_log_probs - log_probs (Schulman, "Approximating KL").

    Args:
        log_probs, ref_log_probs: same shape (typically [B, T]), nats.
        log_ratio_clamp: r is clamped to [-c, c] first so a far-off token cannot give inf;
            None disables the clamp.

    Returns:
        Tensor of the input shape, nats.
    """
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"ref_log_probs must have the shape of log_probs {tuple(log_probs.shape)}, "
            f"got {tuple(ref_log_probs.shape)}"
        )
    log_ratio = ref_log_probs - log_probs
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    return torch.exp(log_ratio) - log_ratio - 1.0


@dataclass(frozen=True)
class StepNormalizer:
    """Denominators of one optimizer step, computed once from ALL its sequences.

    Attributes:
        token_count: masked-in tokens in the step (``token_mean``).
        n_seqs: sequences with at least one masked-in token (``seq_mean``).
        n_traj: trajectories with at least one masked-in token (``trajectory``).
        traj_token_counts: [n_traj_ids] masked-in tokens of each trajectory id, summed over
            all of its sequences (segments) in the step (``trajectory``).

    Sequences or trajectories with no trained token contribute nothing to the loss, so
    they are not counted as units either.
    """

    token_count: int
    n_seqs: int
    n_traj: int
    traj_token_counts: torch.Tensor

    @classmethod
    def from_batch(
        cls,
        loss_masks: torch.Tensor | Sequence[torch.Tensor],
        traj_index: torch.Tensor | Sequence[int],
    ) -> StepNormalizer:
        """Build from every sequence of the step.

        Args:
            loss_masks: [N, T] tensor, or a sequence of N masks of any shape (one per
                sequence, so ragged lengths are fine), 1 on trained tokens.
            traj_index: [N] non-negative trajectory id of each sequence, unique across the
                step (not just within one prompt's group).
        """
        if isinstance(loss_masks, torch.Tensor):
            _check_2d(loss_masks, "loss_masks")
            per_seq = (loss_masks != 0).sum(dim=-1).cpu()
        elif len(loss_masks) == 0:
            per_seq = torch.zeros(0, dtype=torch.long)
        else:
            # One stack, one device->host copy, rather than a sync per sequence.
            per_seq = torch.stack([(m != 0).sum() for m in loss_masks]).cpu()
        index = torch.as_tensor(traj_index, dtype=torch.long).cpu()
        if index.shape != per_seq.shape:
            raise ValueError(
                f"traj_index must have shape [N] = [{per_seq.numel()}] (one per loss mask), "
                f"got {tuple(index.shape)}"
            )
        if index.numel() and int(index.min()) < 0:
            raise ValueError(f"traj_index must be non-negative, got {index.tolist()}")
        n_ids = int(index.max()) + 1 if index.numel() else 0
        traj_counts = torch.zeros(n_ids, dtype=torch.long).index_add_(0, index, per_seq)
        return cls(
            token_count=int(per_seq.sum()),
            n_seqs=int((per_seq > 0).sum()),
            n_traj=int((traj_counts > 0).sum()),
            traj_token_counts=traj_counts,
        )


@torch.no_grad()
def tis_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, loss_mask: torch.Tensor,
                mode: str = "token", cap: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights of the trainer's policy against the engine that sampled.

    The rollout engine samples from pi_rollout (vLLM's kernels, bf16), the surrogate's ratio
    is taken against the trainer's pi_old: each token's loss is weighted by
    min(pi_old / pi_rollout, cap), so the gradient is that of samples from pi_old.

    Args:
        old_log_probs, rollout_log_probs: [B, T] nats (the trainer's before the update; the engine's).
        loss_mask: [B, T] 1 on trained tokens.
        mode: ``token`` (a ratio per token) or ``sequence`` (one ratio per row: the product over
            its trained tokens, i.e. exp of the summed log-ratio).
        cap: the truncation, > 0.

    Returns:
        weights: [B, T] detached, 0 where the mask is 0.
        truncated: [B, T] bool, True where the ratio exceeded ``cap`` (per row for ``sequence``).
    """
    _check_2d(old_log_probs, "old_log_probs")
    _check_same(rollout_log_probs, "rollout_log_probs", old_log_probs)
    mask = _check_mask(loss_mask, old_log_probs, "old_log_probs")
    if cap <= 0:
        raise ValueError(f"the truncation cap must be > 0, got {cap}")
    log_ratio = (old_log_probs.float() - rollout_log_probs.float()).masked_fill(~mask, 0.0)
    if mode == "token":
        pass
    elif mode == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)
    else:
        raise ValueError(f"TIS mode {mode!r}: expected token or sequence")
    ratio = torch.exp(log_ratio.clamp(max=math.log(cap) + 1.0))  # no overflow; anything above cap is cut anyway
    truncated = (log_ratio > math.log(cap)) & mask
    return ratio.clamp(max=cap).masked_fill(~mask, 0.0), truncated


def aggregate(
    per_token: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: str,
    normalizer: StepNormalizer,
    traj_index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Reduce a micro-batch's per-token values to its share of the step's scalar.

    Args:
        per_token: [B, T] values (loss, KL, entropy, ...).
        loss_mask: [B, T] 1 on trained tokens; other positions are ignored.
        mode: "token_mean": sum / normalizer.token_count.
            "trajectory": each token divided by the token count of its trajectory (all of
            that trajectory's segments in the step), summed, / normalizer.n_traj.
            "seq_mean": each sequence's masked mean, summed, / normalizer.n_seqs.
        normalizer: the step's denominators (``StepNormalizer.from_batch``).
        traj_index: [B] trajectory id of each row, same ids as the normalizer; needed for
            "trajectory".

    Returns:
        0-d tensor. Summed over the micro-batches of a step it equals the whole-step value.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"mode must be one of {AGG_MODES}, got {mode!r}")
    _check_2d(per_token, "per_token")
    mask = _check_mask(loss_mask, per_token, "per_token")
    # where (not multiply) so that inf/NaN on masked-out positions cannot leak in.
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    row_sums = masked.sum(dim=-1)
    if mode == "token_mean":
        return masked.sum() / max(normalizer.token_count, 1)
    if mode == "seq_mean":
        row_counts = mask.sum(dim=-1)
        return (row_sums / row_counts.clamp(min=1)).sum() / max(normalizer.n_seqs, 1)

    if traj_index is None:
        raise ValueError("traj_index [B] is required for mode='trajectory'")
    index = torch.as_tensor(traj_index, dtype=torch.long, device=per_token.device)
    if index.shape != per_token.shape[:1]:
        raise ValueError(
            f"traj_index must have shape [B] = {tuple(per_token.shape[:1])}, got {tuple(index.shape)}"
        )
    n_ids = normalizer.traj_token_counts.numel()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_ids):
        raise ValueError(
            f"traj_index values must be ids known to the normalizer, [0, {n_ids}), got {index.tolist()}"
        )
    denom = normalizer.traj_token_counts.to(per_token.device)[index]
    has_tokens = mask.any(dim=-1)
    if bool((has_tokens & (denom == 0)).any()):
        raise ValueError(
            "normalizer has 0 tokens for a trajectory this micro-batch trains; was it built from this step?"
        )
    return (row_sums / denom.clamp(min=1)).sum() / max(normalizer.n_traj, 1)


def dcpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: StepNormalizer,
    *,
    traj_index: torch.Tensor | Sequence[int] | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    ref_log_probs: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    agg: str = "token_mean",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Micro-batch DCPO loss: clipped surrogate + kl_coef * KL_k3 - entropy_coef * entropy.

    All three terms use the same aggregation ``agg`` and step ``normalizer``; summing this
    loss over a step's micro-batches gives the whole-step loss.

    Args:
        log_probs, old_log_probs: [B, T] nats (see ``policy_loss_terms``).
        advantages: [B] or [B, T].
        loss_mask: [B, T] 1 on trained tokens.
        normalizer: the step's ``StepNormalizer``.
        traj_index: [B] trajectory ids, required for agg="trajectory".
        clip_low, clip_high: ratio clip range [1 - clip_low, 1 + clip_high].
        kl_coef: weight of the k3 KL to the reference; > 0 needs ``ref_log_probs``.
        ref_log_probs: [B, T] reference-model log-probs (nats); if given with kl_coef 0,
            the KL is only reported.
        entropy_coef: weight of the entropy bonus (subtracted); != 0 needs ``entropy``.
        entropy: [B, T] per-token entropy of the policy (nats), from the caller's kernel.
        agg: "token_mean", "trajectory" or "seq_mean" (see ``aggregate``).
        is_weights: [B, T] detached weights of the surrogate's tokens (:func:`tis_weights`), or
            None (1 everywhere).

    Returns:
        loss: 0-d tensor.
        metrics: detached 0-d tensors over this micro-batch's masked-in tokens:
            pg_loss, clip_fraction, ratio_mean, ratio_max, n_tokens, and kl_mean /
            entropy_mean when those inputs are given.
    """
    _check_2d(log_probs, "log_probs")
    _check_same(ref_log_probs, "ref_log_probs", log_probs)
    _check_same(entropy, "entropy", log_probs)
    _check_same(is_weights, "is_weights", log_probs)
    if kl_coef != 0.0 and ref_log_probs is None:
        raise ValueError("ref_log_probs [B, T] is required when kl_coef != 0")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy [B, T] is required when entropy_coef != 0")

    per_token, clipped = policy_loss_terms(
        log_probs, old_log_probs, advantages, loss_mask, clip_low=clip_low, clip_high=clip_high
    )
    mask = _check_mask(loss_mask, log_probs, "log_probs")
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    pg_loss = aggregate(per_token, mask, agg, normalizer, traj_index)
    loss = pg_loss

    n_tokens = mask.sum()
    denom = n_tokens.clamp(min=1)
    with torch.no_grad():
        ratio = torch.exp((log_probs - old_log_probs)[mask])
        metrics = {
            "pg_loss": pg_loss.detach(),
            "clip_fraction": clipped.sum() / denom,
            "ratio_mean": ratio.mean() if ratio.numel() else ratio.new_zeros(()),
            "ratio_max": ratio.max() if ratio.numel() else ratio.new_zeros(()),
            "n_tokens": n_tokens,
        }
    if ref_log_probs is not None:
        kl = kl_k3(log_probs, ref_log_probs)
        if kl_coef != 0.0:
            loss = loss + kl_coef * aggregate(kl, mask, agg, normalizer, traj_index)
        metrics["kl_mean"] = kl.detach()[mask].sum() / denom
    if entropy is not None:
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * aggregate(entropy, mask, agg, normalizer, traj_index)
        metrics["entropy_mean"] = entropy.detach()[mask].sum() / denom
    return loss, metrics
