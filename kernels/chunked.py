"""Memory-bounded ``linear_logprobs`` in plain PyTorch: process the N rows in chunks.

Notation (per row i of a chunk, j over the vocabulary)::

    z_ij  = (hidden_i . weight_j) / T                 logits at temperature T
    lse_i = log sum_j exp(z_ij)
    p_ij  = exp(z_ij - lse_i)
    logprob_i = z_i,t_i - lse_i
    entropy_i = lse_i - sum_j p_ij z_ij = lse_i - E_p[z]_i

Forward computes, chunk by chunk, a [C, V] block of logits and reduces it to the per-row numbers above;
only ``hidden``, ``weight``, ``targets``, ``lse`` [N] and ``entropy`` [N] are kept for backward.
Backward recomputes each chunk's logits (one extra GEMM, the price of never storing [N, V]) and uses::

    d logprob_i / d z_ij = [j == t_i] - p_ij
    d entropy_i / d z_ij = -p_ij (z_ij - E_p[z]_i)

so with upstream grads g_lp, g_ent (per row)::

    dz_ij = -p_ij (g_lp_i + g_ent_i (z_ij - E_p[z]_i)) + g_lp_i [j == t_i]
          = -p_ij (g_lp_i + g_ent_i (log p_ij + entropy_i)) + g_lp_i [j == t_i]
    grad_hidden_chunk = (dz @ weight) / T
    grad_weight      += dz.T @ (hidden_chunk / T)

Peak extra memory is two [C, V] fp32 buffers (reused across chunks, so the allocator does not
page-fault fresh memory for every chunk) plus the [V, H] fp32 weight-grad accumulator, instead of
several [N, V] tensors for the naive version.
"""

from __future__ import annotations

import torch

from ._common import check_inputs, compute_dtype, flatten_inputs, unflatten_outputs

