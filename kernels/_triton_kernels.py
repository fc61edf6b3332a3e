"""Triton kernels behind :mod:`memact_kernels.triton_kernel`.

This module imports ``triton`` at the top, so it must only be imported lazily (by
``triton_kernel._kernels()``) once we know we are on CUDA with Triton installed.

Two kernels, both computing logit tiles ``z = (hidden @ weight.T) / T`` on the fly with ``tl.dot``
(fp32 accumulation), so no [N, V] tensor ever exists:

* :func:`lse_partials_kernel` (forward) - grid (row blocks, vocab splits). Each program walks its
  share of the vocabulary in BLOCK_V tiles with an online logsumexp and writes four per-row partials
  for its split: running max m, sum exp(z - m), sum exp(z - m) * (z - m), and the target logit (0 if
  the target is not in this split). The host merges the splits (cheap: [splits, N]). Sums are taken
  relative to the running max so that the entropy, log(sum e) - E[z - m], never subtracts two numbers
  of the size of the logits.
* :func:`dlogits_kernel` (backward) - grid (row blocks of one chunk, vocab tiles). Recomputes a logit
  tile and writes ``d loss / d raw_logits`` for it into a [C, V] buffer; the host then does the two big
  GEMMs (grad_hidden = dz @ W, grad_weight += dz.T @ h) with cuBLAS, which is faster than anything
  we would hand-write for them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    rows,  # [BLOCK_N] int64 row indices
    row_mask,  # [BLOCK_N] bool
    cols,  # [BLOCK_V] int64 vocabulary indices
    col_mask,  # [BLOCK_V] bool
    dim,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    """Raw logits hidden[rows] @ weight[cols].T as a [BLOCK_N, BLOCK_V] fp32 tile (0 where masked)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        h = tl.load(
            hidden_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        w = tl.load(
            weight_ptr + cols[None, :] * stride_wv + offs_d[:, None] * stride_wd,
            mask=col_mask[None, :] & d_mask[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_V] (weight tile, transposed by the indexing)
        if IEEE_FP32:
            # fp32 inputs with TF32 disabled in torch: match torch's full-precision matmul.
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    return acc


@triton.jit
def lse_partials_kernel(
    hidden_ptr,
    weight_ptr,
    targets_ptr,
    part_max_ptr,  # [splits, N] fp32
    part_sum_ptr,  # [splits, N] fp32: sum_j exp(z_j - m)
    part_sum_z_ptr,  # [splits, N] fp32: sum_j exp(z_j - m) * (z_j - m)
    part_target_ptr,  # [splits, N] fp32: z_target if the target lies in this split, else 0
    n_rows,
    vocab,
    dim,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    cols_per_split,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < n_rows
    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, vocab)

    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_sum_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    target_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    # The host guarantees v_begin < v_end, so the first tile has a valid column and run_max becomes
    # finite after one iteration (exp(-inf - finite) = 0 then rescales the empty running sums).
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, dim,
            stride_hn, stride_hd, stride_wv, stride_wd,
            BLOCK_N, BLOCK_V, BLOCK_D, IEEE_FP32,
        ) * inv_temp
        z_valid = tl.where(col_mask[None, :], z, 0.0)  # for sums: avoids -inf * 0 = nan
        z_masked = tl.where(col_mask[None, :], z, float("-inf"))  # for max/exp: padding contributes 0

        new_max = tl.maximum(run_max, tl.max(z_masked, axis=1))
        shift = run_max - new_max  # <= 0; -inf on the first tile
        rescale = tl.exp(shift)
        e = tl.exp(z_masked - new_max[:, None])
        # Re-base sum e (z - m_old) to m_new: sum e' (z - m_new) = rescale * (sum e (z - m_old) + shift * sum e).
        # The where() avoids -inf * 0 = nan on the first tile, when the running sums are still empty.
        run_sum_z = rescale * (run_sum_z + tl.where(run_sum > 0.0, shift * run_sum, 0.0))
        run_sum_z += tl.sum(e * (z_valid - new_max[:, None]), axis=1)  # e = 0 on padded columns
        run_sum = run_sum * rescale + tl.sum(e, axis=1)
        target_z += tl.sum(tl.where(cols[None, :] == tgt[:, None], z_valid, 0.0), axis=1)
        run_max = new_max

    out = pid_s.to(tl.int64) * n_rows + rows
    tl.store(part_max_ptr + out, run_max, mask=row_mask)
    tl.store(part_sum_ptr + out, run_sum, mask=row_mask)
    tl.store(part_sum_z_ptr + out, run_sum_z, mask=row_mask)
    tl.store(part_target_ptr + out, target_z, mask=row_mask)


@triton.jit
def dlogits_kernel(
    hidden_ptr,  # chunk rows [C, H]
    weight_ptr,  # [V, H]
    targets_ptr,  # [C] int64
    lse_ptr,  # [C] fp32
    entropy_ptr,  # [C] fp32
    grad_lp_ptr,  # [C] fp32 (unused unless HAS_GRAD_LP)
    grad_ent_ptr,  # [C] fp32 (unused unless HAS_GRAD_ENT)
    dz_ptr,  # [C, V] out, contiguous, dtype of the GEMMs that consume it
    n_rows,
    vocab,
    dim,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_dzn,
    inv_temp,
    HAS_GRAD_LP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    """dz = d(loss)/d(raw logits) = [g_lp ([j==t] - p) - g_ent p (log p + entropy)] / T for one tile.

    (z - E_p[z] = log p - E_p[log p] = log p + entropy, which is better conditioned than z - E_p[z].)
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < n_rows
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < vocab

    z = _logits_tile(
        hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, dim,
        stride_hn, stride_hd, stride_wv, stride_wd,
        BLOCK_N, BLOCK_V, BLOCK_D, IEEE_FP32,
    ) * inv_temp
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    logp = z - lse[:, None]
    p = tl.exp(logp)  # padded rows/cols give finite junk that is never stored

    dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if HAS_GRAD_LP:
        g_lp = tl.load(grad_lp_ptr + rows, mask=row_mask, other=0.0)
        tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        dz += g_lp[:, None] * (onehot - p)
    if HAS_GRAD_ENT:
        g_ent = tl.load(grad_ent_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        dz -= g_ent[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_temp  # chain rule through z = raw / T

    tl.store(
        dz_ptr + rows[:, None] * stride_dzn + cols[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


__all__ = ["triton", "lse_partials_kernel", "dlogits_kernel"]
