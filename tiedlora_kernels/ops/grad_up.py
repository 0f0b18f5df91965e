"""dB, dv and du of the adapted linear layer from one pass over G. dB and dv come from one N x r
product, du from the rows of g and h the same programs read:

    P = G^T z,  z = s h u (M, r), h saved by the forward, g = G (B v) from the backward's adapter_term:
    dB = diag(v) P                    (dL/dB_nr = v_n sum_m G_mn z_mr)
    dv = rowsum(B * P)                (dL/dv_n = sum_m G_mn (z B^T)_mn = sum_r B_nr P_nr)
    du = s colsum(g * h)              (dL/du_r = s sum_m g_mr h_mr)

This kernel writes row-split fp32 partials of P (and of du, one extra row); ``grad_up_finish``
sums them and writes dB, dv and du in their parameters' dtypes: two launches for the three
gradients, where torch would need six to nine small ones (sum, products, row sums, casts), each
costing a training step host time.

Why a second pass over G and not inside the backward's adapter_term pass: that pass runs one
program per row block, so it could only emit per-row-block partials of an N x r matrix
(M / BLOCK_M x N x r fp32: 32 MiB at M = 8192, N = 4096, r = 16, 256 MiB at r = 128), as many bytes
as G itself or more. Here a program owns a column tile for many rows and writes few partials.

Grid (column tiles, row splits); one column tile when only du is needed (then G is not read).
Deterministic, no atomics. Bytes: G once (M N), h once per column tile (M r fp32, from L2), g once
(M r fp32). At M = 8192, N = 4096, bf16: 64 MiB, 14 us at 4.8 TB/s.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import cdiv, kernels_interpreted, precisions, reduction_tiles, row_splits, vec
from .grad_up_finish import grad_up_finish


@triton.jit
def _grad_up_kernel(
    G, H, GR, U, PART,
    M, N, R, rows_per_split, du_row,
    stride_gm, stride_gn, stride_hm, stride_grm, stride_ps,
    scaling,
    NEED_P: tl.constexpr, NEED_DU: tl.constexpr, HAS_U: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Row-split partials of P = G^T (s * H * U) (rows 0..N-1 of PART[split]) and of
    du = s * colsum(GR * H) (row ``du_row`` of PART[split], written by column tile 0).

    Grid (column tiles, row splits). G (M, N) any strides, H and GR (M, R) fp32 with unit column
    stride; PART (splits, rows, R) fp32 with unit row stride R, every needed element written.
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
    b_du = tl.zeros((BLOCK_R,), dtype=tl.float32)                                            # [BR]
    row_lo = i_s.to(tl.int64) * rows_per_split
    for m0 in range(row_lo, min(row_lo + rows_per_split, M), BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < M
        m_mr = m_m[:, None] & m_r[None, :]
        b_h = tl.load(H + o_m[:, None] * stride_hm + o_r[None, :], mask=m_mr, other=0.0)      # [BM, BR]
        if NEED_P:
            p_g = G + o_m[:, None] * stride_gm + o_n[None, :] * stride_gn
            b_g = tl.load(p_g, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)   # [BM, BN]
            b_p = tl.dot(tl.trans(b_g), b_h * b_su[None, :], b_p, input_precision=SMALL_PREC)
        if NEED_DU:
            if i_n == 0:
                b_gr = tl.load(GR + o_m[:, None] * stride_grm + o_r[None, :], mask=m_mr, other=0.0)
                b_du += tl.sum(b_gr * b_h, axis=0)
    p_part = PART + i_s.to(tl.int64) * stride_ps
    if NEED_P:
        tl.store(p_part + o_n[:, None] * R + o_r[None, :], b_p, mask=m_n[:, None] & m_r[None, :])
    if NEED_DU:
        if i_n == 0:
            tl.store(p_part + du_row * R + o_r, b_du * scaling, mask=m_r)


def grad_up(G: torch.Tensor, h: torch.Tensor, g: Optional[torch.Tensor], u: Optional[torch.Tensor],
            v: Optional[torch.Tensor], B: torch.Tensor, scaling: float, need_db: bool, need_dv: bool,
            need_du: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dB (N, r) in B's dtype, dv (N,) in v's, du (r,) in u's; None where not needed) from G (M, N)
    any strides, h (M, r) fp32 and g (M, r) fp32 (needed for du only), both with unit column stride."""
    M, N = G.shape
    r = B.shape[1]
    need_p = need_db or need_dv
    r_block, block_m, block_n, warps = reduction_tiles(r)
    small_prec = precisions(G.dtype)["SMALL_PREC"]
    if small_prec == "ieee" and not kernels_interpreted():
        block_m = 32  # the IEEE fp32 dot of a 64-row tile spills on sm_90 (bench/results/compile/)
    n_tiles = max(1, cdiv(N, block_n)) if need_p else 1  # at least tile 0: it writes du (N = 0 too)
    part_rows = (N if need_p else 0) + (1 if need_du else 0)
    splits, rows = row_splits(M, block_m, n_tiles, 4 * part_rows * r, G.device)
    part = torch.empty((splits, part_rows, r), device=G.device, dtype=torch.float32)
    du_row = part_rows - 1 if need_du else -1
    _grad_up_kernel[(n_tiles, splits)](
        G, h, g if g is not None else h, vec(u, h), part,
        M, N, r, rows, du_row,
        G.stride(0), G.stride(1), h.stride(0), g.stride(0) if g is not None else 0, part.stride(0),
        float(scaling),
        NEED_P=need_p, NEED_DU=need_du, HAS_U=u is not None, SMALL_PREC=small_prec,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=r_block, num_warps=warps,
    )
    return grad_up_finish(part, B, v, u, du_row, need_db, need_dv, need_du)
