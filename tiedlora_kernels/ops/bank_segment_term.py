"""The rank-r term of a batch in which every row has its own adapter, when the adapters have their own
A and/or B (SGMV-style: rows grouped by adapter into segments, each segment's factors gathered once
per tile). The base GEMM stays on cuBLAS (``L.addmm_(x, W^T)``), as for one adapter.

    rows sorted by slot (a stable sort of the sequences; nothing is copied: the kernel reads the rows
    of x through the permutation and writes OUT's rows in place)
    per segment of rows with slot a:   OUT = ((X A[a]^T) * U[a]) B[a]^T * V[a] + b
    slot -1 (base model only):         OUT = b, x not read
    A (S, R, K) per slot or (R, K) shared (slot stride 0), B (S, N, R) or (N, R); U (S, R), V (S, N)

The plan (``segment_plan``) is made on the host from the ids, once per sequence length and tile
height (``AdapterRows`` keeps it for the forwards of one ``AdapterBank.use`` context: the prefill
and every decode step reuse theirs): a permutation of the rows and a list of tiles, each at most
BLOCK_M rows of one segment. One upload of four int32 arrays; no sort on the device, no host sync
per call.

Bytes: X read once (rows gathered: each row is a contiguous K-vector), OUT written once, and each
segment's A[a], B[a] read once from DRAM (re-read from L2 by the segment's other tiles): beyond one
adapter's traffic, (distinct adapters in the batch) x R (K + N) x factor bytes. At M = 32768
(256 sequences x 128 tokens), 256 distinct adapters, K = N = 2048, R = 16, bf16 factors: 32 MiB on
top of 256 MiB. In decode (one row per sequence) those factor reads dominate: 256 distinct adapters
read 32 MiB per 2048 x 2048 layer against the 8 MiB of its weight, the price of per-user factors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .adapter_term import _tiles
from .common import (block_r, column_splits, down_project, kernels_interpreted, launch_options, precisions,
                     store_with_bias, up_project, vec, wide_dot)


@triton.jit
def _bank_segment_term_kernel(
    X, A, B, U, V, PERM, TILE_SLOT, TILE_LO, TILE_HI, BIAS, OUT,
    N, K, R, cols_per_split,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_bs, stride_bn, stride_br,
    stride_us, stride_ur, stride_vs, stride_vn, stride_om, stride_on,
    HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr,
    WIDE_DOT: tl.constexpr, UPCAST: tl.constexpr, MAIN_PREC: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Tile t = rows PERM[TILE_LO[t] : TILE_HI[t]] (at most BLOCK_M, one slot a = TILE_SLOT[t]):
    OUT[rows, cols] = ((X[rows] A[a]^T * U[a]) B[a]^T) * V[a] + BIAS, or BIAS (0) when a = -1.
    Grid (tiles, column splits).

    X (M, K), OUT (M, N): any strides. A (S, R, K), B (S, N, R) with any strides (stride_as /
    stride_bs = 0: one factor shared by every slot). U (S, R), V (S, N) any strides; BIAS (N,) unit
    stride. PERM, TILE_*: int32. WIDE_DOT: h's dot in fp32 operands (16-bit X, A of another dtype).
    """
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    slot = tl.load(TILE_SLOT + i_t)
    p_lo = tl.load(TILE_LO + i_t)
    p_hi = tl.load(TILE_HI + i_t)
    o_p = p_lo + tl.arange(0, BLOCK_M)
    m_m = o_p < p_hi
    o_m = tl.load(PERM + o_p, mask=m_m, other=0).to(tl.int64)                                  # [BM] rows of x
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_r = o_r < R
    live = slot >= 0
    o_a = tl.maximum(slot, 0).to(tl.int64)

    b_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)                                        # [BM, BR]
    if live:  # base-only rows never read x
        b_h = down_project(X, A + o_a * stride_as, X, o_m, m_m, o_r, m_r, K, stride_xm, stride_xk, stride_ak, stride_ar,
                           0, 0.0, 1.0, False, False, WIDE_DOT, UPCAST, MAIN_PREC, SMALL_PREC, BLOCK_M, BLOCK_K, BLOCK_R)
    b_u = tl.load(U + o_a * stride_us + o_r * stride_ur, mask=m_r, other=0.0).to(tl.float32)      # [BR]
    # Set, not multiplied, to 0 off the rank and on base-only tiles (0 * inf = NaN).
    b_z = tl.where(m_r[None, :] & live, b_h * b_u[None, :], 0.0)                                 # [BM, BR]
    n_lo = i_s.to(tl.int64) * cols_per_split
    for n0 in range(n_lo, min(n_lo + cols_per_split, N), BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        if live:
            b_out = up_project(b_z, B + o_a * stride_bs, o_r, m_r, o_n, m_n, stride_br, stride_bn, SMALL_PREC)
            if HAS_V:
                b_v = tl.load(V + o_a * stride_vs + o_n * stride_vn, mask=m_n, other=0.0).to(tl.float32)
                b_out = b_out * b_v[None, :]
        else:  # base-only rows read no factor (slot 0's, non-finite say, would reach OUT through 0 * x)
            b_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        store_with_bias(OUT, BIAS, b_out, o_m, m_m, o_n, m_n, stride_om, stride_on, HAS_BIAS)


class SegmentPlan(NamedTuple):
    """Rows grouped by adapter slot, as the segment kernel walks them (device tensors, int32).

    ``perm`` (M,): the rows of x, grouped by slot (sequences in a stable order within a slot);
    ``tile_slot``, ``tile_lo``, ``tile_hi`` (tiles,): each tile's slot and its range of ``perm``
    (at most ``block_m`` rows, never two slots). ``slots`` and ``bounds`` (host lists): each
    segment's slot and its range ``perm[bounds[i]:bounds[i + 1]]`` (the torch route's loop)."""

    perm: torch.Tensor
    tile_slot: torch.Tensor
    tile_lo: torch.Tensor
    tile_hi: torch.Tensor
    block_m: int
    slots: list
    bounds: list


def segment_block_m(rows: int, segments: int) -> int:
    """Tile height for ``rows`` rows in ``segments`` segments: 16 (the smallest dot) when segments are
    short (decode: one row per sequence), up to 64 for long ones (prefill: a sequence per segment)."""
    mean = rows / max(segments, 1)
    if kernels_interpreted():  # the interpreter's cost is per program: few, large blocks
        return 16 if mean <= 16 else 32
    return 16 if mean <= 16 else (32 if mean <= 32 else 64)


def segment_plan(ids: torch.Tensor, rows_per_id: int, device: torch.device,
                 block_m: Optional[int] = None) -> SegmentPlan:
    """The plan of ``ids`` (sequences,) on the host (CPU int tensor; -1 = base model only), each id
    covering ``rows_per_id`` consecutive rows. ``block_m`` None: :func:`segment_block_m`."""
    ids = ids.to("cpu", torch.int64).reshape(-1)
    T = int(rows_per_id)
    order = torch.argsort(ids, stable=True)
    slots, counts = torch.unique_consecutive(ids[order], return_counts=True)
    bm = block_m or segment_block_m(ids.numel() * T, slots.numel())
    perm = (order[:, None] * T + torch.arange(T)[None, :]).reshape(-1)
    seg_rows = counts * T
    seg_lo = torch.cumsum(seg_rows, 0) - seg_rows
    n_tiles = (seg_rows + bm - 1) // bm
    tile_seg = torch.repeat_interleave(torch.arange(slots.numel()), n_tiles)
    tile_first = torch.cumsum(n_tiles, 0) - n_tiles
    tile_lo = seg_lo[tile_seg] + (torch.arange(tile_seg.numel()) - tile_first[tile_seg]) * bm
    tile_hi = torch.minimum(tile_lo + bm, (seg_lo + seg_rows)[tile_seg])
    packed = torch.cat([perm, slots[tile_seg], tile_lo, tile_hi]).to(torch.int32).to(device)  # one upload
    M, n = perm.numel(), tile_seg.numel()
    bounds = [0] + torch.cumsum(seg_rows, 0).tolist()
    return SegmentPlan(packed[:M], packed[M:M + n], packed[M + n:M + 2 * n], packed[M + 2 * n:], bm, slots.tolist(),
                       bounds)


def bank_segment_term(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, V: Optional[torch.Tensor],
                      plan: SegmentPlan, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """OUT (M, N) in x's dtype: each row's adapter term, with each slot's own factors, plus the bias.

    Args:
        x: (M, K) any strides; M = ``plan.perm.numel()``.
        A: (S, R, K) per slot or (R, K) shared; B: (S, N, R) per slot or (N, R) shared. Any strides
            and float dtype (A is cast to x's dtype for the dot, except fp32 A on fp16 x: an fp32
            dot; B read in fp32).
        U: (S, R) each slot's s * u; V: (S, N) or None (all 1). Any strides.
        plan: :func:`segment_plan` of the batch's ids (slots validated by the caller).
        bias: (N,) or None.

    Returns:
        (M, N) tensor; ``out.addmm_(x, W.t())`` then gives the layer's output.
    """
    M, K = x.shape
    N, R = B.shape[-2:]
    r_block = block_r(R)
    cfg = _tiles(M, r_block, x.device)  # its own tile height: plan.block_m
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    tiles = plan.tile_slot.numel()
    if M == 0 or tiles == 0:
        return out
    splits, cols_per_split = column_splits(tiles, N, cfg.block_n, x.device)
    a_s, a_r, a_k = (A.stride() if A.dim() == 3 else (0, *A.stride()))
    b_s, b_n, b_r = (B.stride() if B.dim() == 3 else (0, *B.stride()))
    _bank_segment_term_kernel[(tiles, splits)](
        x, A, B, U, V if V is not None else U, plan.perm, plan.tile_slot, plan.tile_lo, plan.tile_hi,
        vec(bias, x), out,
        N, K, R, cols_per_split,
        x.stride(0), x.stride(1), a_s, a_r, a_k, b_s, b_n, b_r, U.stride(0), U.stride(1),
        V.stride(0) if V is not None else 0, V.stride(1) if V is not None else 0,
        out.stride(0), out.stride(1),
        HAS_V=V is not None, HAS_BIAS=bias is not None,
        WIDE_DOT=wide_dot(x, A),
        **precisions(x.dtype), BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=r_block,
        **launch_options(cfg.num_warps),
    )
    return out
