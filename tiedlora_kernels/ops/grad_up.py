"""dB and dv of the adapted linear layer from one pass over G: dB = (G v)^T z and
dv = sum_rows(G * (z B^T)), z = s h u with h (M, r) saved by the forward.

Why a second pass over G and not inside the backward's adapter_term pass: that pass runs one
program per row block, so it could only emit per-row-block partials of an N x r matrix
(M / BLOCK_M x N x r fp32: 32 MiB at M = 8192, N = 4096, r = 16, 256 MiB at r = 128), as many bytes
as G itself or more. Here a program owns a column tile for many rows and writes few partials.

Grid (column tiles, row splits), fp32 partials (splits, N, r) and (splits, N) summed by torch.
Bytes: G once (M N), h once per column tile (M r fp32, from L2). At M = 8192, N = 4096, bf16:
64 MiB, 14 us at 4.8 TB/s.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import precisions, reduction_tiles, row_splits, vec


@triton.jit
def _grad_up_kernel(
    G, H, U, V, B, DB_PART, DV_PART,
    M, N, R, rows_per_split,
    stride_gm, stride_gn, stride_hm, stride_bn, stride_br,
    scaling,
    HAS_U: tl.constexpr, HAS_V: tl.constexpr, NEED_DB: tl.constexpr, NEED_DV: tl.constexpr,
    SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Row-split partials of dB = (G V)^T z and dv = sum_rows(G * (z B^T)), z = s * H * U.

    Grid (column tiles, row splits). G (M, N) any strides, H (M, R) fp32; DB_PART (splits, N, R)
    and DV_PART (splits, N) fp32, contiguous, every element written (zeros for an empty split).
    """
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_n = o_n < N
    m_r = o_r < R
    b_su = tl.zeros((BLOCK_R,), dtype=tl.float32) + scaling                                  # [BR]
    if HAS_U:
        b_su = b_su * tl.load(U + o_r, mask=m_r, other=0.0).to(tl.float32)
    if HAS_V:
        b_v = tl.load(V + o_n, mask=m_n, other=0.0).to(tl.float32)                           # [BN]
    if NEED_DV:
        p_bt = B + o_r[:, None] * stride_br + o_n[None, :] * stride_bn
        b_bt = tl.load(p_bt, mask=m_r[:, None] & m_n[None, :], other=0.0).to(tl.float32)     # [BR, BN]
    b_db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)                                    # [BN, BR]
    b_dv = tl.zeros((BLOCK_N,), dtype=tl.float32)                                            # [BN]
    row_lo = i_s.to(tl.int64) * rows_per_split
    for m0 in range(row_lo, min(row_lo + rows_per_split, M), BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < M
        p_g = G + o_m[:, None] * stride_gm + o_n[None, :] * stride_gn
        b_g = tl.load(p_g, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)       # [BM, BN]
        p_h = H + o_m[:, None] * stride_hm + o_r[None, :]
        b_z = tl.load(p_h, mask=m_m[:, None] & m_r[None, :], other=0.0) * b_su[None, :]      # [BM, BR]
        if NEED_DB:
            b_gv = b_g
            if HAS_V:
                b_gv = b_g * b_v[None, :]
            b_db = tl.dot(tl.trans(b_gv), b_z, b_db, input_precision=SMALL_PREC)
        if NEED_DV:
            b_zbt = tl.dot(b_z, b_bt, input_precision=SMALL_PREC)                             # [BM, BN]
            b_dv += tl.sum(b_g * b_zbt, axis=0)
    if NEED_DB:
        p_db = DB_PART + i_s.to(tl.int64) * N * R + o_n[:, None] * R + o_r[None, :]
        tl.store(p_db, b_db, mask=m_n[:, None] & m_r[None, :])
    if NEED_DV:
        tl.store(DV_PART + i_s.to(tl.int64) * N + o_n, b_dv, mask=m_n)


def grad_up(G: torch.Tensor, h: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor], B: torch.Tensor,
            scaling: float, need_db: bool, need_dv: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dB (N, r) fp32 or None, dv (N,) fp32 or None) from G (M, N) any strides and h (M, r) fp32."""
    M, N = G.shape
    r = B.shape[1]
    r_block, block_m, block_n, warps = reduction_tiles(r)
    n_tiles = triton.cdiv(N, block_n)
    splits, rows = row_splits(M, block_m, n_tiles, 4 * N * (r + 1), G.device)
    db_part = torch.empty((splits, N, r), device=G.device, dtype=torch.float32) if need_db else None
    dv_part = torch.empty((splits, N), device=G.device, dtype=torch.float32) if need_dv else None
    _grad_up_kernel[(n_tiles, splits)](
        G, h, vec(u, h), vec(v, h), B,
        db_part if need_db else h, dv_part if need_dv else h,
        M, N, r, rows,
        G.stride(0), G.stride(1), h.stride(0), B.stride(0), B.stride(1),
        float(scaling),
        HAS_U=u is not None, HAS_V=v is not None, NEED_DB=need_db, NEED_DV=need_dv,
        SMALL_PREC=precisions(G.dtype)["SMALL_PREC"],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=r_block, num_warps=warps,
    )
    return (db_part.sum(0) if need_db else None), (dv_part.sum(0) if need_dv else None)
