"""Argument checking and shape plumbing shared by every ``linear_logprobs`` implementation.

All implementations work on flat 2-D problems:

* ``hidden``  [N, H]  floating point (fp32, bf16, fp16 or fp64)
* ``weight``  [V, H]  same dtype and device as ``hidden`` (the LM head, no bias)
* ``targets`` [N]     int64, every value in [0, V)

``hidden`` may also be [B, T, H] with ``targets`` [B, T]; :func:`flatten_inputs` turns that into the
flat problem and :func:`unflatten_outputs` restores the leading dimensions of the results.
"""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (needed for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_size: int | None = None,
) -> None:
    """Raise ``ValueError`` (naming the offending argument) unless the inputs form a valid problem.

    Shapes: hidden [N, H] or [B, T, H]; weight [V, H]; targets hidden.shape[:-1].
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a 2-D [N, H] or 3-D [B, T, H] tensor, got {shape}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D [V, H] tensor, got {shape}")
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a tensor, got {type(targets).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be a floating point tensor, got dtype {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight hidden size {weight.shape[1]} does not match hidden's last dimension {hidden.shape[-1]} "
            f"(weight {tuple(weight.shape)}, hidden {tuple(hidden.shape)})"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V > 0)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    if targets.numel() > 0:
        # One small reduction (and, on CUDA, one sync): an out-of-range index would otherwise read
        # garbage in the Triton kernel or fail deep inside gather with an unhelpful message.
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"targets must lie in [0, {weight.shape[0]}) (the vocabulary size), got values in [{lo}, {hi}]"
            )
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def flatten_inputs(
    hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """[B, T, H] / [B, T] -> [N, H] / [N] (N = B*T); also returns the leading shape to restore."""
    lead_shape = hidden.shape[:-1]
    # reshape (not view) so non-contiguous inputs work; autograd maps the grads back through it.
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long(), lead_shape


def unflatten_outputs(
    logprobs: torch.Tensor, entropy: torch.Tensor, lead_shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] -> lead_shape (e.g. [B, T])."""
    return logprobs.reshape(lead_shape), entropy.reshape(lead_shape)
