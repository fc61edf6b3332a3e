"""CUDA/Triton ``linear_logprobs``: fused forward, Triton-plus-cuBLAS backward.

Forward: one Triton kernel tiles hidden [N, H] x weight [V, H] and keeps an online logsumexp per row
(see :mod:`memact_kernels._triton_kernels`), so not even a [C, V] chunk of logits is written to memory.
The vocabulary is split across programs when N is small, to fill the GPU; the per-split partials
([splits, N]) are merged here in PyTorch.

Backward: per chunk of C rows, a Triton kernel recomputes the logit tiles and writes
dz = d loss / d raw_logits into a [C, V] buffer (input dtype: bf16 for bf16 models, like other fused
LM-head kernels), then cuBLAS does grad_hidden = dz @ W and grad_weight += dz.T @ h, the latter
accumulated in fp32 across chunks.

Triton is imported lazily: importing this module never fails, and :func:`triton_available` tells whether
this path can run. ``impl="triton"`` without CUDA or Triton raises ``RuntimeError``.

Testing without a GPU: with ``TRITON_INTERPRET=1`` in the environment (set before Triton is imported),
``impl="triton"`` also accepts CPU tensors and runs the kernels in Triton's numpy interpreter
(slow; fp32/fp16 only - the Triton 3.9 interpreter computes bf16 ``tl.dot`` wrongly).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from ._common import check_inputs, flatten_inputs, unflatten_outputs
from .chunked import default_chunk_size

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tile sizes (rows, vocab, hidden). 16-bit inputs get bigger tiles: half the shared memory per element.
_TILES_16BIT = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}
_TILES_FP32 = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 3}


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    """The compiled-on-demand kernel module, or None if Triton cannot be imported."""
    try:
        from . import _triton_kernels
    except Exception:  # ImportError, or a broken Triton install failing at import time
        return None
    return _triton_kernels


def triton_available(hidden: torch.Tensor | None = None) -> bool:
    """True if Triton imports, CUDA is usable, and (if given) ``hidden`` is a CUDA tensor of a supported dtype."""
    if hidden is not None and not (hidden.is_cuda and hidden.dtype in _TRITON_DTYPES):
        return False
    return torch.cuda.is_available() and _kernels() is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _require_triton(hidden: torch.Tensor) -> ModuleType:
    if not hidden.is_cuda and not _interpreting():
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors, but hidden is on {hidden.device}; use impl='chunked' or 'auto'"
        )
    if hidden.dtype not in _TRITON_DTYPES:
        raise RuntimeError(f"impl='triton' supports fp32/bf16/fp16, got {hidden.dtype}; use impl='chunked'")
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("impl='triton' needs the `triton` package, which could not be imported")
    return kernels


def _tiles(dtype: torch.dtype) -> dict:
    return dict(_TILES_FP32 if dtype == torch.float32 else _TILES_16BIT)


def _ieee_fp32(dtype: torch.dtype) -> bool:
    # Follow torch's own switch, so the Triton and cuBLAS parts make the same precision trade-off.
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (16-bit inputs) with an fp32 result, so per-chunk grad_weight terms aren't rounded to 16 bits."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # older torch without mm(..., out_dtype)
        return torch.mm(a, b).float()


def _forward_stats(hidden, weight, targets, temperature):
    """Per-row (logprobs, entropy, lse), all fp32 [N], from the fused Triton forward kernel."""
    kernels = _require_triton(hidden)
    n, dim = hidden.shape
    vocab = weight.shape[0]
    if n == 0:  # a zero-sized grid is not a valid launch
        return tuple(torch.empty(0, dtype=torch.float32, device=hidden.device) for _ in range(3))
    cfg = _tiles(hidden.dtype)
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]

    # Split the vocabulary so that there are about 2 programs per SM even when N is small.
    n_blocks = _cdiv(n, block_n)
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 4
    v_tiles = _cdiv(vocab, block_v)
    splits = max(1, min(_cdiv(2 * sms, n_blocks), v_tiles))
    cols_per_split = _cdiv(v_tiles, splits) * block_v  # a multiple of BLOCK_V
    splits = _cdiv(vocab, cols_per_split)  # recount so that no split is empty

    partials = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    kernels.lse_partials_kernel[(n_blocks, splits)](
        hidden, weight, targets,
        partials[0], partials[1], partials[2], partials[3],
        n, vocab, dim,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        cols_per_split, 1.0 / temperature,
        IEEE_FP32=_ieee_fp32(hidden.dtype),
        **cfg,
    )

    # Merge the splits: re-base every split's sums from its own max m_i to the global max M.
    #   sum e (z - M) over split i = exp(m_i - M) * (sum_z_i + (m_i - M) * sum_i)
    part_max, part_sum, part_sum_z, part_target = partials.unbind(0)  # each [splits, N]
    row_max = part_max.amax(dim=0)  # [N]
    shift = part_max - row_max
    scale = torch.exp(shift)
    total = (part_sum * scale).sum(dim=0)
    # where(): an empty split (never launched by the sizing above, but cheap to guard) has m_i = -inf, sum 0.
    rebased = torch.where(part_sum > 0, part_sum_z + shift * part_sum, torch.zeros_like(part_sum_z))
    total_z = (rebased * scale).sum(dim=0)
    log_total = total.log()
    lse = row_max + log_total
    entropy = log_total - total_z / total
    logprobs = (part_target.sum(dim=0) - row_max) - log_total
    return logprobs, entropy, lse


class _TritonLinearLogprobs(torch.autograd.Function):
    """autograd.Function over the flat problem: hidden [N, H], weight [V, H], targets [N] int64 (CUDA)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        targets = targets.contiguous()  # the kernels index targets with stride 1
        logprobs, entropy, lse = _forward_stats(hidden, weight, targets, temperature)
        # Backward needs lse and entropy (z - E_p[z] = log p + entropy); a private copy of the entropy
        # so callers may modify the returned tensor in place.
        ctx.save_for_backward(hidden, weight, targets, lse, entropy.clone())
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logprobs is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None
        kernels = _require_triton(hidden)

        n, dim = hidden.shape
        vocab = weight.shape[0]
        chunk_size = ctx.chunk_size
        cfg = _tiles(hidden.dtype)
        # Upstream grads can be expanded views (e.g. from .sum()): the kernel wants stride-1 fp32.
        g_lp = None if grad_logprobs is None else grad_logprobs.float().contiguous()
        g_ent = None if grad_entropy is None else grad_entropy.float().contiguous()

        grad_hidden = torch.empty((n, dim), dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros((vocab, dim), dtype=torch.float32, device=weight.device) if need_weight else None

        rows = min(chunk_size, n)
        dz_buf = torch.empty((rows, vocab), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            c = end - start
            h_c = hidden[start:end]
            dz = dz_buf[:c]
            grid = (_cdiv(c, cfg["BLOCK_N"]), _cdiv(vocab, cfg["BLOCK_V"]))
            kernels.dlogits_kernel[grid](
                h_c, weight, targets[start:end], lse[start:end], entropy[start:end],
                g_lp[start:end] if g_lp is not None else lse,  # dummy pointer when unused
                g_ent[start:end] if g_ent is not None else lse,
                dz,
                c, vocab, dim,
                h_c.stride(0), h_c.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
                1.0 / ctx.temperature,
                HAS_GRAD_LP=g_lp is not None,
                HAS_GRAD_ENT=g_ent is not None,
                IEEE_FP32=_ieee_fp32(hidden.dtype),
                **cfg,
            )
            if need_hidden:
                torch.mm(dz, weight, out=grad_hidden[start:end])
            if need_weight:
                if dz.dtype == torch.float32:
                    grad_weight.addmm_(dz.T, h_c)  # in place: no [V, H] temporary
                else:
                    grad_weight += _mm_fp32_out(dz.T, h_c)

        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def triton_linear_logprobs_flat(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked entry point on flat CUDA inputs: hidden [N, H], weight [V, H], targets [N] int64.

    ``chunk_size`` only bounds the backward's [C, V] dz buffer (the forward needs no buffer);
    the default keeps that buffer around 128 MiB.
    """
    _require_triton(hidden)
    if chunk_size is None:
        # default_chunk_size assumes 4-byte elements; dz is stored in the input dtype.
        chunk_size = default_chunk_size(weight.shape[0]) * (4 // hidden.element_size())
    return _TritonLinearLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk_size))


def linear_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``(logprobs, entropy)``; same contract as :func:`memact_kernels.linear_logprobs` (CUDA only).

    Shapes: hidden [N, H] or [B, T, H]; weight [V, H]; targets [N] or [B, T] -> two float32 [N] / [B, T].
    """
    check_inputs(hidden, weight, targets, temperature, chunk_size)
    flat_hidden, flat_targets, lead_shape = flatten_inputs(hidden, targets)
    logprobs, entropy = triton_linear_logprobs_flat(flat_hidden, weight, flat_targets, temperature, chunk_size)
    return unflatten_outputs(logprobs, entropy, lead_shape)