# Each [C, V] fp32 work buffer is sized to about this many bytes; two of them are live at once.
# 128 MiB gives C = 1024 rows at V = 32000. Chosen by a sweep with benchmarks/bench_linear_logprobs.py
# (2-core CPU, N=2048, V=32000, H=512, chunk 256/512/1024/2048): 256 rows was ~25% slower, 512-2048
# were equal within the noise of a shared machine, so take the middle and spend no more memory.
_TARGET_CHUNK_BYTES = 128 * 2**20
_MIN_CHUNK_ROWS = 128
_MAX_CHUNK_ROWS = 8192


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one [C, V] fp32 buffer is about ``_TARGET_CHUNK_BYTES``.

    Rounded down to a power of two (friendlier GEMM shapes) and clamped to [128, 8192].
    """
    rows = max(1, _TARGET_CHUNK_BYTES // (4 * max(vocab_size, 1)))
    rows = 1 << (rows.bit_length() - 1)  # round down to a power of two
    return int(min(max(rows, _MIN_CHUNK_ROWS), _MAX_CHUNK_ROWS))


def _scaled_rows(hidden: torch.Tensor, start: int, end: int, dtype: torch.dtype, inv_t: float) -> torch.Tensor:
    """hidden[start:end] / T in the compute dtype, [C, H].

    Folding 1/T into the (small) [C, H] hidden chunk instead of the [C, V] logits saves a full pass over
    the logits, and the same scaled chunk is exactly what grad_weight needs (dz.T @ (h / T)).
    """
    rows = hidden[start:end].to(dtype)
    return rows if inv_t == 1.0 else rows * inv_t


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """autograd.Function over the flat problem: hidden [N, H], weight [V, H], targets [N] int64."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        n = hidden.shape[0]
        cdt = compute_dtype(hidden.dtype)
        inv_t = 1.0 / temperature
        # For bf16/fp16 inputs this is one fp32 copy of the LM head ([V, H], not [N, V]): CPU bf16 GEMMs
        # would round the logits to bf16, and we want fp32 logits. For fp32/fp64 it is the same tensor.
        w = weight.to(cdt)

        logprobs = torch.empty(n, dtype=cdt, device=hidden.device)
        entropy = torch.empty(n, dtype=cdt, device=hidden.device)
        lse = torch.empty(n, dtype=cdt, device=hidden.device)

        rows = min(chunk_size, n)
        z_buf = torch.empty((rows, weight.shape[0]), dtype=cdt, device=hidden.device)
        e_buf = torch.empty_like(z_buf)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = z_buf[: end - start]  # [C, V] logits / T, then shifted by the row max
            e = e_buf[: end - start]  # [C, V] exp(z - rowmax)
            torch.mm(_scaled_rows(hidden, start, end, cdt, inv_t), w.T, out=z)

            row_max = z.amax(dim=1, keepdim=True)  # [C, 1]
            # Work with the shifted logits z - max (<= 0) from here on: exp cannot overflow, and the
            # entropy log(sum e) - E[z - max] avoids the cancellation of lse - E[z] (both ~|z|) that
            # costs fp32 digits when the logits are large and the distribution is sharp.
            z.sub_(row_max)
            torch.exp(z, out=e)
            sum_e = e.sum(dim=1)  # [C]
            # sum_j e_ij z_ij as a batched dot product: no [C, V] temporary for e * z.
            sum_ez = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # [C]
            log_sum_e = sum_e.log()

            lse[start:end] = row_max.squeeze(1) + log_sum_e
            entropy[start:end] = log_sum_e - sum_ez / sum_e
            logprobs[start:end] = z.gather(1, targets[start:end, None]).squeeze(1) - log_sum_e

        # Backward needs p = exp(z - lse) and z - E_p[z] = log p + entropy, so lse and the entropy are
        # the only per-row statistics kept (a private copy of the entropy, so callers may modify the
        # returned tensor in place).
        ctx.save_for_backward(hidden, weight, targets, lse, entropy.clone())
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        # Let backward see None for an unused output instead of a tensor of zeros: saves work
        # (e.g. only logprobs feed the loss).
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logprobs is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None

        n = hidden.shape[0]
        chunk_size = ctx.chunk_size
        cdt = compute_dtype(hidden.dtype)
        inv_t = 1.0 / ctx.temperature
        w = weight.to(cdt)
        g_lp = None if grad_logprobs is None else grad_logprobs.to(cdt)
        g_ent = None if grad_entropy is None else grad_entropy.to(cdt)

        # Contiguous (not empty_like) so every row slice is a valid contiguous `out=` for torch.mm.
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        # fp32 accumulator even for bf16 weights: summing N/C bf16-rounded partial products loses bits.
        grad_weight = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_weight else None

        rows = min(chunk_size, n)
        z_buf = torch.empty((rows, weight.shape[0]), dtype=cdt, device=hidden.device)
        p_buf = torch.empty_like(z_buf)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            hs = _scaled_rows(hidden, start, end, cdt, inv_t)  # [C, H]
            logp = z_buf[: end - start]  # [C, V]: logits / T, then log p, then dz (all in place)
            p = p_buf[: end - start]  # [C, V]
            torch.mm(hs, w.T, out=logp)
            logp.sub_(lse[start:end, None])
            torch.exp(logp, out=p)

            if g_ent is not None:
                # z - E_p[z] = log p + entropy, so
                # dz = -p (g_lp + g_ent (log p + entropy)) = p * (a * log p + b),
                # a = -g_ent, b = -(g_ent * entropy + g_lp)   (per row)
                a = -g_ent[start:end]
                b = -g_ent[start:end] * entropy[start:end]
                if g_lp is not None:
                    b = b - g_lp[start:end]
                dz = logp.mul_(a[:, None]).add_(b[:, None]).mul_(p)
            else:
                dz = p.mul_(-g_lp[start:end, None])
            if g_lp is not None:
                # the one-hot term g_lp * [j == t]
                dz.scatter_add_(1, targets[start:end, None], g_lp[start:end, None])

            if need_hidden:
                gh = grad_hidden[start:end]
                if gh.dtype == cdt:
                    torch.mm(dz, w, out=gh)
                    gh.mul_(inv_t)
                else:
                    gh.copy_(torch.mm(dz, w).mul_(inv_t))
            if need_weight:
                grad_weight.addmm_(dz.T, hs)  # hs already carries the 1/T

        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_linear_logprobs_flat(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked entry point on flat inputs: hidden [N, H], weight [V, H], targets [N] int64."""
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    return _ChunkedLinearLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk_size))


def linear_logprobs_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked ``(logprobs, entropy)`` of ``targets`` under ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: [N, H] or [B, T, H], fp32/bf16/fp16/fp64.
        weight: [V, H], same dtype and device as ``hidden``.
        targets: [N] or [B, T] integer, values in [0, V).
        temperature: > 0.
        chunk_size: rows per chunk; default :func:`default_chunk_size` (about 128 MiB of fp32 logits).

    Returns:
        ``(logprobs, entropy)`` [N] or [B, T], float32 (float64 for float64 inputs), differentiable
        w.r.t. ``hidden`` and ``weight``.
    """
    check_inputs(hidden, weight, targets, temperature, chunk_size)
    flat_hidden, flat_targets, lead_shape = flatten_inputs(hidden, targets)
    logprobs, entropy = chunked_linear_logprobs_flat(flat_hidden, weight, flat_targets, temperature, chunk_size)
    return unflatten_outputs(logprobs, entropy, lead_shape)
