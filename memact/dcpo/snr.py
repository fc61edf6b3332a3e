"""The policy gradient's signal-to-noise ratio of a DCPO step (``logging.grad_snr``).

A step's gradient is the mean of its prompt groups' gradients g_1..g_G, independent draws of
one distribution (each group its own task). With mean m and per-group scatter s^2 =
sum ||g_i - m||^2 / (G - 1), the noise of the step's gradient is s^2 / G (the variance of a
mean of G draws) and ||m||^2 - s^2 / G is an unbiased estimate of the squared norm of the
expected gradient, the signal. ``grad_snr`` is their ratio: about 0 when the update is noise
(a ``dcpo.control=shuffle`` run), and it grows with G when there is a direction to follow.
A ratio under 1 means the step moves the policy more by chance than by its signal.

Each group's gradient is that of its REINFORCE surrogate at the rollout policy, -sum(A *
log pi) over its trained tokens / its token count (the clipped surrogate's gradient at ratio
1); the KL and entropy terms are left out: they are not what the advantages say.
"""

from __future__ import annotations

from typing import Any

import torch

from memact.dcpo.data import TrainSequence


def snr_from_sums(sum_g: torch.Tensor, sum_sq: float, n: int) -> float | None:
    """The ratio from the sum of n flat gradients and the sum of their squared norms (None if n < 2)."""
    if n < 2:
        return None
    m2 = float((sum_g / n).pow(2).sum())
    scatter = max((sum_sq - n * m2) / (n - 1), 0.0)
    noise = scatter / n
    if noise == 0.0:
        return None if m2 == 0.0 else float("inf")
    return (m2 - noise) / noise


def gradient_snr(model: Any, seqs: list[TrainSequence], micro_batches: Any, temperature: float,
                 fused: bool = False, world_size: int = 1) -> tuple[float | None, int]:
    """The step's ``grad_snr`` and the number of groups it was measured over.

    Args:
        model: the trained module (DeepSpeed's ``engine.module``; full parameters: ZeRO 0-2).
        seqs: the step's trained sequences (``group`` and ``advantage`` set).
        micro_batches: ``seqs -> list[MicroBatch]`` on the model's device (the step's layout).
        temperature: the rollout temperature of the log-probs.
        world_size: ranks whose groups are pooled (the sums are all-reduced; every rank calls this).
    """
    from memact.dcpo.modeling import token_logprobs

    params = [p for p in model.parameters() if p.requires_grad]
    sum_g = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
    sum_sq, n = 0.0, 0
    for g in sorted({s.group for s in seqs}):
        part = [s for s in seqs if s.group == g]
        tokens = sum(s.n_trained for s in part)
        if tokens == 0:
            continue
        flat = torch.zeros_like(sum_g)
        for mb in micro_batches(part):
            logp, _ = token_logprobs(model, mb, temperature, with_entropy=False, fused=fused)
            adv = mb.advantages.float()[:, None] if mb.advantages.dim() == 1 else mb.advantages.float()
            loss = -(adv * logp * mb.loss_mask).sum() / tokens
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat += torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1).float()
                               for gr, p in zip(grads, params)])
        sum_g += flat
        sum_sq += float(flat.pow(2).sum())
        n += 1
    if world_size > 1:
        torch.distributed.all_reduce(sum_g)
        scalars = torch.tensor([sum_sq, float(n)], dtype=torch.float64, device=sum_g.device)
        torch.distributed.all_reduce(scalars)
        sum_sq, n = float(scalars[0]), int(scalars[1])
    return snr_from_sums(sum_g, sum_sq, n), n
