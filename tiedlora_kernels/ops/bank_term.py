"""The rank-r term of a batch in which every row has its own adapter, when the adapters share A and B
(one launch, the cost of one adapter): everything the layer does besides the base GEMM, which cuBLAS
then adds with ``addmm_`` (beta = 1) into the same buffer, as for one adapter (``adapter_term.py``).

    a   = IDS[m // rows_per_id]                    adapter slot of row m (-1: base model only)
    h   = X A^T                                    (M, R) fp32       X (M, K), A (R, K) shared
    OUT = ((h * U[a]) B^T) * V[a] + b              (M, N)            B (N, R) shared, U (S, R), V (S, N)
    a = -1: OUT = b (the adapter term is 0)

U holds each slot's u times its scaling s (``AdapterBank`` folds s in), V each slot's v (None: all 1).
IDS is one entry per sequence, broadcast over its ``rows_per_id`` consecutive rows (tokens) of X:
no (M,) index tensor is built per call, prefill and decode read the same (sequences,) ids.

Bytes (the adapter_term schedule: one program per row block, the columns split only when the row
blocks alone cannot fill the device): X read once, OUT written once, A and B read once per program
from L2, and per program the U rows and V rows of its rows' slots, gathered from L2 (the whole of U
and V is S (R + N) fp32 per layer: 8.5 MiB at S = 1024, N = 2048, R = 16). So a mixed batch of 1024
shared-factor adapters moves what one adapter moves: at M = 32768, K = N = 2048, bf16, 128 MiB + 128
MiB, ~56 us at 4.8 TB/s (H200), next to a 275 GFLOP base GEMM. No dropout: inference only.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .adapter_term import _tiles
from .common import (block_r, cdiv, column_splits, down_project, launch_options, precisions, store_with_bias, up_project,
                     vec, wide_dot)


@triton.jit
def _bank_term_kernel(
    X, A, B, U, V, IDS, BIAS, OUT,
    M, N, K, R, rows_per_id, cols_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_us, stride_ur, stride_vs, stride_vn,
    stride_om, stride_on,
    HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr,
    WIDE_DOT: tl.constexpr, UPCAST: tl.constexpr, MAIN_PREC: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """OUT[:, cols] = ((X A^T * U[a]) B^T) * V[a] + BIAS for rows with a slot a >= 0, BIAS (or 0) for
    a = -1; cols = this split's range. Grid (row blocks, column splits).

    X (M, K), A (R, K), B (N, R), U (S, R), V (S, N), OUT (M, N): any strides. IDS (M / rows_per_id,)
    int32, BIAS (N,): unit stride. WIDE_DOT: h's dot in fp32 operands (16-bit X, A of another dtype).
    """
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_m = o_m < M
    m_r = o_r < R
    b_a = tl.load(IDS + o_m // rows_per_id, mask=m_m, other=-1)                                 # [BM]
    m_live = m_m & (b_a >= 0)
    o_a = tl.maximum(b_a, 0).to(tl.int64)  # a dead row reads slot 0's U and V, then drops them

    # h = X A^T, one pass over this program's rows of X (A shared by every row).
    b_h = down_project(X, A, X, o_m, m_m, o_r, m_r, K, stride_xm, stride_xk, stride_ak, stride_ar, 0, 0.0, 1.0,
                       False, False, WIDE_DOT, UPCAST, MAIN_PREC, SMALL_PREC, BLOCK_M, BLOCK_K, BLOCK_R)      # [BM, BR]
    # z = h * U[a] (s folded into U). Dead rows and the padded rank columns are set to 0, not
    # multiplied by 0: an inf in x would make 0 * inf = NaN reach OUT.
    m_z = m_live[:, None] & m_r[None, :]
    b_u = tl.load(U + o_a[:, None] * stride_us + o_r[None, :] * stride_ur, mask=m_z, other=0.0)  # [BM, BR]
    b_z = tl.where(m_z, b_h * b_u.to(tl.float32), 0.0)
    n_lo = i_s.to(tl.int64) * cols_per_split
    for n0 in range(n_lo, min(n_lo + cols_per_split, N), BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        b_out = up_project(b_z, B, o_r, m_r, o_n, m_n, stride_br, stride_bn, SMALL_PREC)              # [BM, BN]
        if HAS_V:
            # each row its own slot's v: a gather from L2 (rows of one sequence hit the same line)
            b_v = tl.load(V + o_a[:, None] * stride_vs + o_n[None, :] * stride_vn,
                          mask=m_live[:, None] & m_n[None, :], other=0.0)                          # [BM, BN]
            b_out = b_out * b_v.to(tl.float32)
        # base-only rows: set to 0, not left as 0 * B (a non-finite B would reach them)
        b_out = tl.where(m_live[:, None], b_out, 0.0)
        store_with_bias(OUT, BIAS, b_out, o_m, m_m, o_n, m_n, stride_om, stride_on, HAS_BIAS)


def bank_term(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, V: Optional[torch.Tensor],
              ids: torch.Tensor, rows_per_id: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """OUT (M, N) in x's dtype: each row's adapter term (shared A, B; its own slot's U and V) plus the bias.

    Args:
        x: (M, K) any strides; rows ``[j * rows_per_id, (j + 1) * rows_per_id)`` belong to ``ids[j]``.
        A: (R, K) and B: (N, R), any strides and float dtype (A is cast to x's dtype for the dot, as
            the single-adapter kernel does, except fp32 A on fp16 x: an fp32 dot; B is read in fp32).
        U: (S, R) each slot's s * u; V: (S, N) each slot's v, or None (all 1). Any strides.
        ids: (M / rows_per_id,) int32 slot per sequence, -1 for the base model only (validated by
            the caller: values in [-1, S)). bias: (N,) or None.

    Returns:
        (M, N) tensor; ``out.addmm_(x, W.t())`` then gives the layer's output.
    """
    M, K = x.shape
    N, R = B.shape
    r_block = block_r(R)
    cfg = _tiles(M, r_block, x.device)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    row_blocks = cdiv(M, cfg.block_m)
    splits, cols_per_split = column_splits(row_blocks, N, cfg.block_n, x.device)
    _bank_term_kernel[(row_blocks, splits)](
        x, A, B, U, V if V is not None else U, ids, vec(bias, x), out,
        M, N, K, R, rows_per_id, cols_per_split,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1), U.stride(0), U.stride(1),
        V.stride(0) if V is not None else 0, V.stride(1) if V is not None else 0,
        out.stride(0), out.stride(1),
        HAS_V=V is not None, HAS_BIAS=bias is not None,
        WIDE_DOT=wide_dot(x, A),
        **precisions(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=r_block,
        **launch_options(cfg.num_warps),
    )
    return out
