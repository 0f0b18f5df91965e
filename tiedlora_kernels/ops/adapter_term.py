"""The rank-r term of an adapted linear layer, in one pass over its input: everything the layer does
besides the base GEMM, which cuBLAS then adds with ``addmm_`` (beta = 1) into the same buffer.

    h   = dropout(X) D^T                     (M, R) fp32      X (M, K), D (R, K)
    OUT = s * ((h * u) P^T) * v [* keep] + b [+ E] (M, N)     P (N, R), u (R,), v (N,), b (N,)

Forward (``adapter_term(x, A, B, ...)``): X = x, D = A, P = B; OUT = L, and then
``L.addmm_(x, W^T)`` is the layer's output; h is kept for backward when B, u or v trains. Over a
base layer that computes its own output (a quantized one), that output is the addend E: OUT is
then the layer's output, one read of E and one write of OUT beyond the pass over x.
Backward (dX): X = G (M, N), D = B^T (R, N) with its columns scaled by v (``down_scale``: B v is
never materialised), P = A^T (K, R), u = u, no v, the dropout mask
on OUT's columns: h = g = G (B * v) and OUT = s (g * u) A * keep / (1 - p), then
``Ldx.addmm_(G, W)`` is dX. One kernel serves both.

Bytes (one program per row block, columns split only when the row blocks alone cannot fill the
device, i.e. decode; each split recomputes h from its rows of X): X read once, OUT written once,
h written once (fp32, M x R), D and P read once per program from L2. At M = 8192, K = N = 4096,
bf16: 64 MiB + 64 MiB, 28 us at 4.8 TB/s (H200), 40 us at 3.35 TB/s (H100): bench/NOTES.md.
FLOPs: 2 M R (K + N), under 1 % of the base GEMM at R = 16.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import common
from .common import (block_r, cdiv, column_splits, down_project, keep_mask, kernels_interpreted, precisions,
                     store_with_bias, up_project, vec, wide_dot)


@triton.jit
def _adapter_term_kernel(
    X, D, DS, P, U, V, BIAS, E, OUT, H, SEED,
    M, N, K, R, cols_per_split,
    stride_xm, stride_xk, stride_dr, stride_dk, stride_pn, stride_pr, stride_em, stride_en, stride_om, stride_on,
    stride_hm,
    scaling, p_drop,
    HAS_U: tl.constexpr, HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADDEND: tl.constexpr,
    HAS_DSCALE: tl.constexpr, IN_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    WIDE_DOT: tl.constexpr, UPCAST: tl.constexpr, MAIN_PREC: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """OUT[:, cols] = s * ((X_d D^T * U) P^T) * V [* keep / (1 - p)] + BIAS [+ E], cols = this split's range;
    H = X_d D^T (fp32) from split 0 when STORE_H. Grid (row blocks, column splits).

    X (M, K), D (R, K), P (N, R), E and OUT (M, N), H (M, R): any strides. U (R,), V (N,), BIAS (N,) unit
    stride. IN_DROPOUT drops X's elements (m, k); OUT_DROPOUT drops OUT's elements (m, n) (the dX use).
    WRITE_OUT=False only stores H (the backward's g when x is frozen). WIDE_DOT: h's dot in fp32
    operands (TF32 on a GPU, 8 exponent bits) for 16-bit X with a D of another dtype; otherwise in X's dtype.
    """
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_m = o_m < M
    m_r = o_r < R
    seed = tl.load(SEED) if (IN_DROPOUT or OUT_DROPOUT) else 0
    keep_scale = 1.0 / (1.0 - p_drop)

    # h = X_d D^T, one pass over this program's rows of X.
    b_h = down_project(X, D, DS, o_m, m_m, o_r, m_r, K, stride_xm, stride_xk, stride_dk, stride_dr, seed, p_drop,
                       keep_scale, IN_DROPOUT, HAS_DSCALE, WIDE_DOT, UPCAST, MAIN_PREC, SMALL_PREC, BLOCK_M,
                       BLOCK_K, BLOCK_R)
    if STORE_H:
        if i_s == 0:
            tl.store(H + o_m[:, None] * stride_hm + o_r[None, :], b_h, mask=m_m[:, None] & m_r[None, :])
    if WRITE_OUT:
        # z = s * h * u; padded rank columns are 0 * x (NaN where x holds an inf): zeroed so they
        # cannot reach OUT.
        b_z = tl.where(m_r[None, :], b_h, 0.0) * scaling                                         # [BM, BR]
        if HAS_U:
            b_z = b_z * tl.load(U + o_r, mask=m_r, other=0.0).to(tl.float32)[None, :]
        n_lo = i_s.to(tl.int64) * cols_per_split
        for n0 in range(n_lo, min(n_lo + cols_per_split, N), BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            m_n = o_n < N
            b_out = up_project(b_z, P, o_r, m_r, o_n, m_n, stride_pr, stride_pn, SMALL_PREC)          # [BM, BN]
            if HAS_V:
                b_out = b_out * tl.load(V + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
            if OUT_DROPOUT:
                b_out = tl.where(keep_mask(seed, o_m, o_n, N, p_drop), b_out * keep_scale, 0.0)
            if HAS_ADDEND:
                b_out += tl.load(E + o_m[:, None] * stride_em + o_n[None, :] * stride_en,
                                 mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)
            store_with_bias(OUT, BIAS, b_out, o_m, m_m, o_n, m_n, stride_om, stride_on, HAS_BIAS)


class TermTiles(NamedTuple):
    """A launch configuration of ``_adapter_term_kernel`` (and of the serving banks' kernels, which
    share its schedule). ``num_stages`` None: Triton's default; ``splits`` None: :func:`column_splits`."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: Optional[int] = None
    splits: Optional[int] = None


def _tiles(M: int, r_block: int, device: torch.device, ieee_scaled: bool = False) -> TermTiles:
    """The configuration for M rows at padded rank ``r_block``, fixed by shape (no autotuning: a memory-bound pass
    whose floor is known; tests and training never pay for tuning). Rows per program shrink until
    the row blocks alone fill the device twice; the [BR, BN] tile of P shrinks at large rank so it
    stays in registers. BLOCK_K = 128 keeps ~8 KiB of x per pipeline stage in flight per program
    (2 programs x 3 stages per SM: ~6 MB in flight on 132 SMs, above the ~5 MB that 4.8 TB/s at ~1 us
    of latency needs; 64 above rank 64, where the [BK, BR] tile of D would take most of the shared
    memory; 64 too for the backward's IEEE fp32 dot with its column scale, whose 128-deep tile spills
    on sm_90, bench/results/compile/): a prediction, to be checked against the kernel's floor on a GPU
    (``python -m bench.tile_sweep`` times the alternatives)."""
    if kernels_interpreted():  # the interpreter's cost is per program: few, large blocks
        return TermTiles(32, 32, 32, 4)
    programs = common.target_programs(device)
    block_m = 64 if M >= 64 * programs else (32 if M >= 16 * programs else 16)
    block_n = max(32, min(128, 8192 // r_block))
    return TermTiles(block_m, block_n, 128 if r_block <= 64 and not ieee_scaled else 64, 8 if r_block >= 128 else 4)


def adapter_term(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, u: Optional[torch.Tensor],
                 v: Optional[torch.Tensor], bias: Optional[torch.Tensor], scaling: float, p_drop: float,
                 seed: Optional[torch.Tensor], *, in_dropout: bool, out_dropout: bool, store_h: bool,
                 write_out: bool = True, out_dtype: Optional[torch.dtype] = None,
                 addend: Optional[torch.Tensor] = None, down_scale: Optional[torch.Tensor] = None,
                 tiles: Optional[TermTiles] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(OUT (M, N) in ``out_dtype`` (default x's) or None, h (M, R) fp32 or None); see the module docstring.

    Args:
        x: (M, K) any strides. down: (R, K) any strides. up: (N, R) any strides.
        u: (R,) or None; v: (N,) or None; bias: (N,) or None (any strides; copied to unit stride).
        scaling: s. p_drop, seed: dropout probability and its (1,) int64 Philox seed (or None).
        in_dropout / out_dropout: drop x's elements, or OUT's (the dX use, mask of x's shape).
        store_h: return h. write_out: compute OUT (False: only h).
        addend: (M, N) any strides, added to OUT (a base layer's own output), or None.
        down_scale: (K,) or None: D's columns scaled by it (fp32 math), h = X (D diag(down_scale))^T.
        tiles: the launch configuration; None (every caller but ``bench.tile_sweep``): :func:`_tiles`.
    """
    M, K = x.shape
    N, R = up.shape
    r_block = block_r(R)
    prec = precisions(x.dtype)
    ieee_scaled = down_scale is not None and x.dtype == torch.float32 and prec["MAIN_PREC"] == "ieee"
    cfg = tiles or _tiles(M, r_block, x.device, ieee_scaled)
    out = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype) if write_out else None
    h = torch.empty((M, R), device=x.device, dtype=torch.float32) if store_h else None
    row_blocks = cdiv(M, cfg.block_m)
    # only h (write_out=False): one program per row block, no columns to split
    splits, cols_per_split = (column_splits(row_blocks, N, cfg.block_n, x.device, cfg.splits) if write_out
                              else (1, cfg.block_n))
    _adapter_term_kernel[(row_blocks, splits)](
        x, down, vec(down_scale, x), up, vec(u, x), vec(v, x), vec(bias, x), addend if addend is not None else x,
        out if out is not None else x, h if h is not None else x,
        seed if seed is not None else x,
        M, N, K, R, cols_per_split,
        x.stride(0), x.stride(1), down.stride(0), down.stride(1), up.stride(0), up.stride(1),
        addend.stride(0) if addend is not None else 0, addend.stride(1) if addend is not None else 0,
        out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0,
        h.stride(0) if h is not None else 0,
        float(scaling), float(p_drop),
        HAS_U=u is not None, HAS_V=v is not None, HAS_BIAS=bias is not None, HAS_ADDEND=addend is not None,
        HAS_DSCALE=down_scale is not None, IN_DROPOUT=in_dropout, OUT_DROPOUT=out_dropout, STORE_H=store_h, WRITE_OUT=write_out,
        WIDE_DOT=wide_dot(x, down, down_scale),
        **prec, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=r_block,
        **common.launch_options(cfg.num_warps, cfg.num_stages),
    )
    return out, h
