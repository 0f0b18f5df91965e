"""The whole adapted layer for a few rows (decode) in one launch: the base GEMV and the rank-r term
in one pass over the base weight, where the general path takes two launches (``adapter_term``, then
cuBLAS's ``addmm_``) and, at M = 1, spends more time issuing them than the GPU spends running them.

    h   = x A^T                                        (M, R) fp32, accumulated with x W^T
    out = c * (x W^T + s ((h * u) B^T) * v) + b         (M, N) in x's dtype, rounded once

Grid (column tiles, row blocks): each program streams BLOCK_N rows of W (the compulsory bytes) and
all of A alongside (re-read from L2 by every program), so h is complete when its K loop ends and
the up projection needs no second pass. Bytes at M = 1, K = N = 4096, bf16 W, fp32 A, r = 16:
W 33.6 MB once (7.0 us at 4.8 TB/s, 10.0 us at 3.35 TB/s); A 0.26 MB from L2 per program (128
programs: 34 MB of L2 reads, ~3 us at ~10 TB/s, overlapped with W's stream); x, B, u, v, b, c and
out are small. The base GEMV alone measured 19 us on the H200 under do_bench (cold L2) and the
general path's ``_adapter_term_kernel`` 9.6 us on top (bench/NOTES.md section 3).

No h is kept and no dropout drawn: ``tied_lora_linear`` takes it for at most ``FUSED_DECODE_MAX_ROWS``
rows when its forward keeps nothing for a backward (inference; or only x and A train, whose
gradients need x alone). That is 0, so the dispatch does not use this kernel yet: issue 12
asks for thresholds that a GPU measured, and none has (``python -m bench.tile_sweep`` times it
against the two-launch path and the base layer alone; the next GPU session sets the value).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import common
from .common import (block_r, cdiv, down_dot, kernels_interpreted, launch_options, mma, precisions, store_with_bias,
                     up_project, vec, wide_dot)

#: The most rows the dispatch sends here (0: never, until a GPU measurement shows where it wins).
FUSED_DECODE_MAX_ROWS = 0


@triton.jit
def _decode_linear_kernel(
    X, W, A, B, U, V, BIAS, C, OUT,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_om, stride_on,
    scaling,
    HAS_U: tl.constexpr, HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr,
    WIDE_DOT: tl.constexpr, UPCAST: tl.constexpr, MAIN_PREC: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """OUT[rows, cols] = C * (X W^T + s ((X A^T * U) B^T) * V) + BIAS for this program's column tile
    and row block. X (M, K), W (N, K), A (R, K), B (N, R), OUT (M, N): any strides; U (R,), V, BIAS,
    C (N,): unit stride. The base dot in X's dtype with an fp32 accumulator (as cuBLAS); h's with
    the down projection's rule (``down_dot``)."""
    i_n = tl.program_id(0)
    i_m = tl.program_id(1)
    o_m = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_m = o_m < M
    m_n = o_n < N
    m_r = o_r < R

    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)                                       # x W^T
    b_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)                                         # x A^T
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        b_x = tl.load(X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)                                # [BM, BK]
        b_wt = tl.load(W + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn,
                       mask=m_k[:, None] & m_n[None, :], other=0.0)                               # [BK, BN]
        b_acc = mma(b_x, b_wt, b_acc, UPCAST, MAIN_PREC)
        b_at = tl.load(A + o_k[:, None] * stride_ak + o_r[None, :] * stride_ar,
                       mask=m_k[:, None] & m_r[None, :], other=0.0)                               # [BK, BR]
        b_h = down_dot(b_x, b_at, b_h, WIDE_DOT, UPCAST, MAIN_PREC, SMALL_PREC)

    # z = s * h * u, the padded rank columns set to 0 (0 * an inf of x would be NaN)
    b_z = tl.where(m_r[None, :], b_h, 0.0) * scaling
    if HAS_U:
        b_z = b_z * tl.load(U + o_r, mask=m_r, other=0.0).to(tl.float32)[None, :]
    b_out = up_project(b_z, B, o_r, m_r, o_n, m_n, stride_br, stride_bn, SMALL_PREC)             # [BM, BN]
    if HAS_V:
        b_out = b_out * tl.load(V + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    b_out += b_acc
    if HAS_C:
        b_out = b_out * tl.load(C + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    store_with_bias(OUT, BIAS, b_out, o_m, m_m, o_n, m_n, stride_om, stride_on, HAS_BIAS)


class DecodeTiles(NamedTuple):
    """A launch configuration of ``_decode_linear_kernel`` (``num_stages`` None: Triton's default)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: Optional[int] = None


def _decode_tiles(M: int, N: int, r_block: int, device: torch.device) -> DecodeTiles:
    """Column tiles narrow enough that the tiles alone fill the device (32 columns: 128 programs at
    N = 4096 on 132 SMs); K steps long enough for ~16 KiB of W per pipeline stage, shorter at large
    rank, where the [BK, BR] tile of A grows. A prediction, timed by ``bench.tile_sweep``."""
    if kernels_interpreted():  # the interpreter's cost is per program: few, large blocks
        return DecodeTiles(16, 32, 32, 4)
    sms = common.target_programs(device) // 2
    block_n = 64 if cdiv(N, 64) >= sms else 32
    block_k = max(32, min(256 if block_n == 32 else 128, 4096 // r_block))
    return DecodeTiles(16 if M <= 16 else 32, block_n, block_k, 4)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                  B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                  row_scale: Optional[torch.Tensor], scaling: float,
                  tiles: Optional[DecodeTiles] = None) -> torch.Tensor:
    """out (M, N) in x's dtype: the adapted layer's forward without dropout (see the module docstring).

    Args:
        x: (M, K) any strides. weight: (N, K) any strides, x's dtype (HF ``Conv1D``'s ``weight.t()``
            is read in place). bias: (N,) or None.
        A: (r, K); B: (N, r); u: (r,) or None; v: (N,) or None: fp32 or x's dtype, any strides.
        row_scale: c (N,) or None: out = c * (x W^T + adapter) + b. scaling: s.
        tiles: the launch configuration; None (every caller but ``bench.tile_sweep``): by shape.
    """
    M, K = x.shape
    N, R = B.shape
    r_block = block_r(R)
    cfg = tiles or _decode_tiles(M, N, r_block, x.device)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    _decode_linear_kernel[(cdiv(N, cfg.block_n), cdiv(M, cfg.block_m))](
        x, weight, A, B, vec(u, x), vec(v, x), vec(bias, x), vec(row_scale, x), out,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        float(scaling),
        HAS_U=u is not None, HAS_V=v is not None, HAS_BIAS=bias is not None, HAS_C=row_scale is not None,
        WIDE_DOT=wide_dot(x, A), **precisions(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=r_block,
        **launch_options(cfg.num_warps, cfg.num_stages),
    )
    return out
