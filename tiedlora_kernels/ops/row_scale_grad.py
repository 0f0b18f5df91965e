"""The row scale's backward (DoRA / Simple DoRA magnitude c, out = c * y + b): one pass over G (and
the saved pre-scale output y) gives G * c, the gradient every other term is taken from, and dc =
sum_rows(G * y) as split-row fp32 partials (deterministic, no atomics).

Bytes: G read once, G * c written once, y read once when c trains: at M = 8192, N = 4096, bf16,
192 MiB, 42 us at 4.8 TB/s.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import cdiv, launch_options, reduction_tiles, row_splits, vec


@triton.jit
def _row_scale_grad_kernel(
    G, Y, C, GS, DC_PART,
    M, N, rows_per_split,
    stride_gm, stride_gn, stride_ym,
    NEED_GS: tl.constexpr, NEED_DC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """GS = G * C and/or row-split partials of dC = sum_rows(G * Y), from one pass over G (and Y).

    Grid (column tiles, row splits). G (M, N) any strides; Y (M, N) with row stride stride_ym and
    unit column stride; GS (M, N) contiguous in G's dtype; DC_PART (splits, N) fp32, every element written.
    """
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_c = tl.load(C + o_n, mask=m_n, other=0.0).to(tl.float32)                               # [BN]
    b_dc = tl.zeros((BLOCK_N,), dtype=tl.float32)                                            # [BN]
    row_lo = i_s.to(tl.int64) * rows_per_split
    for m0 in range(row_lo, min(row_lo + rows_per_split, M), BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mn = (o_m < M)[:, None] & m_n[None, :]
        b_g = tl.load(G + o_m[:, None] * stride_gm + o_n[None, :] * stride_gn, mask=m_mn, other=0.0).to(tl.float32)
        if NEED_GS:
            tl.store(GS + o_m[:, None] * N + o_n[None, :], (b_g * b_c[None, :]).to(GS.dtype.element_ty), mask=m_mn)
        if NEED_DC:
            b_y = tl.load(Y + o_m[:, None] * stride_ym + o_n[None, :], mask=m_mn, other=0.0).to(tl.float32)
            b_dc += tl.sum(b_g * b_y, axis=0)
    if NEED_DC:
        tl.store(DC_PART + i_s.to(tl.int64) * N + o_n, b_dc, mask=m_n)


def row_scale_grad(G: torch.Tensor, y: Optional[torch.Tensor], c: torch.Tensor, need_gs: bool, need_dc: bool
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(G * c (M, N) contiguous in G's dtype or None, dc (N,) fp32 or None) from G (M, N) any strides
    and y (M, N) row-major (the saved pre-scale output; needed only for dc)."""
    M, N = G.shape
    _, block_m, block_n, warps = reduction_tiles(1)
    n_tiles = cdiv(N, block_n)
    splits, rows = row_splits(M, block_m, n_tiles, 4 * N, G.device)
    gs = torch.empty((M, N), device=G.device, dtype=G.dtype) if need_gs else None
    dc_part = torch.empty((splits, N), device=G.device, dtype=torch.float32) if need_dc else None
    _row_scale_grad_kernel[(n_tiles, splits)](
        G, y if need_dc else G, vec(c, G), gs if need_gs else G, dc_part if need_dc else G,
        M, N, rows, G.stride(0), G.stride(1), y.stride(0) if need_dc else 0,
        NEED_GS=need_gs, NEED_DC=need_dc, BLOCK_M=block_m, BLOCK_N=block_n, **launch_options(warps),
    )
    return gs, (dc_part.sum(0) if need_dc else None)
