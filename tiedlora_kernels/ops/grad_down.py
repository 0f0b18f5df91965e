"""The dA tile of the adapted layer's gradient pass: dA = (s g u)^T dropout(x), g = G (B v) (M, r)
from the backward's adapter_term pass, in one pass over x with the dropout mask regenerated from
its seed (never stored).

A program owns one K tile for one row split and writes that split's fp32 partial (splits, r, K);
``grad_finish`` sums the splits in order: a deterministic two-stage reduction, no atomics. It runs
as one role of ``_grad_factors_kernel`` (grad_factors.py), in the same launch as the dB / dv / du
tiles. Bytes: x once (M K), g once per K tile (M r fp32, from L2), partials 4 r K per split. At
M = 8192, K = 4096, bf16: 64 MiB, 14 us at 4.8 TB/s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import keep_mask


@triton.jit
def grad_down_tile(
    X, GR, U, DA_PART, SEED,
    M, K, R, rows_per_split,
    stride_xm, stride_xk, stride_gm,
    scaling, p_drop, i_k, i_s,
    HAS_U: tl.constexpr, X_DROPOUT: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """K tile ``i_k``, row split ``i_s`` of dA = (s * g * U)^T X_d; the dropout mask is recomputed
    from SEED. X (M, K) any strides, GR = g (M, R) fp32 with unit column stride; DA_PART
    (splits, R, K) fp32 contiguous: this tile of split ``i_s`` written (zeros for an empty split).
    """
    o_k = i_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_k = o_k < K
    m_r = o_r < R
    if X_DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - p_drop)
    b_su = tl.zeros((BLOCK_R,), dtype=tl.float32) + scaling                                  # [BR]
    if HAS_U:
        b_su = b_su * tl.load(U + o_r, mask=m_r, other=0.0).to(tl.float32)
    b_da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)                                    # [BR, BK]
    row_lo = i_s.to(tl.int64) * rows_per_split
    for m0 in range(row_lo, min(row_lo + rows_per_split, M), BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < M
        p_x = X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0).to(tl.float32)      # [BM, BK]
        if X_DROPOUT:
            b_x = tl.where(keep_mask(seed, o_m, o_k, K, p_drop), b_x * keep_scale, 0.0)
        p_g = GR + o_m[:, None] * stride_gm + o_r[None, :]
        b_gr = tl.load(p_g, mask=m_m[:, None] & m_r[None, :], other=0.0)                    # [BM, BR]
        b_da = tl.dot(tl.trans(b_gr), b_x, b_da, input_precision=SMALL_PREC)
    # s u scales the sum, not each row: padded rows (0) times a non-finite u would make NaN of every column
    p_da = DA_PART + i_s.to(tl.int64) * R * K + o_r[:, None] * K + o_k[None, :]
    tl.store(p_da, b_da * b_su[:, None], mask=m_r[:, None] & m_k[None, :])

