"""The last step of the adapter's gradient pass (``grad_factors``): sum the row-split fp32 partials
and write dA, dB, dv and du in their parameters' dtypes, in one launch (torch would take two sums,
two products, a row sum and up to four casts; in a host-bound training step each small launch
costs as much as this whole pass).

    dA = sum_splits DA_PART
    P = sum_splits PART[:, :N],  dB = P * v[:, None],  dv = rowsum(B * P),  du = sum_splits PART[:, du_row]

Programs [0, p_programs) own row tiles of P (and program 0 du), the next ones K tiles of dA.
Bytes: the partials (a few splits x (N + 1 + K) x r fp32, a few MiB at most) and B once; the
gradients written once. Deterministic: the splits are summed in order.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import block_r, cdiv, launch_options, vec


@triton.jit
def _grad_finish_kernel(
    PART, DA_PART, B, V, DA, DB, DV, DU,
    N, K, R, p_splits, a_splits, du_row, p_programs,
    stride_ps, stride_bn, stride_br,
    NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, NEED_DV: tl.constexpr, NEED_DU: tl.constexpr,
    HAS_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (p_programs + K tiles of dA,). PART (p_splits, rows, R) fp32 with row stride R;
    DA_PART (a_splits, R, K) fp32 contiguous; B (N, R) any strides; V (N,) unit stride; DA (R, K)
    and DB (N, R) contiguous, DV (N,), DU (R,): written in their own dtypes."""
    pid = tl.program_id(0)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_r = o_r < R
    if pid < p_programs:
        o_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        m_nr = m_n[:, None] & m_r[None, :]
        if NEED_DB or NEED_DV:
            b_p = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)                             # [BN, BR]
            for i_s in range(0, p_splits):
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
            if pid == 0:
                b_du = tl.zeros((BLOCK_R,), dtype=tl.float32)
                for i_s in range(0, p_splits):
                    b_du += tl.load(PART + i_s * stride_ps + du_row * R + o_r, mask=m_r, other=0.0)
                tl.store(DU + o_r, b_du.to(DU.dtype.element_ty), mask=m_r)
    else:
        if NEED_DA:
            o_k = (pid - p_programs).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
            m_rk = m_r[:, None] & (o_k < K)[None, :]
            b_da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)                            # [BR, BK]
            for i_s in range(0, a_splits):
                b_da += tl.load(DA_PART + i_s * R * K + o_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.0)
            tl.store(DA + o_r[:, None] * K + o_k[None, :], b_da.to(DA.dtype.element_ty), mask=m_rk)


def grad_finish(part: Optional[torch.Tensor], da_part: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
                u: Optional[torch.Tensor], v: Optional[torch.Tensor], du_row: int, need_da: bool, need_db: bool,
                need_dv: bool, need_du: bool) -> tuple[Optional[torch.Tensor], ...]:
    """(dA (r, K) in A's dtype, dB (N, r) in B's, dv (N,) in v's, du (r,) in u's; None where not
    needed) from ``grad_factors``' partials: ``part`` (splits, rows, r) fp32 contiguous (None when
    neither dB, dv nor du is needed) and ``da_part`` (splits, r, K) fp32 contiguous (None unless dA)."""
    (r, K), N = A.shape, B.shape[0]
    r_block = block_r(r)
    block_n = max(16, min(128, 4096 // r_block))
    block_k = max(16, min(128, 4096 // r_block))
    need_p = need_db or need_dv
    p_programs = max(1, cdiv(N, block_n)) if need_p else (1 if need_du else 0)  # program 0 writes du
    a_programs = cdiv(K, block_k) if need_da else 0
    empty = lambda shape, like, need: torch.empty(shape, device=B.device, dtype=like.dtype) if need else None  # noqa: E731
    da, db, dv, du = (empty((r, K), A, need_da), empty((N, r), B, need_db), empty((N,), v, need_dv),
                      empty((r,), u, need_du))
    if p_programs + a_programs == 0:
        return da, db, dv, du
    placeholder = part if part is not None else da_part
    _grad_finish_kernel[(p_programs + a_programs,)](
        part if part is not None else placeholder, da_part if da_part is not None else placeholder,
        B, vec(v, placeholder), *(t if t is not None else placeholder for t in (da, db, dv, du)),
        N, K, r, part.shape[0] if part is not None else 0, da_part.shape[0] if da_part is not None else 0, du_row,
        p_programs,
        part.stride(0) if part is not None else 0, B.stride(0), B.stride(1),
        NEED_DA=need_da, NEED_DB=need_db, NEED_DV=need_dv, NEED_DU=need_du, HAS_V=v is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=r_block, **launch_options(4),
    )
    return da, db, dv, du
