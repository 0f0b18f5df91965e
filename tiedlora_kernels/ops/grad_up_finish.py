"""The last step of ``grad_up``: sum its row-split fp32 partials and write dB, dv and du in their
parameters' dtypes, in one launch (torch would take a sum, two products, a row sum and up to
three casts; in a host-bound training step each small launch costs as much as this whole pass).

    P = sum_splits PART[:, :N],  dB = P * v[:, None],  dv = rowsum(B * P),  du = sum_splits PART[:, du_row]

Bytes: the partials (splits x (N + 1) x r fp32, a few MiB at most) and B once; dB, dv, du written
once. Deterministic: the splits are summed in order.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import block_r, cdiv, vec


@triton.jit
def _grad_up_finish_kernel(
    PART, B, V, DB, DV, DU,
    N, R, splits, du_row,
    stride_ps, stride_bn, stride_br,
    NEED_DB: tl.constexpr, NEED_DV: tl.constexpr, NEED_DU: tl.constexpr, HAS_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (row tiles of P,). PART (splits, rows, R) fp32 with row stride R; B (N, R) any strides;
    V (N,) unit stride; DB (N, R) contiguous, DV (N,), DU (R,): written in their own dtypes. Tile 0
    also writes DU."""
    i_n = tl.program_id(0)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_n = o_n < N
    m_r = o_r < R
    m_nr = m_n[:, None] & m_r[None, :]
    if NEED_DB or NEED_DV:
        b_p = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)                                 # [BN, BR]
        for i_s in range(0, splits):
            b_p += tl.load(PART + i_s * stride_ps + o_n[:, None] * R + o_r[None, :], mask=m_nr, other=0.0)
        if NEED_DB:
            b_db = b_p
            if HAS_V:
                b_db = b_p * tl.load(V + o_n, mask=m_n, other=0.0).to(tl.float32)[:, None]
            tl.store(DB + o_n[:, None] * R + o_r[None, :], b_db.to(DB.dtype.element_ty), mask=m_nr)
        if NEED_DV:
            b_b = tl.load(B + o_n[:, None] * stride_bn + o_r[None, :] * stride_br, mask=m_nr,
                          other=0.0).to(tl.float32)
            tl.store(DV + o_n, tl.sum(b_b * b_p, axis=1).to(DV.dtype.element_ty), mask=m_n)
    if NEED_DU:
        if i_n == 0:
            b_du = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for i_s in range(0, splits):
                b_du += tl.load(PART + i_s * stride_ps + du_row * R + o_r, mask=m_r, other=0.0)
            tl.store(DU + o_r, b_du.to(DU.dtype.element_ty), mask=m_r)


def grad_up_finish(part: torch.Tensor, B: torch.Tensor, v: Optional[torch.Tensor], u: Optional[torch.Tensor],
                   du_row: int, need_db: bool, need_dv: bool,
                   need_du: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dB (N, r) in B's dtype, dv (N,) in v's, du (r,) in u's; None where not needed) from the
    partials ``part`` (splits, rows, r) fp32 contiguous of ``grad_up``."""
    N, r = B.shape
    r_block = block_r(r)
    block_n = max(16, min(128, 4096 // r_block))
    need_p = need_db or need_dv
    db = torch.empty((N, r), device=B.device, dtype=B.dtype) if need_db else None
    dv = torch.empty((N,), device=B.device, dtype=v.dtype) if need_dv else None
    du = torch.empty((r,), device=B.device, dtype=u.dtype) if need_du else None
    placeholder = part
    _grad_up_finish_kernel[(max(1, cdiv(N, block_n)) if need_p else 1,)](  # tile 0 writes du
        part, B, vec(v, placeholder), db if need_db else placeholder, dv if need_dv else placeholder,
        du if need_du else placeholder,
        N, r, part.shape[0], du_row,
        part.stride(0), B.stride(0), B.stride(1),
        NEED_DB=need_db, NEED_DV=need_dv, NEED_DU=need_du, HAS_V=v is not None,
        BLOCK_N=block_n, BLOCK_R=r_block, num_warps=4,
    )
    return db, dv, du
