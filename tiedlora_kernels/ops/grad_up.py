"""dB, dv and du of the adapted linear layer from one pass over G. dB and dv come from one N x r
product, du from the rows of g and h the same programs read:

    P = G^T z,  z = s h u (M, r), h saved by the forward, g = G (B v) from the backward's adapter_term:
    dB = diag(v) P                    (dL/dB_nr = v_n sum_m G_mn z_mr)
    dv = rowsum(B * P)                (dL/dv_n = sum_m G_mn (z B^T)_mn = sum_r B_nr P_nr)
    du = s colsum(g * h)              (dL/du_r = s sum_m g_mr h_mr)

These tiles write row-split fp32 partials of P (and of du, one extra row); ``grad_finish`` sums
them and writes dB, dv and du in their parameters' dtypes. They run as one role of
``_grad_factors_kernel`` (grad_factors.py), in the same launch as the dA tiles: with the finish,
two launches for the four gradients, where torch would need a dozen small ones (sums, products,
row sums, casts), each costing a host-bound training step its issue time.

Why a second pass over G and not inside the backward's adapter_term pass: that pass runs one
program per row block, so it could only emit per-row-block partials of an N x r matrix
(M / BLOCK_M x N x r fp32: 32 MiB at M = 8192, N = 4096, r = 16, 256 MiB at r = 128), as many bytes
as G itself or more. Here a program owns a column tile for many rows and writes few partials.

One program per (column tile, row split); one column tile when only du is needed (then G is not
read). Deterministic, no atomics. Bytes: G once (M N), h once per column tile (M r fp32, from L2), g once
(M r fp32). At M = 8192, N = 4096, bf16: 64 MiB, 14 us at 4.8 TB/s.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grad_up_tile(
    G, H, GR, U, PART,
    M, N, R, rows_per_split, du_row,
    stride_gm, stride_gn, stride_hm, stride_grm, stride_ps,
    scaling, i_n, i_s,
    NEED_P: tl.constexpr, NEED_DU: tl.constexpr, HAS_U: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Column tile ``i_n``, row split ``i_s`` of P = G^T (s * H * U) (rows 0..N-1 of PART[i_s]) and,
    in column tile 0, of du = s * colsum(GR * H) (row ``du_row`` of PART[i_s]).

    G (M, N) any strides, H and GR (M, R) fp32 with unit column stride; PART (splits, rows, R) fp32
    with unit row stride R, every needed element written.
    """
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
            b_p = tl.dot(tl.trans(b_g), b_h, b_p, input_precision=SMALL_PREC)
        if NEED_DU:
            if i_n == 0:
                b_gr = tl.load(GR + o_m[:, None] * stride_grm + o_r[None, :], mask=m_mr, other=0.0)
                b_du += tl.sum(b_gr * b_h, axis=0)
    p_part = PART + i_s.to(tl.int64) * stride_ps
    if NEED_P:  # s u scales the sum (see grad_down: no 0 * inf in padded rows)
        tl.store(p_part + o_n[:, None] * R + o_r[None, :], b_p * b_su[None, :], mask=m_n[:, None] & m_r[None, :])
    if NEED_DU:
        if i_n == 0:
            tl.store(p_part + du_row * R + o_r, b_du * scaling, mask=m_r)

