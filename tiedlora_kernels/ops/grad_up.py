"""dB and dv of the adapted linear layer from one pass over G. Both come from one N x r product,

    P = G^T z,  z = s h u (M, r), h saved by the forward:
    dB = diag(v) P                    (dL/dB_nr = v_n sum_m G_mn z_mr)
    dv = rowsum(B * P)                (dL/dv_n = sum_m G_mn (z B^T)_mn = sum_r B_nr P_nr)

so the kernel computes P alone (one [BN, BM] x [BM, R] dot per tile) and torch finishes with two
N x r elementwise ops.

Why a second pass over G and not inside the backward's adapter_term pass: that pass runs one
program per row block, so it could only emit per-row-block partials of an N x r matrix
(M / BLOCK_M x N x r fp32: 32 MiB at M = 8192, N = 4096, r = 16, 256 MiB at r = 128), as many bytes
as G itself or more. Here a program owns a column tile for many rows and writes few partials.

Grid (column tiles, row splits), fp32 partials (splits, N, r) summed by torch: deterministic, no
atomics. Bytes: G once (M N), h once per column tile (M r fp32, from L2). At M = 8192, N = 4096,
bf16: 64 MiB, 14 us at 4.8 TB/s.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import precisions, reduction_tiles, row_splits, triton_interpreting, vec


@triton.jit
def _grad_up_kernel(
    G, H, U, P_PART,
    M, N, R, rows_per_split,
    stride_gm, stride_gn, stride_hm,
    scaling,
    HAS_U: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Row-split partials of P = G^T z, z = s * H * U.

    Grid (column tiles, row splits). G (M, N) any strides, H (M, R) fp32; P_PART (splits, N, R)
    fp32 contiguous, every element written (zeros for an empty split).
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
    b_p = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)                                     # [BN, BR]
    row_lo = i_s.to(tl.int64) * rows_per_split
    for m0 in range(row_lo, min(row_lo + rows_per_split, M), BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < M
        p_g = G + o_m[:, None] * stride_gm + o_n[None, :] * stride_gn
        b_g = tl.load(p_g, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)       # [BM, BN]
        p_h = H + o_m[:, None] * stride_hm + o_r[None, :]
        b_z = tl.load(p_h, mask=m_m[:, None] & m_r[None, :], other=0.0) * b_su[None, :]      # [BM, BR]
        b_p = tl.dot(tl.trans(b_g), b_z, b_p, input_precision=SMALL_PREC)
    p_out = P_PART + i_s.to(tl.int64) * N * R + o_n[:, None] * R + o_r[None, :]
    tl.store(p_out, b_p, mask=m_n[:, None] & m_r[None, :])


def grad_up(G: torch.Tensor, h: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor], B: torch.Tensor,
            scaling: float, need_db: bool, need_dv: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dB (N, r) fp32 or None, dv (N,) fp32 or None) from G (M, N) any strides and h (M, r) fp32."""
    M, N = G.shape
    r = B.shape[1]
    r_block, block_m, block_n, warps = reduction_tiles(r)
    small_prec = precisions(G.dtype)["SMALL_PREC"]
    if small_prec == "ieee" and not triton_interpreting():
        block_m = 32  # the IEEE fp32 dot of a 64-row tile spills on sm_90 (bench/results/compile/)
    n_tiles = triton.cdiv(N, block_n)
    splits, rows = row_splits(M, block_m, n_tiles, 4 * N * r, G.device)
    p_part = torch.empty((splits, N, r), device=G.device, dtype=torch.float32)
    _grad_up_kernel[(n_tiles, splits)](
        G, h, vec(u, h), p_part,
        M, N, r, rows,
        G.stride(0), G.stride(1), h.stride(0),
        float(scaling),
        HAS_U=u is not None, SMALL_PREC=small_prec,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=r_block, num_warps=warps,
    )
    P = p_part.sum(0)                                                                       # (N, r) fp32
    db = (P * v.float()[:, None] if v is not None else P) if need_db else None
    dv = (B.float() * P).sum(1) if need_dv else None
    return db, dv
