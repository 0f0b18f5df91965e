"""Triton kernels for the tied low-rank adapted linear layer, its autograd, and its torch.library op.

Formula (SPEC.md, names as there), for x flattened to (M, K):

    x_d = x * keep / (1 - p)                   (M, K)   keep from Philox(seed, m * K + k), p = 0: x_d = x
    h   = x_d A^T                              (M, r)
    z   = s * h * u                            (M, r)
    out = x W^T + b + (z B^T) * v              (M, N)
    with a row scale c (N,): y = x W^T + (z B^T) * v, out = y * c + b (DoRA / Simple DoRA's
    magnitude, applied in the epilogue of either path; y is also stored when c trains)

Forward, three paths (``TIEDLORA_FWD_PATH=fused|epilogue|prepass|auto``, see :func:`choose_forward_path`):

- ``fused`` (``_tied_lora_fwd_kernel``): one Triton GEMM over x W^T (grouped program order, fp32
  accumulator). While a program streams its x tiles along K it also accumulates h for its row
  block; the epilogue adds z B^T * v and the bias to the accumulator; one store. Traffic: x read
  once per N-tile column (as any GEMM), W once per row block, out written once, h (M, r) written
  once (by the programs with pid_n == 0). Extra work: every N tile recomputes h, r / BLOCK_N more
  tensor-core flops (12% at r = 16, BLOCK_N = 128).
- ``epilogue`` (cuBLAS + ``_tied_lora_epilogue_kernel``): ``F.linear`` computes x W^T + b, then one
  kernel per (row block, column split) computes h (a skinny pass over x) and adds z B^T * v into
  out in place. Traffic beyond cuBLAS: x read once more per column split, out read and written once
  more. No redundant flops; one launch beyond the base GEMM/GEMV, hence the decode path (M <= 64).
- ``prepass`` (the epilogue kernel in h-only mode, then ``_tied_lora_fwd_kernel`` with ``H_GIVEN``):
  h = x_d A^T in one skinny pass over x (the dropout mask drawn once per element), then a GEMM
  whose main loop is plain x W^T and whose epilogue reads h. Traffic beyond a GEMM: x read once
  more, h (M, r) written and read; no per-N-tile recompute of h, out written once. Written to be
  measured against the other two (bench/NOTES.md, item 2); ``auto`` does not pick it yet.

Backward, G = dL/dout (M, N), v B = diag(v) B, g = (G * v) B (M, r), gh = s * g * u:

- dx = G W + (gh A) * keep / (1 - p) has the forward's shape with (x, W, A, B, u, v) replaced by
  (G, W^T, (v B)^T, A^T, u, None) and the dropout mask moved to the output columns: the same two
  kernels compute it, and the fused one stores g (its "h") from the same pass over G (one-pass
  idea: g costs no extra read of G). When x is frozen but g is needed (A or u trains), the
  epilogue kernel runs in "h only" mode: one skinny pass over G.
- dB = (G v)^T z and dv = sum_rows(G * (z B^T)) (``_tied_lora_bwd_db_dv_kernel``): one more pass
  over G, grid (column tiles, row splits), fp32 partials (splits, N, r) summed by torch:
  a deterministic two-stage reduction, no atomics.
- dA = gh^T x_d (``_tied_lora_bwd_da_kernel``): one pass over x, the dropout mask recomputed from
  (seed, m * K + k), grid (K tiles, row splits), same two-stage fp32 reduction.
- du = s * sum_rows(g * h): an (M, r) reduction in torch.
- With a row scale, ``_row_scale_bwd_kernel`` first makes one pass over G (and y): it writes
  G * c, the gradient of y that every step above then uses in place of G, and the split-row
  partials of dc = sum_rows(G * y). (Scaling G inside the GEMM's main loop instead would save that
  M x N write and read; not done before a GPU measurement says it pays.)

Saved for backward: h (M, r) fp32 only when B, u or v trains; x only when A trains (nothing of
size M x K is kept when A is frozen); y (M, N) only when a row scale trains; the frozen weight,
A, B, u, v (parameters: no copies); the dropout seed (one int64), never the mask. Nothing is
saved under no_grad. Only the needed gradients are computed; frozen tensors
launch nothing and allocate nothing. All accumulation is fp32; gradients are returned in each
parameter's dtype.

Precision. The main-loop dots (x W^T, x_d A^T, G W, G (v B)) run in the activation dtype with fp32
accumulators: bf16/fp16 on tensor cores, fp32 with ``input_precision="ieee"`` (matches the fp32
reference to ~1e-6; TF32 is used only when torch's fp32 matmul setting allows it (:func:`tf32_allowed`), as
for cuBLAS). The small rank-r dots (z B^T, dB, dv, dA) take fp32 operands (TF32 tensor cores for
16-bit activations, where they cost < 1% of the GEMM). Under ``TRITON_INTERPRET=1`` bf16 operands
are upcast to fp32 before ``tl.dot`` (the interpreter's bf16 dot returns garbage in triton 3.6 and
3.9); on a GPU they stay bf16.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import triton_interpreting

FWD_PATHS = ("auto", "fused", "epilogue", "prepass")
#: Rows at or below which the forward is cuBLAS + one epilogue launch (decode).
DECODE_ROWS = 64
#: Largest padded rank the fused GEMM takes in ``auto`` mode: beyond it the [BLOCK_M, R] h
#: accumulator and the per-N-tile recompute of h cost more than the epilogue path's extra traffic.
FUSED_MAX_RANK = 32


# Kernels


@triton.jit
def _keep(seed, o_row, o_col, n_cols, p_drop):
    """Philox keep-mask of elements (row, col) of a row-major (.., n_cols) tensor (True = kept)."""
    o_elem = o_row[:, None] * n_cols + o_col[None, :]  # int64: no wrap for M * K >= 2^31
    return tl.rand(seed, o_elem) >= p_drop


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with an fp32 accumulator; UPCAST casts both operands to fp32 first (interpreter bf16)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _h_update(b_h, b_x, A, o_m, o_k, o_r, m_k, m_r, stride_ak, stride_ar, seed, keep_scale, K, p_drop,
              X_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, MAIN_PREC: tl.constexpr):
    """One K tile of h = X_d A^T: b_h [BM, BR] + x_d [BM, BK] @ A^T [BK, BR]."""
    p_at = A + o_k[:, None] * stride_ak + o_r[None, :] * stride_ar
    b_at = tl.load(p_at, mask=m_k[:, None] & m_r[None, :], other=0.0).to(b_x.dtype)          # [BK, BR]
    if X_DROPOUT:
        b_keep = _keep(seed, o_m, o_k, K, p_drop)
        b_x = tl.where(b_keep, b_x.to(tl.float32) * keep_scale, 0.0).to(b_x.dtype)
    return _mma(b_x, b_at, b_h, UPCAST, MAIN_PREC)


@triton.jit
def _z_of_h(b_h, U, o_r, m_r, scaling, HAS_U: tl.constexpr):
    """z = s * h * u [BM, BR] fp32. Padded rank columns are 0 * x, NaN where x holds an inf: they
    are zeroed so they cannot reach the output."""
    b_z = tl.where(m_r[None, :], b_h, 0.0) * scaling
    if HAS_U:
        b_z = b_z * tl.load(U + o_r, mask=m_r, other=0.0).to(tl.float32)[None, :]
    return b_z


@triton.jit
def _delta_tile(b_z, B, V, o_m, o_n, o_r, m_n, m_r, stride_br, stride_bn, seed, keep_scale, N, p_drop,
                HAS_V: tl.constexpr, OUT_DROPOUT: tl.constexpr, SMALL_PREC: tl.constexpr):
    """The adapter term of columns o_n: (z B^T) * v [* keep / (1 - p)], [BM, BN] fp32."""
    p_bt = B + o_r[:, None] * stride_br + o_n[None, :] * stride_bn
    b_bt = tl.load(p_bt, mask=m_r[:, None] & m_n[None, :], other=0.0).to(tl.float32)             # [BR, BN]
    b_delta = tl.dot(b_z, b_bt, input_precision=SMALL_PREC)                                       # [BM, BN]
    if HAS_V:
        b_delta = b_delta * tl.load(V + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if OUT_DROPOUT:
        b_delta = tl.where(_keep(seed, o_m, o_n, N, p_drop), b_delta * keep_scale, 0.0)
    return b_delta


@triton.jit
def _scale_bias_tile(b_y, BIAS, C, Y, o_out, o_n, m_n, m_out, HAS_BIAS: tl.constexpr,
                     HAS_ROW_SCALE: tl.constexpr, STORE_Y: tl.constexpr):
    """The output tile y * c + b from the fp32 pre-scale tile y [BM, BN]; y itself is stored to Y at
    offsets o_out when STORE_Y (rounded to Y's dtype, as the unfused ``y * c`` would have saved it)."""
    if HAS_ROW_SCALE:
        if STORE_Y:
            tl.store(Y + o_out, b_y.to(Y.dtype.element_ty), mask=m_out)
        b_y = b_y * tl.load(C + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b_y += tl.load(BIAS + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    return b_y


@triton.jit
def _tied_lora_fwd_kernel(
    X, W, BIAS, A, B, U, V, C, OUT, Y, H, SEED,
    M, N, K, R, ROWS_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_om, stride_on, stride_hm,
    scaling, p_drop,
    HAS_BIAS: tl.constexpr, HAS_U: tl.constexpr, HAS_V: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    X_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr, STORE_H: tl.constexpr, STORE_Y: tl.constexpr,
    H_GIVEN: tl.constexpr,
    UPCAST: tl.constexpr, MAIN_PREC: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """OUT = Y * C + BIAS, Y = X W^T + s * ((X_d A^T * U) B^T) * V [* keep / (1 - p) on OUT's columns].

    X (M, K), W (N, K), A (R, K), B (N, R), OUT (M, N): any strides. U (R,), V (N,), C (N,), BIAS (N,)
    contiguous; without HAS_ROW_SCALE, C = 1. Y (M, N), OUT's strides, receives the pre-scale
    output when STORE_Y (the row scale's gradient needs it). H (M, R) fp32 receives X_d A^T from
    the programs of the first column tile; with H_GIVEN it holds h already (the ``prepass`` path)
    and the main loop is a plain GEMM (A and dropout unused).
    X_DROPOUT drops X's elements (m, k) in the adapter input; OUT_DROPOUT drops the adapter term's
    elements (m, n) (the dX use). ROWS_BUCKET is only an autotune key.
    """
    i_pid = tl.program_id(0)
    n_pid_m = tl.cdiv(M, BLOCK_M)
    n_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the column tiles together, so W tiles are reused from L2.
    n_group = GROUP_M * n_pid_n
    i_m0 = (i_pid // n_group) * GROUP_M
    group_rows = min(n_pid_m - i_m0, GROUP_M)
    i_m = i_m0 + (i_pid % n_group) % group_rows
    i_n = (i_pid % n_group) // group_rows

    o_m = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_m = o_m < M
    m_n = o_n < N
    m_r = o_r < R
    seed = tl.load(SEED) if (X_DROPOUT or OUT_DROPOUT) else 0
    keep_scale = 1.0 / (1.0 - p_drop)

    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    b_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)    # [BM, BR]
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        p_x = X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)                      # [BM, BK]
        p_wt = W + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn
        b_wt = tl.load(p_wt, mask=m_k[:, None] & m_n[None, :], other=0.0)                     # [BK, BN]
        b_acc = _mma(b_x, b_wt, b_acc, UPCAST, MAIN_PREC)
        if not H_GIVEN:
            b_h = _h_update(b_h, b_x, A, o_m, o_k, o_r, m_k, m_r, stride_ak, stride_ar, seed, keep_scale, K, p_drop,
                            X_DROPOUT, UPCAST, MAIN_PREC)
    p_h = H + o_m[:, None] * stride_hm + o_r[None, :]
    if H_GIVEN:
        b_h = tl.load(p_h, mask=m_m[:, None] & m_r[None, :], other=0.0)
    elif STORE_H:
        if i_n == 0:
            tl.store(p_h, b_h, mask=m_m[:, None] & m_r[None, :])
    b_z = _z_of_h(b_h, U, o_r, m_r, scaling, HAS_U)                                          # [BM, BR]
    b_acc += _delta_tile(b_z, B, V, o_m, o_n, o_r, m_n, m_r, stride_br, stride_bn, seed, keep_scale, N, p_drop,
                         HAS_V, OUT_DROPOUT, SMALL_PREC)
    o_out = o_m[:, None] * stride_om + o_n[None, :] * stride_on
    b_out = _scale_bias_tile(b_acc, BIAS, C, Y, o_out, o_n, m_n, m_m[:, None] & m_n[None, :],
                             HAS_BIAS, HAS_ROW_SCALE, STORE_Y)
    tl.store(OUT + o_out, b_out.to(OUT.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _tied_lora_epilogue_kernel(
    X, BIAS, A, B, U, V, C, OUT, Y, H, SEED,
    M, N, K, R, cols_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_om, stride_on, stride_hm,
    scaling, p_drop,
    HAS_BIAS: tl.constexpr, HAS_U: tl.constexpr, HAS_V: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    X_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr,
    STORE_H: tl.constexpr, STORE_Y: tl.constexpr, UPDATE_OUT: tl.constexpr,
    UPCAST: tl.constexpr, MAIN_PREC: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """In place OUT[:, cols] += s * ((X_d A^T * U) B^T) * V [* keep / (1 - p)], cols = this split's range;
    with HAS_ROW_SCALE, OUT[:, cols] = (OUT + that) * C + BIAS, the pre-scale value stored to Y
    (OUT's strides) when STORE_Y. HAS_BIAS only with HAS_ROW_SCALE (else cuBLAS added the bias).

    Grid (row blocks, column splits); each split recomputes h for its row block (a skinny pass over
    X: cheap, and it keeps this a single launch). H (M, R) fp32 receives h from split 0.
    UPDATE_OUT=False only stores h (the backward's g when x is frozen).
    """
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_m = o_m < M
    m_r = o_r < R
    seed = tl.load(SEED) if (X_DROPOUT or OUT_DROPOUT) else 0
    keep_scale = 1.0 / (1.0 - p_drop)

    b_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [BM, BR]
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        p_x = X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)                      # [BM, BK]
        b_h = _h_update(b_h, b_x, A, o_m, o_k, o_r, m_k, m_r, stride_ak, stride_ar, seed, keep_scale, K, p_drop,
                        X_DROPOUT, UPCAST, MAIN_PREC)
    if STORE_H:
        if i_s == 0:
            tl.store(H + o_m[:, None] * stride_hm + o_r[None, :], b_h, mask=m_m[:, None] & m_r[None, :])
    if UPDATE_OUT:
        b_z = _z_of_h(b_h, U, o_r, m_r, scaling, HAS_U)                                      # [BM, BR]
        n_lo = i_s.to(tl.int64) * cols_per_split
        for n0 in range(n_lo, min(n_lo + cols_per_split, N), BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            m_n = o_n < N
            b_delta = _delta_tile(b_z, B, V, o_m, o_n, o_r, m_n, m_r, stride_br, stride_bn, seed, keep_scale, N,
                                  p_drop, HAS_V, OUT_DROPOUT, SMALL_PREC)                    # [BM, BN]
            o_out = o_m[:, None] * stride_om + o_n[None, :] * stride_on
            m_out = m_m[:, None] & m_n[None, :]
            b_out = tl.load(OUT + o_out, mask=m_out, other=0.0).to(tl.float32) + b_delta
            b_out = _scale_bias_tile(b_out, BIAS, C, Y, o_out, o_n, m_n, m_out, HAS_BIAS, HAS_ROW_SCALE, STORE_Y)
            tl.store(OUT + o_out, b_out.to(OUT.dtype.element_ty), mask=m_out)


@triton.jit
def _tied_lora_bwd_db_dv_kernel(
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


@triton.jit
def _tied_lora_bwd_da_kernel(
    X, GR, U, DA_PART, SEED,
    M, K, R, rows_per_split,
    stride_xm, stride_xk, stride_gm,
    scaling, p_drop,
    HAS_U: tl.constexpr, X_DROPOUT: tl.constexpr, SMALL_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Row-split partials of dA = (s * g * U)^T X_d; the dropout mask is recomputed from SEED.

    Grid (K tiles, row splits). X (M, K) any strides, GR = g (M, R) fp32; DA_PART (splits, R, K)
    fp32 contiguous, every element written.
    """
    i_k = tl.program_id(0)
    i_s = tl.program_id(1)
    o_k = i_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_k = o_k < K
    m_r = o_r < R
    if X_DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - p_drop)
    b_su = tl.zeros((BLOCK_R,), dtype=tl.float32) + scaling                                  # [BR]
    if HAS_U:
        b_su = b_su * tl.load(U + o_r, mask=m_r, other=0.0).to(tl.float32)
    b_da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)                                    # [BR, BK]
    row_lo = i_s.to(tl.int64) * rows_per_split
    for m0 in range(row_lo, min(row_lo + rows_per_split, M), BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < M
        p_x = X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0).to(tl.float32)      # [BM, BK]
        if X_DROPOUT:
            b_x = tl.where(_keep(seed, o_m, o_k, K, p_drop), b_x * keep_scale, 0.0)
        p_g = GR + o_m[:, None] * stride_gm + o_r[None, :]
        b_gh = tl.load(p_g, mask=m_m[:, None] & m_r[None, :], other=0.0) * b_su[None, :]     # [BM, BR]
        b_da = tl.dot(tl.trans(b_gh), b_x, b_da, input_precision=SMALL_PREC)
    p_da = DA_PART + i_s.to(tl.int64) * R * K + o_r[:, None] * K + o_k[None, :]
    tl.store(p_da, b_da, mask=m_r[:, None] & m_k[None, :])


@triton.jit
def _row_scale_bwd_kernel(
    G, Y, C, GS, DC_PART,
    M, N, rows_per_split,
    stride_gm, stride_gn, stride_ym,
    NEED_GS: tl.constexpr, NEED_DC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """GS = G * C (the gradient reaching the pre-scale output) and/or row-split partials of
    dC = sum_rows(G * Y), from one pass over G (and Y).

    Grid (column tiles, row splits). G (M, N) any strides; Y (M, N) row-major with row stride
    stride_ym; GS (M, N) contiguous in G's dtype; DC_PART (splits, N) fp32, every element written.
    """
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_c = tl.load(C + o_n, mask=m_n, other=0.0).to(tl.float32)                                 # [BN]
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


@triton.jit
def _dropout_keep_kernel(SEED, KEEP, M, K, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """KEEP (M, K) int8 contiguous: 1 where the kernels keep x[m, k] for this seed, else 0."""
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    b_keep = _keep(tl.load(SEED), o_m, o_k, K, p_drop)
    tl.store(KEEP + o_m[:, None] * K + o_k[None, :], b_keep.to(tl.int8), mask=(o_m < M)[:, None] & (o_k < K)[None, :])


# Launch configuration


def _block_r(r: int) -> int:
    """Padded rank: a power of two, at least 16 (the smallest tl.dot dimension on tensor cores)."""
    return max(16, triton.next_power_of_2(r))


def _rows_bucket(M: int) -> int:
    """Row count bucketed for autotune keys, so each batch size does not retune."""
    return min(triton.next_power_of_2(max(M, 1)), 8192)


#: GPU tiles of the fused GEMM (the last one fits shared memory even at r = 256 with fp32 inputs).
FUSED_GPU_CONFIGS = [
    triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), num_warps=4, num_stages=4),
]


def _fused_configs() -> list:
    if triton_interpreting():  # the interpreter's cost is per program: few, large blocks
        return [triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4), num_warps=4)]
    return FUSED_GPU_CONFIGS


#: fp32 accumulator registers per thread (acc [BM, BN] + h [BM, BR]) above which ptxas spills on
#: sm_90, measured with ``python -m bench.compile_report`` (bench/results/compile/). h accumulated
#: in the main loop: 96 compiles without spills, 128 (64 x 128 tile, r = 128, 4 warps) spills
#: 270-500 bytes. h only read in the epilogue (``H_GIVEN``): 128 compiles clean (one dX variant:
#: 32 bytes), 192 (128 x 64, r = 128, 4 warps) spills 400 bytes.
MAX_ACC_REGS_PER_THREAD = {False: 96, True: 128}


def _prune_fused_configs(configs, named_args, **kwargs):
    """Drop tiles whose fp32 accumulators would spill at this rank (see MAX_ACC_REGS_PER_THREAD)."""
    block_r = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    limit = MAX_ACC_REGS_PER_THREAD[bool(kwargs.get("H_GIVEN", named_args.get("H_GIVEN", False)))]
    acc_regs = lambda c: c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + block_r) / (32 * c.num_warps)  # noqa: E731
    kept = [c for c in configs if acc_regs(c) <= limit]
    return kept or [min(configs, key=acc_regs)]


_tied_lora_fwd_tuned = triton.autotune(
    # The constexprs that change the main loop are part of the key: each variant is tuned on its own.
    configs=_fused_configs(), key=["ROWS_BUCKET", "N", "K", "R", "H_GIVEN", "X_DROPOUT", "OUT_DROPOUT", "MAIN_PREC"],
    prune_configs_by={"early_config_prune": _prune_fused_configs},
)(_tied_lora_fwd_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs that fill the device twice over (1 under the interpreter: programs run serially)."""
    if triton_interpreting() or device.type != "cuda":
        return 1
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _row_splits(M: int, block_m: int, other_programs: int, bytes_per_split: int, device) -> tuple[int, int]:
    """(splits, rows per split) of a two-stage row reduction: enough programs to fill the device,
    no more splits than row blocks, and at most 256 MiB of fp32 partials."""
    n_blocks = triton.cdiv(M, block_m)
    splits = max(1, min(n_blocks, _target_programs(device) // max(other_programs, 1),
                        (256 << 20) // max(bytes_per_split, 1)))
    rows = triton.cdiv(n_blocks, splits) * block_m
    return triton.cdiv(M, rows), rows


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32: ``torch.backends.cuda.matmul.fp32_precision``
    (torch >= 2.9, "none" inheriting ``torch.backends.fp32_precision``), else the legacy
    ``torch.get_float32_matmul_precision()``. Torch >= 2.9 refuses the legacy getter once the new
    setting has been used, so the new one is read first."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:
        return torch.get_float32_matmul_precision() != "highest"
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _precisions(act_dtype: torch.dtype) -> dict:
    """constexpr dot settings: UPCAST bf16 under the interpreter; IEEE fp32 unless torch allows TF32."""
    interp = triton_interpreting()
    if interp:
        return dict(UPCAST=act_dtype == torch.bfloat16, MAIN_PREC="ieee", SMALL_PREC="ieee")
    if act_dtype == torch.float32:
        prec = "tf32" if tf32_allowed() else "ieee"
        return dict(UPCAST=False, MAIN_PREC=prec, SMALL_PREC=prec)
    return dict(UPCAST=False, MAIN_PREC="tf32", SMALL_PREC="tf32")  # MAIN_PREC is moot for 16-bit operands


def choose_forward_path(M: int, r: int, x_dropout: bool = False, dtype: torch.dtype = torch.bfloat16) -> str:
    """``fused`` or ``epilogue`` for an (M, K) x (K, N) product with rank r and activations of ``dtype``.

    ``TIEDLORA_FWD_PATH`` (``fused``, ``epilogue``, ``prepass`` or ``auto``, read at each call) forces a path.
    ``auto``: ``epilogue`` for decode (M <= 64: cuBLAS GEMV + one launch), for ranks above 32
    (the fused kernel's h accumulator and its per-N-tile recompute of h, r / BLOCK_N extra flops,
    outweigh the epilogue path's extra read of x and read/write of out), with dropout on x
    (every N tile of the fused GEMM would redraw the Philox mask of its x tiles: M K N / BLOCK_N
    draws on CUDA cores instead of M K once per column split), and for fp32 without TF32 (no
    tensor cores: the fused GEMM's IEEE fp32 dot spills ~13 KB per thread on sm_90, per the compile
    report, where cuBLAS has a tuned SIMT kernel); ``fused`` otherwise.
    Unmeasured on a GPU so far: the benchmark (both paths side by side) should revise these cut-offs.
    """
    want = os.environ.get("TIEDLORA_FWD_PATH", "auto").strip().lower() or "auto"
    if want not in FWD_PATHS:
        raise ValueError(f"TIEDLORA_FWD_PATH must be one of {FWD_PATHS}, got {want!r}")
    if want != "auto":
        return want
    ieee_fp32 = dtype == torch.float32 and not tf32_allowed()
    return "epilogue" if M <= DECODE_ROWS or r > FUSED_MAX_RANK or x_dropout or ieee_fp32 else "fused"


# Launchers


def _vec(t: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """A (n,) vector argument as the kernels read it (unit stride: a strided u, v or bias is copied,
    n elements at most), or a placeholder pointer that a False HAS_* flag keeps unread."""
    return t.contiguous() if t is not None else placeholder


def _adapted_matmul(x, w_nk, bias, a_rk, b_nr, u, v, scaling, p_drop, seed, *, x_dropout, out_dropout,
                    store_h, path, row_scale=None, store_y=False):
    """out (M, N) = c * y + bias, y = x w_nk^T + s * ((x_d a_rk^T * u) b_nr^T) * v [* keep / (1 - p)].

    Every matrix is a 2-D view with arbitrary strides: x (M, K), w_nk (N, K), a_rk (r, K),
    b_nr (N, r); u (r,), v (N,), bias (N,), row_scale c (N,) any stride, or None (c = 1). Serves
    the forward and, with transposed views, dX. Returns (out in x's dtype, h = x_d a_rk^T (M, r)
    fp32 or None, y (M, N) in x's dtype when ``store_y`` (only with a row scale) or None).
    """
    M, K = x.shape
    N, r = b_nr.shape
    prepass = path == "prepass"
    h = torch.empty((M, r), device=x.device, dtype=torch.float32) if store_h or prepass else None
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_y and row_scale is not None else None
    if prepass:  # h = x_d a_rk^T first (one skinny pass over x), then a plain GEMM that reads it
        _adapter_epilogue(x, a_rk, b_nr, None, None, scaling, p_drop, seed, out=None, h=h, x_dropout=x_dropout,
                          out_dropout=False)
    if path in ("fused", "prepass"):
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _tied_lora_fwd_tuned[grid](
            x, w_nk, _vec(bias, x), a_rk, b_nr, _vec(u, x), _vec(v, x), _vec(row_scale, x),
            out, y if y is not None else out, h if h is not None else x, seed if seed is not None else x,
            M, N, K, r, _rows_bucket(M),
            x.stride(0), x.stride(1), w_nk.stride(0), w_nk.stride(1), a_rk.stride(0), a_rk.stride(1),
            b_nr.stride(0), b_nr.stride(1), out.stride(0), out.stride(1), h.stride(0) if h is not None else 0,
            float(scaling), float(p_drop),
            HAS_BIAS=bias is not None, HAS_U=u is not None, HAS_V=v is not None, HAS_ROW_SCALE=row_scale is not None,
            X_DROPOUT=x_dropout and not prepass, OUT_DROPOUT=out_dropout, STORE_H=store_h and not prepass,
            STORE_Y=y is not None, H_GIVEN=prepass, BLOCK_R=_block_r(r), **_precisions(x.dtype),
        )
        return out, (h if store_h else None), y
    # cuBLAS base product; the adapter term (then the row scale and the bias) is applied in place
    out = F.linear(x, w_nk, bias if row_scale is None else None)
    _adapter_epilogue(x, a_rk, b_nr, u, v, scaling, p_drop, seed, out=out, h=h, x_dropout=x_dropout,
                      out_dropout=out_dropout, row_scale=row_scale, bias=bias if row_scale is not None else None, y=y)
    return out, h, y


def _adapter_epilogue(x, a_rk, b_nr, u, v, scaling, p_drop, seed, *, out, h, x_dropout, out_dropout,
                      row_scale=None, bias=None, y=None):
    """out += s * ((x_d a_rk^T * u) b_nr^T) * v in place (when ``out`` is given), then, with a
    ``row_scale`` c, out = c * out + bias, the pre-scale value written to ``y`` (when given);
    h = x_d a_rk^T into ``h`` (when given). x (M, K), a_rk (r, K), b_nr (N, r), out (M, N): any
    strides; y (M, N) with out's strides (both contiguous here)."""
    M, K = x.shape
    N, r = b_nr.shape
    block_r = _block_r(r)
    if triton_interpreting():
        block_m, block_n, block_k, warps = 32, 32, 32, 4
    else:
        block_m = 16 if M <= 16 else (32 if M <= 32 or block_r >= 128 else 64)
        block_n = 64 if block_r >= 128 else 128
        block_k, warps = 64, 8 if block_r >= 128 else 4
    n_pid_m = triton.cdiv(M, block_m)
    n_col_tiles = triton.cdiv(N, block_n)
    # Split the columns so decode (one row block) still fills the device; each split recomputes h.
    splits = 1 if out is None else max(1, min(n_col_tiles, _target_programs(x.device) // n_pid_m))
    cols_per_split = triton.cdiv(n_col_tiles, splits) * block_n
    splits = triton.cdiv(N, cols_per_split) if out is not None else 1
    _tied_lora_epilogue_kernel[(n_pid_m, splits)](
        x, _vec(bias, x), a_rk, b_nr, _vec(u, x), _vec(v, x), _vec(row_scale, x),
        out if out is not None else x, y if y is not None else x, h if h is not None else x,
        seed if seed is not None else x,
        M, N, K, r, cols_per_split,
        x.stride(0), x.stride(1), a_rk.stride(0), a_rk.stride(1), b_nr.stride(0), b_nr.stride(1),
        out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0,
        h.stride(0) if h is not None else 0,
        float(scaling), float(p_drop),
        HAS_BIAS=bias is not None, HAS_U=u is not None, HAS_V=v is not None, HAS_ROW_SCALE=row_scale is not None,
        X_DROPOUT=x_dropout, OUT_DROPOUT=out_dropout,
        STORE_H=h is not None, STORE_Y=y is not None, UPDATE_OUT=out is not None, **_precisions(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps,
    )


def _reduction_tiles(r: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_M, column block, num_warps) of the split-row gradient reductions (dB/dv over
    N columns, dA over K columns): narrower column tiles and 8 warps at large rank keep the
    [columns, BLOCK_R] fp32 accumulator in registers."""
    block_r = _block_r(r)
    interp = triton_interpreting()
    block_cols = 32 if interp or block_r >= 128 else 64
    return block_r, 32 if interp else 64, block_cols, 8 if block_r >= 128 else 4


def _db_dv(G, h, u, v, B, scaling, need_db, need_dv):
    """(dB (N, r) fp32 or None, dv (N,) fp32 or None) from one pass over G (M, N) and h (M, r) fp32."""
    M, N = G.shape
    r = B.shape[1]
    block_r, block_m, block_n, warps = _reduction_tiles(r)
    n_tiles = triton.cdiv(N, block_n)
    splits, rows = _row_splits(M, block_m, n_tiles, 4 * N * (r + 1), G.device)
    db_part = torch.empty((splits, N, r), device=G.device, dtype=torch.float32) if need_db else None
    dv_part = torch.empty((splits, N), device=G.device, dtype=torch.float32) if need_dv else None
    _tied_lora_bwd_db_dv_kernel[(n_tiles, splits)](
        G, h, _vec(u, h), _vec(v, h), B,
        db_part if need_db else h, dv_part if need_dv else h,
        M, N, r, rows,
        G.stride(0), G.stride(1), h.stride(0), B.stride(0), B.stride(1),
        float(scaling),
        HAS_U=u is not None, HAS_V=v is not None, NEED_DB=need_db, NEED_DV=need_dv,
        SMALL_PREC=_precisions(G.dtype)["SMALL_PREC"],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps,
    )
    return (db_part.sum(0) if need_db else None), (dv_part.sum(0) if need_dv else None)


def _da(x, g, u, scaling, p_drop, seed, x_dropout):
    """dA (r, K) fp32 = (s g u)^T x_d from one pass over x (M, K) and g (M, r) fp32."""
    M, K = x.shape
    r = g.shape[1]
    block_r, block_m, block_k, warps = _reduction_tiles(r)
    n_tiles = triton.cdiv(K, block_k)
    splits, rows = _row_splits(M, block_m, n_tiles, 4 * K * r, x.device)
    da_part = torch.empty((splits, r, K), device=x.device, dtype=torch.float32)
    _tied_lora_bwd_da_kernel[(n_tiles, splits)](
        x, g, _vec(u, g), da_part, seed if seed is not None else g,
        M, K, r, rows,
        x.stride(0), x.stride(1), g.stride(0),
        float(scaling), float(p_drop),
        HAS_U=u is not None, X_DROPOUT=x_dropout, SMALL_PREC=_precisions(x.dtype)["SMALL_PREC"],
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps,
    )
    return da_part.sum(0)


def _row_scale_grad(G, y, c, need_gs, need_dc):
    """(G * c (M, N) contiguous in G's dtype or None, dc (N,) fp32 = sum_rows(G * y) or None) from
    one pass over G (M, N) any strides and y (M, N) row-major (the saved pre-scale output)."""
    M, N = G.shape
    _, block_m, block_n, warps = _reduction_tiles(1)
    n_tiles = triton.cdiv(N, block_n)
    splits, rows = _row_splits(M, block_m, n_tiles, 4 * N, G.device)
    gs = torch.empty((M, N), device=G.device, dtype=G.dtype) if need_gs else None
    dc_part = torch.empty((splits, N), device=G.device, dtype=torch.float32) if need_dc else None
    _row_scale_bwd_kernel[(n_tiles, splits)](
        G, y if need_dc else G, _vec(c, G), gs if need_gs else G, dc_part if need_dc else G,
        M, N, rows, G.stride(0), G.stride(1), y.stride(0) if need_dc else 0,
        NEED_GS=need_gs, NEED_DC=need_dc, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return gs, (dc_part.sum(0) if need_dc else None)


def draw_dropout_seed(device) -> torch.Tensor:
    """One call's Philox seed, a (1,) int64 tensor drawn from torch's generator on ``device``
    (``torch.manual_seed`` reproduces it; no host sync)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def dropout_mask(seed: torch.Tensor, shape, p: float, device=None) -> torch.Tensor:
    """The keep-mask the kernels apply to x for ``seed``: bool (M, K), True = kept.

    Args:
        seed: (1,) int64 tensor, as from :func:`draw_dropout_seed`.
        shape: (M, K), x flattened to 2-D.
        p: dropout probability.
        device: defaults to ``seed.device``.
    """
    M, K = shape
    device = seed.device if device is None else torch.device(device)
    keep = torch.empty((M, K), device=device, dtype=torch.int8)
    if M * K:
        _dropout_keep_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](
            seed.to(device), keep, M, K, float(p), BLOCK_M=32, BLOCK_K=32)
    return keep.bool()


# The op: torch.library custom ops with a registered autograd formula (torch.compile sees no break)


def _require_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not triton_interpreting():
        raise RuntimeError(f"tied_lora_linear (triton): tensors must be on a CUDA device, got {t.device}; "
                           "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU interpreter, "
                           "or use TIEDLORA_BACKEND=torch")


def _forward_impl(x, weight, bias, A, B, u, v, row_scale, seed, scaling, dropout_p, store_h, store_y):
    """The forward op's body (any device the kernels can be launched for; see ``_forward_op``)."""
    M, r, N = x.shape[0], A.shape[0], weight.shape[0]
    if M == 0:
        return x.new_empty((0, N)), x.new_empty((0, r), dtype=torch.float32), x.new_empty((0, N))
    out, h, y = _adapted_matmul(x, weight, bias, A, B, u, v, scaling, dropout_p, seed, x_dropout=dropout_p > 0,
                                out_dropout=False, store_h=store_h, path=choose_forward_path(M, r, dropout_p > 0, x.dtype),
                                row_scale=row_scale, store_y=store_y)
    return (out, h if h is not None else x.new_empty((0, r), dtype=torch.float32),
            y if y is not None else x.new_empty((0, N)))


@torch.library.custom_op("tiedlora::tied_lora_linear_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                row_scale: Optional[torch.Tensor], seed: Optional[torch.Tensor], scaling: float, dropout_p: float,
                store_h: bool, store_y: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> (out (M, N) in x's dtype, h (M, r) fp32 or (0, r) unless ``store_h``, pre-scale
    y (M, N) in x's dtype or (0, N) unless ``store_y``)."""
    _require_device(x)
    return _forward_impl(x, weight, bias, A, B, u, v, row_scale, seed, scaling, dropout_p, store_h, store_y)


@_forward_op.register_fake
def _(x, weight, bias, A, B, u, v, row_scale, seed, scaling, dropout_p, store_h, store_y):
    M, r, N = x.shape[0], A.shape[0], weight.shape[0]
    return (x.new_empty((M, N)), x.new_empty((M if store_h else 0, r), dtype=torch.float32),
            x.new_empty((M if store_y and row_scale is not None else 0, N)))


def _backward_impl(G, x, weight, A, B, u, v, row_scale, h, y, seed, scaling, dropout_p, needs):
    """The backward op's body (any device the kernels can be launched for; see ``_backward_op``)."""
    need_x, need_a, need_b, need_u, need_v, need_c = needs
    M = G.shape[0]
    K = weight.shape[1]
    nothing = G.new_empty(0)
    if M == 0:  # empty batch: zero gradients, no launch
        zeros = lambda t, need: torch.zeros_like(t) if need else nothing.clone()  # noqa: E731
        return [G.new_zeros((0, K)) if need_x else nothing.clone(), zeros(A, need_a), zeros(B, need_b),
                zeros(u, need_u), zeros(v, need_v), zeros(row_scale, need_c)]
    dc = None
    if row_scale is not None:
        # out = c * y + b: one pass gives dL/dy = G * c, which every other gradient is taken from, and dc.
        G, dc = _row_scale_grad(G, y, row_scale, need_gs=any(needs[:5]), need_dc=need_c)
    r = A.shape[0]
    dropping = dropout_p > 0
    need_g = need_x or need_a or need_u
    dx = g = None
    if need_g:
        # g = (G v) B is the "h" of dx = G W + (s g u A) * keep / (1 - p): roles (G, W^T, (v B)^T, A^T).
        vb_t = (B.float() if v is None else B.float() * v.float()[:, None]).t()  # (r, N) fp32, N x r only
        if need_x:  # g is kept only for dA / du
            dx, g, _ = _adapted_matmul(G, weight.t(), None, vb_t, A.t(), u, None, scaling, dropout_p, seed,
                                    x_dropout=False, out_dropout=dropping, store_h=need_a or need_u,
                                    path=choose_forward_path(M, r, dtype=G.dtype))
        else:
            g = torch.empty((M, r), device=G.device, dtype=torch.float32)
            _adapter_epilogue(G, vb_t, A.t(), None, None, scaling, 0.0, None, out=None, h=g,
                              x_dropout=False, out_dropout=False)
    da = du = db = dv = None
    if need_a:
        da = _da(x, g, u, scaling, dropout_p, seed, dropping)
    if need_u:
        du = scaling * (g * h).sum(0)
    if need_b or need_v:
        db, dv = _db_dv(G, h, u, v, B, scaling, need_b, need_v)
    # Outputs of a custom op may not alias each other: each unneeded slot gets its own empty tensor.
    cast = lambda t, like: t.to(like.dtype) if t is not None else nothing.clone()  # noqa: E731
    return [dx if dx is not None else nothing.clone(), cast(da, A), cast(db, B), cast(du, u), cast(dv, v),
            cast(dc, row_scale)]


@torch.library.custom_op("tiedlora::tied_lora_linear_backward", mutates_args=())
def _backward_op(G: torch.Tensor, x: Optional[torch.Tensor], weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 u: Optional[torch.Tensor], v: Optional[torch.Tensor], row_scale: Optional[torch.Tensor],
                 h: Optional[torch.Tensor], y: Optional[torch.Tensor], seed: Optional[torch.Tensor], scaling: float,
                 dropout_p: float, needs: list[bool]) -> list[torch.Tensor]:
    """[dx (M, K), dA, dB, du, dv, dc] for ``needs`` = (x, A, B, u, v, row_scale); an unneeded one is
    a 0-element tensor.

    G (M, N) any strides; x (M, K) (None unless A trains); h (M, r) fp32 (None unless B, u or v
    trains); y (M, N) the pre-scale output (None unless the row scale trains).
    """
    _require_device(G)
    return _backward_impl(G, x, weight, A, B, u, v, row_scale, h, y, seed, scaling, dropout_p, needs)


@_backward_op.register_fake
def _(G, x, weight, A, B, u, v, row_scale, h, y, seed, scaling, dropout_p, needs):
    like = lambda t, need: t.new_empty(t.shape) if need else G.new_empty(0)  # noqa: E731
    return [G.new_empty((G.shape[0], weight.shape[1])) if needs[0] else G.new_empty(0),
            like(A, needs[1]), like(B, needs[2]), like(u, needs[3]), like(v, needs[4]), like(row_scale, needs[5])]


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, u, v, row_scale, seed, scaling, dropout_p, store_h, store_y = inputs
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.has_u, ctx.has_v, ctx.has_c = u is not None, v is not None, row_scale is not None
    # h and y are saved state, never used downstream: no zero-filled (M, N) gradient for y.
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    # x only feeds dA: with A frozen nothing of size M x K stays alive (h, (M, r), is kept instead);
    # y (M, N) only when the row scale trains (its gradient is sum_rows(G * y)).
    ctx.save_for_backward(x if A.requires_grad else None, weight, A, B, u, v, row_scale,
                          output[1] if store_h else None, output[2] if store_y else None, seed)


def _backward(ctx, grad_out, grad_h, grad_y):
    x, weight, A, B, u, v, row_scale, h, y, seed = ctx.saved_tensors
    ni = ctx.needs_input_grad
    needs = [ni[0], ni[3], ni[4], ctx.has_u and ni[5], ctx.has_v and ni[6], ctx.has_c and ni[7]]
    if grad_out is None or not any(needs):
        return (None,) * 13
    grads = _backward_op(grad_out, x, weight, A, B, u, v, row_scale, h, y, seed, ctx.scaling, ctx.dropout_p, needs)
    dx, da, db, du, dv, dc = (t if need else None for t, need in zip(grads, needs))
    return dx, None, None, da, db, du, dv, dc, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def tied_lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                            B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor], scaling: float,
                            dropout_p: float, training: bool, *, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton implementation of :func:`tiedlora_kernels.ops.tied_lora_linear` (inputs validated by it).

    Args:
        x: (..., K) fp32/bf16/fp16, any leading dims and strides (flattened with ``reshape``: a view
            whenever the leading dims merge, a copy otherwise; the kernels take any 2-D strides).
        weight: (N, K) frozen, x's dtype, any strides (HF ``Conv1D``'s ``weight.t()`` is read in place).
        bias: (N,) frozen or None.
        A: (r, K); B: (N, r); u: (r,) or None; v: (N,) or None: fp32 or x's dtype, trained or frozen.
        scaling: s. dropout_p: dropout on the adapter input, applied only when ``training``; the
            Philox seed is drawn from torch's generator (see :func:`draw_dropout_seed`).
        row_scale: c (N,) or None: out = c * (x W^T + adapter) + b, applied in the epilogue; when it
            trains, the pre-scale output (M, N) is kept for its gradient.

    Returns:
        (..., N) in x's dtype, differentiable in x, A, B, u, v, row_scale (whichever require grad).
    """
    _require_device(x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"tied_lora_linear (triton): {name} requires grad, but the kernels treat the base "
                             "layer as frozen; freeze it, or use TIEDLORA_BACKEND=torch to train it")
    p = float(dropout_p) if training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    seed = draw_dropout_seed(x.device) if p > 0 else None
    # Saved state only where a backward can follow (not under no_grad / inference_mode).
    grad = torch.is_grad_enabled()
    store_h = grad and (B.requires_grad or any(t is not None and t.requires_grad for t in (u, v)))
    store_y = grad and row_scale is not None and row_scale.requires_grad
    out, _, _ = _forward_op(x2, weight, bias, A, B, u, v, row_scale, seed, float(scaling), p, bool(store_h),
                            bool(store_y))
    return out.reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["tied_lora_linear_triton", "choose_forward_path", "dropout_mask", "draw_dropout_seed", "FWD_PATHS"]
