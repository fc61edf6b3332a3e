"""memact_kernels: memory-efficient fused LM-head kernels.

Main entry point: :func:`linear_logprobs`, the per-token log-probability of the sampled/target token and
the entropy of the next-token distribution, computed straight from the last hidden states and the LM head
without materialising the [N, V] logits (V = vocabulary size). This is what an RL policy-gradient step
needs (log pi(a|s) for the ratio, entropy for the bonus/diagnostics) and is where most of the activation
memory of a long-context LLM update goes if done naively.
"""

from __future__ import annotations

import torch

from ._common import check_inputs, flatten_inputs, unflatten_outputs
from .chunked import chunked_linear_logprobs_flat, default_chunk_size, linear_logprobs_chunked
from .reference import linear_logprobs_reference
from .triton_kernel import linear_logprobs_triton, triton_available, triton_linear_logprobs_flat

__all__ = [
    "linear_logprobs",
    "linear_logprobs_reference",
    "linear_logprobs_chunked",
    "linear_logprobs_triton",
    "triton_available",
    "default_chunk_size",
]

_IMPLS = ("auto", "chunked", "triton", "reference")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy under ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: [N, H] or [B, T, H] final hidden states (fp32, bf16, fp16 or fp64).
        weight: [V, H] LM head (no bias), same dtype and device as ``hidden``.
        targets: [N] or [B, T] integer token ids in [0, V).
        temperature: sampling temperature, > 0 (the logits are divided by it).
        chunk_size: rows processed at once (bounds the [chunk, V] working set); default depends on V.
        impl: ``"auto"`` (Triton if ``hidden`` is on CUDA and Triton imports, else chunked),
            ``"chunked"`` (pure PyTorch, any device), ``"triton"`` (CUDA only; RuntimeError otherwise),
            ``"reference"`` (materialises [N, V]; for testing).

    Returns:
        ``(logprobs, entropy)``, each [N] or [B, T] float32 (float64 for float64 inputs), differentiable
        w.r.t. ``hidden`` and ``weight`` through both outputs.

    Raises:
        ValueError: bad shapes, dtypes, devices, out-of-range targets, temperature or chunk_size.
        RuntimeError: ``impl="triton"`` without a CUDA tensor or without Triton.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "reference":
        return linear_logprobs_reference(hidden, weight, targets, temperature)

    check_inputs(hidden, weight, targets, temperature, chunk_size)
    if impl == "auto":
        impl = "triton" if triton_available(hidden) else "chunked"
    flat_hidden, flat_targets, lead_shape = flatten_inputs(hidden, targets)
    if impl == "triton":
        logprobs, entropy = triton_linear_logprobs_flat(flat_hidden, weight, flat_targets, temperature, chunk_size)
    else:
        logprobs, entropy = chunked_linear_logprobs_flat(flat_hidden, weight, flat_targets, temperature, chunk_size)
    return unflatten_outputs(logprobs, entropy, lead_shape)
