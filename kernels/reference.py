"""Ground-truth ``linear_logprobs``: materialise the full [N, V] logits and use ``log_softmax``.

Simple and obviously correct, used by the tests as the oracle (run in float64) and selectable with
``impl="reference"``. Its memory is O(N * V), which is exactly what the chunked and Triton versions avoid.
"""

from __future__ import annotations

import torch

from ._common import check_inputs, compute_dtype, flatten_inputs, unflatten_outputs


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy under ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: [N, H] or [B, T, H] floating point.
        weight: [V, H], same dtype/device as ``hidden``.
        targets: [N] or [B, T] integer, values in [0, V).
        temperature: > 0.

    Returns:
        ``(logprobs, entropy)``, each [N] or [B, T], float32 (float64 for float64 inputs).
        Differentiable w.r.t. ``hidden`` and ``weight`` through ordinary autograd.
    """
    check_inputs(hidden, weight, targets, temperature)
    flat_hidden, flat_targets, lead_shape = flatten_inputs(hidden, targets)
    dtype = compute_dtype(hidden.dtype)
    # Upcast before the matmul so bf16 inputs get the same fp32 math as the chunked path.
    logits = (flat_hidden.to(dtype) @ weight.to(dtype).T) / temperature  # [N, V]
    logp = torch.log_softmax(logits, dim=-1)  # [N, V]
    logprobs = logp.gather(-1, flat_targets[:, None]).squeeze(-1)  # [N]
    entropy = -(logp.exp() * logp).sum(-1)  # [N]
    return unflatten_outputs(logprobs, entropy, lead_shape)
