"""Fused Triton kernels for the adapted linear layer, and the op that autograd and torch.compile see.

    h   = x_d A^T                                   (M, r)   x_d = x * mask / (1 - p)
    out = x W^T + b + s * ((h * u) B^T) * v         (M, N)

Forward, two paths (``TIEDLORA_FWD_PATH=fused|epilogue|auto``):

- ``fused``: one Triton GEMM over x W^T that, while streaming the x tiles along K, also
  accumulates h for its row block; the epilogue adds s * ((h u) B^T) v and the bias to the fp32
  accumulator before the single store. x is read once, out written once. The price: every
  N-tile program recomputes h, r / BLOCK_N extra tensor-core work (12% at r = 16, BN = 128).
- ``epilogue``: cuBLAS computes x W^T + b, then one kernel per row block computes h (a skinny
  pass over x) and adds the rank-r update into out in place. Costs one more read of x and one
  read+write of out, but no redundant flops: the better choice for large r and for decode
  (M <= 64, where it is the only launch beside the cuBLAS GEMV).

Backward, for G = dL/dout (M, N). The same two kernels serve dX, because
dX = G W + (s g u) A with g = (G v) B has exactly the forward's shape with (x, W, A, B) replaced
by (G, W^T, (B v)^T, A^T): while the dX GEMM streams G it accumulates g, and the dropout mask
(recomputed from the Philox seed, never stored) multiplies the adapter term. Then:
- dB = (G v)^T z and dv = sum_rows(G * (z B^T)) from one more pass over G (z = s h u from the
  saved h), split over row chunks and reduced in fp32 without atomics (deterministic);
- dA = (s g u)^T x_d from one pass over x (mask recomputed), split the same way;
- du = s * sum_rows(g * h), an (M, r) reduction in torch.

Saved for backward: h (M, r, fp32) when B, u or v train; x only when A trains; the weight (a
view of the frozen parameter, not a copy). Frozen tensors cost nothing: their kernels are not
launched and nothing is allocated for them.

Precision: the base product runs on bf16/fp16 tensor cores (fp32 inputs: IEEE dots, no TF32,
so fp32 results match the reference to ~1e-6). The rank-r dots run in fp32 (TF32 tensor cores)
when the adapter is fp32, the default, and in the activation dtype otherwise.
Under ``TRITON_INTERPRET=1`` (CPU) bf16 operands of ``tl.dot`` are upcast to fp32 first:
triton 3.6/3.9's interpreter returns garbage for bf16 dots; on a GPU they stay bf16.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import triton_interpreting

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _keep_mask(seed, o_row, o_col, n_cols, p):
    """Philox keep-mask for elements (row, col) of a row-major (.., n_cols) tensor: True = kept."""
    offsets = (o_row[:, None] * n_cols + o_col[None, :]).to(tl.int32)
    return tl.rand(seed, offsets) >= p


@triton.jit
def _dot(a, b, TO_F32: tl.constexpr, PREC: tl.constexpr):
    """fp32-accumulated a @ b; with TO_F32 both operands are upcast first (PREC: "ieee" or "tf32")."""
    if TO_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _h_step(b_h, b_x, A, o_m, o_k, o_r, m_k, m_r, stride_ar, stride_ak, seed, K, p, keep_scale,
            IN_DROPOUT: tl.constexpr, ADAPTER_F32: tl.constexpr, PREC: tl.constexpr):
    """One K tile of h = x_d A^T: b_h [BM, BR] += x_d [BM, BK] @ A^T [BK, BR]."""
    b_a = tl.load(A + o_r[None, :] * stride_ar + o_k[:, None] * stride_ak,
                  mask=m_r[None, :] & m_k[:, None], other=0.0)                          # [BK, BR]
    if not ADAPTER_F32:
        b_a = b_a.to(b_x.dtype)
    if IN_DROPOUT:
        keep = _keep_mask(seed, o_m, o_k, K, p)
        b_x = tl.where(keep, b_x.to(tl.float32) * keep_scale, 0.0).to(b_x.dtype)
    return b_h + _dot(b_x, b_a, ADAPTER_F32, PREC)


@triton.jit
def _z_from_h(b_h, X, U, o_r, m_r, scaling, HAS_U: tl.constexpr, ADAPTER_F32: tl.constexpr):
    """z = s * h * u [BM, BR], in the dtype of the rank-r dot. Padded rank columns are zeroed:
    they hold inf * 0 = NaN when x has an inf, which must not reach the output."""
    b_z = tl.where(m_r[None, :], b_h, 0.0) * scaling
    if HAS_U:
        b_z *= tl.load(U + o_r, mask=m_r, other=0.0).to(tl.float32)[None, :]
    if not ADAPTER_F32:
        b_z = b_z.to(X.dtype.element_ty)
    return b_z


@triton.jit
def _delta_tile(b_z, X, B, V, o_m, o_n, o_r, m_n, m_r, stride_bn, stride_br, seed, N, p, keep_scale,
                HAS_V: tl.constexpr, OUT_MASK: tl.constexpr, ADAPTER_F32: tl.constexpr, PREC: tl.constexpr):
    """The rank-r term for columns o_n: (z B^T) * v [* mask / (1 - p)], [BM, BN] fp32."""
    b_bt = tl.load(B + o_n[None, :] * stride_bn + o_r[:, None] * stride_br,
                   mask=m_n[None, :] & m_r[:, None], other=0.0)                         # [BR, BN]
    if not ADAPTER_F32:
        b_bt = b_bt.to(X.dtype.element_ty)
    b_delta = _dot(b_z, b_bt, ADAPTER_F32, PREC)                                          # [BM, BN]
    if HAS_V:
        b_delta *= tl.load(V + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if OUT_MASK:
        keep = _keep_mask(seed, o_m, o_n, N, p)
        b_delta = tl.where(keep, b_delta * keep_scale, 0.0)
    return b_delta


@triton.jit
def _tied_lora_fused_kernel(
    X, W, BIAS, A, B, U, V, OUT, H, SEED,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_om, stride_on, stride_hm,
    scaling, p, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_U: tl.constexpr, HAS_V: tl.constexpr,
    IN_DROPOUT: tl.constexpr, OUT_MASK: tl.constexpr, WRITE_H: tl.constexpr,
    BASE_F32: tl.constexpr, ADAPTER_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = X W^T + bias + s * ((X_d A^T * u) B^T) * v [* mask/(1-p)], h = X_d A^T stored by pid_n == 0.

    X (M, K), W (N, K), A (R, K), B (N, R): any strides. Grouped ordering for L2 reuse of W.
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    i_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    i_n = (pid % (GROUP_M * n_n)) // size_m

    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_m = o_m < M
    m_n = o_n < N
    m_r = o_r < R
    seed = tl.load(SEED) if (IN_DROPOUT or OUT_MASK) else 0

    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    b_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)    # [BM, BR]
    for k0 in range(0, K, BLOCK_K):
        o_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        m_k = o_k < K
        b_x = tl.load(X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)                      # [BM, BK]
        b_w = tl.load(W + o_n[None, :] * stride_wn + o_k[:, None] * stride_wk,
                      mask=m_n[None, :] & m_k[:, None], other=0.0)                      # [BK, BN]
        b_acc += _dot(b_x, b_w, BASE_F32, PREC)
        b_h = _h_step(b_h, b_x, A, o_m, o_k, o_r, m_k, m_r, stride_ar, stride_ak, seed, K, p, keep_scale,
                      IN_DROPOUT, ADAPTER_F32, PREC)
    if WRITE_H:
        if i_n == 0:
            tl.store(H + o_m[:, None] * stride_hm + o_r[None, :], b_h, mask=m_m[:, None] & m_r[None, :])
    b_z = _z_from_h(b_h, X, U, o_r, m_r, scaling, HAS_U, ADAPTER_F32)                    # [BM, BR]
    b_acc += _delta_tile(b_z, X, B, V, o_m, o_n, o_r, m_n, m_r, stride_bn, stride_br, seed, N, p, keep_scale,
                         HAS_V, OUT_MASK, ADAPTER_F32, PREC)
    if HAS_BIAS:
        b_acc += tl.load(BIAS + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + o_m[:, None] * stride_om + o_n[None, :] * stride_on, b_acc.to(OUT.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _tied_lora_epilogue_kernel(
    X, A, B, U, V, OUT, H, SEED,
    M, N, K, R, n_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_om, stride_on, stride_hm,
    scaling, p, keep_scale,
    HAS_U: tl.constexpr, HAS_V: tl.constexpr, IN_DROPOUT: tl.constexpr, OUT_MASK: tl.constexpr,
    WRITE_H: tl.constexpr, WRITE_OUT: tl.constexpr, BASE_F32: tl.constexpr, ADAPTER_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """In place: OUT += s * ((X_d A^T * u) B^T) * v [* mask/(1-p)] over columns
    [pid_s * n_per_split, (pid_s + 1) * n_per_split); h = X_d A^T stored by split 0."""
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_m = o_m < M
    m_r = o_r < R
    seed = tl.load(SEED) if (IN_DROPOUT or OUT_MASK) else 0

    b_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [BM, BR]
    for k0 in range(0, K, BLOCK_K):
        o_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        m_k = o_k < K
        b_x = tl.load(X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)                      # [BM, BK]
        b_h = _h_step(b_h, b_x, A, o_m, o_k, o_r, m_k, m_r, stride_ar, stride_ak, seed, K, p, keep_scale,
                      IN_DROPOUT, ADAPTER_F32, PREC)
    if WRITE_H:
        if i_s == 0:
            tl.store(H + o_m[:, None] * stride_hm + o_r[None, :], b_h, mask=m_m[:, None] & m_r[None, :])
    if WRITE_OUT:
        b_z = _z_from_h(b_h, X, U, o_r, m_r, scaling, HAS_U, ADAPTER_F32)                # [BM, BR]
        n_lo = i_s * n_per_split
        for n0 in range(n_lo, min(n_lo + n_per_split, N), BLOCK_N):
            o_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            m_n = o_n < N
            b_delta = _delta_tile(b_z, X, B, V, o_m, o_n, o_r, m_n, m_r, stride_bn, stride_br, seed, N, p,
                                  keep_scale, HAS_V, OUT_MASK, ADAPTER_F32, PREC)        # [BM, BN]
            p_out = OUT + o_m[:, None] * stride_om + o_n[None, :] * stride_on
            m_out = m_m[:, None] & m_n[None, :]
            b_out = tl.load(p_out, mask=m_out, other=0.0).to(tl.float32)
            tl.store(p_out, (b_out + b_delta).to(OUT.dtype.element_ty), mask=m_out)


@triton.jit
def _tied_lora_bwd_dB_dv_kernel(
    G, H, U, V, B, DB_PART, DV_PART,
    M, N, R, m_per_split,
    stride_gm, stride_gn, stride_hm, stride_bn, stride_br,
    scaling,
    HAS_U: tl.constexpr, HAS_V: tl.constexpr, NEED_DB: tl.constexpr, NEED_DV: tl.constexpr,
    BASE_F32: tl.constexpr, ADAPTER_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial sums over rows [pid_s * m_per_split, ...) of dB = (G v)^T z and
    dv = sum_rows(G * (z B^T)), z = s h u. DB_PART (S, N, R), DV_PART (S, N), fp32."""
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_n = o_n < N
    m_r = o_r < R
    b_su = tl.full((BLOCK_R,), scaling, tl.float32)
    if HAS_U:
        b_su *= tl.load(U + o_r, mask=m_r, other=0.0).to(tl.float32)
    if HAS_V:
        b_v = tl.load(V + o_n, mask=m_n, other=0.0).to(tl.float32)
    if NEED_DV:
        b_bt = tl.load(B + o_n[None, :] * stride_bn + o_r[:, None] * stride_br,
                       mask=m_n[None, :] & m_r[:, None], other=0.0)                     # [BR, BN]
        if not ADAPTER_F32:
            b_bt = b_bt.to(G.dtype.element_ty)
    b_db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)  # [BN, BR]
    b_dv = tl.zeros((BLOCK_N,), dtype=tl.float32)          # [BN]
    m_lo = i_s * m_per_split
    for m0 in range(m_lo, min(m_lo + m_per_split, M), BLOCK_M):
        o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_m = o_m < M
        b_g = tl.load(G + o_m[:, None] * stride_gm + o_n[None, :] * stride_gn,
                      mask=m_m[:, None] & m_n[None, :], other=0.0)                      # [BM, BN]
        b_z = tl.load(H + o_m[:, None] * stride_hm + o_r[None, :],
                      mask=m_m[:, None] & m_r[None, :], other=0.0) * b_su[None, :]      # [BM, BR]
        if not ADAPTER_F32:
            b_z = b_z.to(G.dtype.element_ty)
        if NEED_DB:
            b_gv = b_g
            if HAS_V:
                b_gv = (b_g.to(tl.float32) * b_v[None, :]).to(G.dtype.element_ty)
            b_db += _dot(tl.trans(b_gv), b_z, ADAPTER_F32, PREC)
        if NEED_DV:
            b_zb = _dot(b_z, b_bt, ADAPTER_F32, PREC)                                    # [BM, BN]
            b_dv += tl.sum(b_g.to(tl.float32) * b_zb, axis=0)
    if NEED_DB:
        tl.store(DB_PART + i_s * N * R + o_n[:, None] * R + o_r[None, :], b_db, mask=m_n[:, None] & m_r[None, :])
    if NEED_DV:
        tl.store(DV_PART + i_s * N + o_n, b_dv, mask=m_n)


@triton.jit
def _tied_lora_bwd_dA_kernel(
    X, GH, DA_PART, SEED,
    M, K, R, m_per_split,
    stride_xm, stride_xk, stride_ghm,
    p, keep_scale,
    IN_DROPOUT: tl.constexpr, BASE_F32: tl.constexpr, ADAPTER_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial sums over rows of dA = gh^T x_d (gh = s g u, (M, R) fp32). DA_PART (S, R, K) fp32."""
    i_k = tl.program_id(0)
    i_s = tl.program_id(1)
    o_k = (i_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_k = o_k < K
    m_r = o_r < R
    seed = tl.load(SEED) if IN_DROPOUT else 0
    b_da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # [BR, BK]
    m_lo = i_s * m_per_split
    for m0 in range(m_lo, min(m_lo + m_per_split, M), BLOCK_M):
        o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_m = o_m < M
        b_x = tl.load(X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)                      # [BM, BK]
        if IN_DROPOUT:
            keep = _keep_mask(seed, o_m, o_k, K, p)
            b_x = tl.where(keep, b_x.to(tl.float32) * keep_scale, 0.0).to(X.dtype.element_ty)
        b_gh = tl.load(GH + o_m[:, None] * stride_ghm + o_r[None, :],
                       mask=m_m[:, None] & m_r[None, :], other=0.0)                     # [BM, BR]
        if not ADAPTER_F32:
            b_gh = b_gh.to(X.dtype.element_ty)
        b_da += _dot(tl.trans(b_gh), b_x, ADAPTER_F32, PREC)
    tl.store(DA_PART + i_s * R * K + o_r[:, None] * K + o_k[None, :], b_da, mask=m_r[:, None] & m_k[None, :])


@triton.jit
def _dropout_mask_kernel(SEED, OUT, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep-mask the kernels apply to x (M, K) for this seed: 1 kept, 0 dropped."""
    o_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    keep = _keep_mask(tl.load(SEED), o_m, o_k, K, p)
    tl.store(OUT + o_m[:, None] * K + o_k[None, :], keep.to(tl.int8), mask=(o_m < M)[:, None] & (o_k < K)[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

FWD_PATHS = ("auto", "fused", "epilogue")
#: Rows at or below which the forward uses the epilogue path (decode: cuBLAS GEMV + one launch).
SMALL_M = 64


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _dot_flags(act_dtype: torch.dtype, *adapters: Optional[torch.Tensor]) -> dict:
    """Precision of the kernels' dots, as constexpr kwargs.

    BASE_F32: upcast the activation dot's operands (only on the interpreter for bf16, whose bf16
    ``tl.dot`` is wrong). ADAPTER_F32: run the rank-r dots in fp32 when an adapter tensor is fp32
    (TF32 tensor cores on fp16/bf16 activations: ~8x the mantissa of bf16 at a cost of r / BLOCK_N),
    else in the activation dtype. PREC: "ieee" for fp32 activations (no TF32 rounding), else "tf32".
    """
    interp_bf16 = act_dtype == torch.bfloat16 and triton_interpreting()
    fp32_adapter = any(t is not None and t.dtype == torch.float32 for t in adapters)
    return dict(BASE_F32=interp_bf16, ADAPTER_F32=interp_bf16 or fp32_adapter,
                PREC="ieee" if act_dtype == torch.float32 else "tf32")


def _fused_blocks(M: int, N: int, K: int) -> dict:
    if triton_interpreting():  # few, large programs: the interpreter's cost is per program
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4)
    if M <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _splits(n_rows: int, block: int, other_programs: int) -> tuple[int, int]:
    """(splits, rows per split) for a split-row reduction: enough programs to fill the GPU,
    never more splits than row blocks. The partials are summed in fp32 afterwards."""
    n_blocks = triton.cdiv(max(n_rows, 1), block)
    target = 1 if triton_interpreting() else max(1, 264 // max(other_programs, 1))
    splits = max(1, min(n_blocks, target))
    per = triton.cdiv(n_blocks, splits) * block
    return triton.cdiv(max(n_rows, 1), per), per


def choose_fwd_path(M: int, r: int) -> str:
    """``TIEDLORA_FWD_PATH`` if set, else epilogue for decode (M <= 64) or large ranks, fused otherwise."""
    want = os.environ.get("TIEDLORA_FWD_PATH", "auto").strip().lower() or "auto"
    if want not in FWD_PATHS:
        raise ValueError(f"TIEDLORA_FWD_PATH must be one of {FWD_PATHS}, got {want!r}")
    if want != "auto":
        return want
    # Recomputing h per N tile costs r / BLOCK_N extra flops in the fused path.
    return "epilogue" if M <= SMALL_M or r > 32 else "fused"


def _adapted_matmul(x, w_nk, bias, a_rk, b_nr, u, v, scaling, p, seed, *, in_dropout, out_mask, path, write_h):
    """out (M, N) = x w^T + bias + s * ((x_d a^T * u) b^T) * v [* mask]; returns (out, h (M, r) fp32 or None).

    Every matrix argument is a 2-D view with arbitrary strides: x (M, K), w_nk (N, K), a_rk (r, K),
    b_nr (N, r). Used for the forward and, with transposed views, for dX.
    """
    M, K = x.shape
    N, r = b_nr.shape
    BR = _block_r(r)
    h = torch.empty((M, r), device=x.device, dtype=torch.float32) if write_h else x.new_empty((1, 1), dtype=torch.float32)
    keep_scale = 1.0 / (1.0 - p) if (in_dropout or out_mask) else 1.0
    seed_t = seed if seed is not None else x.new_zeros(1, dtype=torch.int64)
    dummy = x.new_empty(1)
    if path == "fused":
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
        cfg = _fused_blocks(M, N, K)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _tied_lora_fused_kernel[grid](
            x, w_nk, bias if bias is not None else dummy, a_rk, b_nr, u if u is not None else dummy,
            v if v is not None else dummy, out, h, seed_t,
            M, N, K, r,
            x.stride(0), x.stride(1), w_nk.stride(0), w_nk.stride(1), a_rk.stride(0), a_rk.stride(1),
            b_nr.stride(0), b_nr.stride(1), out.stride(0), out.stride(1), h.stride(0),
            float(scaling), float(p), float(keep_scale),
            HAS_BIAS=bias is not None, HAS_U=u is not None, HAS_V=v is not None,
            IN_DROPOUT=in_dropout, OUT_MASK=out_mask, WRITE_H=write_h, **_dot_flags(x.dtype, a_rk, b_nr),
            BLOCK_R=BR, **cfg,
        )
        return out, (h if write_h else None)
    out = torch.nn.functional.linear(x, w_nk, bias)  # cuBLAS
    _adapter_epilogue_(out, x, a_rk, b_nr, u, v, h, seed_t, scaling, p, in_dropout=in_dropout,
                       out_mask=out_mask, write_h=write_h, write_out=True)
    return out, (h if write_h else None)


def _adapter_epilogue_(out, x, a_rk, b_nr, u, v, h, seed_t, scaling, p, *, in_dropout, out_mask, write_h, write_out):
    """In place out += adapter term (if ``write_out``); h = x_d a^T into ``h`` (if ``write_h``)."""
    M, K = x.shape
    N, r = b_nr.shape
    BR = _block_r(r)
    keep_scale = 1.0 / (1.0 - p) if (in_dropout or out_mask) else 1.0
    BM = 16 if M <= 16 else (32 if triton_interpreting() or M <= 32 else 64)
    BN = 32 if triton_interpreting() else 128
    n_m = triton.cdiv(M, BM)
    n_split = 1 if not write_out else max(1, min(triton.cdiv(N, BN), 1 if triton_interpreting() else 132 // n_m))
    n_per_split = triton.cdiv(triton.cdiv(N, BN), n_split) * BN
    n_split = triton.cdiv(N, n_per_split) if write_out else 1
    dummy = x.new_empty(1)
    _tied_lora_epilogue_kernel[(n_m, n_split)](
        x, a_rk, b_nr, u if u is not None else dummy, v if v is not None else dummy,
        out if out is not None else dummy, h, seed_t,
        M, N, K, r, n_per_split,
        x.stride(0), x.stride(1), a_rk.stride(0), a_rk.stride(1), b_nr.stride(0), b_nr.stride(1),
        out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0, h.stride(0),
        float(scaling), float(p), float(keep_scale),
        HAS_U=u is not None, HAS_V=v is not None, IN_DROPOUT=in_dropout, OUT_MASK=out_mask,
        WRITE_H=write_h, WRITE_OUT=write_out, **_dot_flags(x.dtype, a_rk, b_nr),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=32 if triton_interpreting() else 64, BLOCK_R=BR,
    )


def _dB_dv(G, h, u, v, B, scaling, need_dB, need_dv):
    M, N = G.shape
    r = h.shape[1]
    BN = 32 if triton_interpreting() else 64
    BM = 32 if triton_interpreting() else 64
    n_n = triton.cdiv(N, BN)
    splits, per = _splits(M, BM, n_n)
    dB_part = torch.empty((splits, N, r), device=G.device, dtype=torch.float32) if need_dB else G.new_empty(1)
    dv_part = torch.empty((splits, N), device=G.device, dtype=torch.float32) if need_dv else G.new_empty(1)
    dummy = G.new_empty(1)
    _tied_lora_bwd_dB_dv_kernel[(n_n, splits)](
        G, h, u if u is not None else dummy, v if v is not None else dummy, B, dB_part, dv_part,
        M, N, r, per,
        G.stride(0), G.stride(1), h.stride(0), B.stride(0), B.stride(1),
        float(scaling),
        HAS_U=u is not None, HAS_V=v is not None, NEED_DB=need_dB, NEED_DV=need_dv,
        **_dot_flags(G.dtype, B), BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=_block_r(r),
    )
    return (dB_part.sum(0) if need_dB else None), (dv_part.sum(0) if need_dv else None)


def _dA(x, gh, A, seed_t, p, in_dropout):
    M, K = x.shape
    r = gh.shape[1]
    BK = 32 if triton_interpreting() else 64
    BM = 32 if triton_interpreting() else 64
    n_k = triton.cdiv(K, BK)
    splits, per = _splits(M, BM, n_k)
    dA_part = torch.empty((splits, r, K), device=x.device, dtype=torch.float32)
    _tied_lora_bwd_dA_kernel[(n_k, splits)](
        x, gh, dA_part, seed_t, M, K, r, per,
        x.stride(0), x.stride(1), gh.stride(0),
        float(p), 1.0 / (1.0 - p) if in_dropout else 1.0,
        IN_DROPOUT=in_dropout, **_dot_flags(x.dtype, A), BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=_block_r(r),
    )
    return dA_part.sum(0)


def draw_seed(device) -> torch.Tensor:
    """The Philox seed of one dropout call, from torch's generator (torch.manual_seed reproduces it)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def dropout_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The keep-mask (M, K) bool that the kernels apply to x for ``seed`` (a 1-element int64 tensor)."""
    out = torch.empty((M, K), device=seed.device, dtype=torch.int8)
    _dropout_mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](seed, out, M, K, float(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()


# ---------------------------------------------------------------------------------------------
# The op: torch.library custom ops with a registered autograd formula (no graph breaks)
# ---------------------------------------------------------------------------------------------


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not triton_interpreting():
        raise RuntimeError(f"tied_lora_linear (triton): tensors must be on a CUDA device (x is on {x.device}); "
                           "set TRITON_INTERPRET=1 before importing to run the kernels on the CPU interpreter")


@torch.library.custom_op("tiedlora::tied_lora_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
            u: Optional[torch.Tensor], v: Optional[torch.Tensor], seed: torch.Tensor, scaling: float,
            dropout_p: float, save_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (out (M, N), h (M, r) fp32, or an empty (0, r) tensor when not saved)."""
    _check_device(x)
    M = x.shape[0]
    r = A.shape[0]
    dropout = dropout_p > 0.0
    if M == 0:
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, r), dtype=torch.float32)
    path = choose_fwd_path(M, r)
    out, h = _adapted_matmul(x, weight, bias, A, B, u, v, scaling, dropout_p, seed, in_dropout=dropout,
                             out_mask=False, path=path, write_h=save_h)
    return out, (h if save_h else x.new_empty((0, r), dtype=torch.float32))


@_fwd_op.register_fake
def _(x, weight, bias, A, B, u, v, seed, scaling, dropout_p, save_h):
    M, r = x.shape[0], A.shape[0]
    return x.new_empty((M, weight.shape[0])), x.new_empty((M if save_h else 0, r), dtype=torch.float32)


@torch.library.custom_op("tiedlora::tied_lora_bwd", mutates_args=())
def _bwd_op(G: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            u: Optional[torch.Tensor], v: Optional[torch.Tensor], h: torch.Tensor, seed: torch.Tensor,
            scaling: float, dropout_p: float, needs: list[bool]) -> list[torch.Tensor]:
    """Gradients [dx, dA, dB, du, dv]; an unneeded one comes back as an empty tensor.

    ``needs`` = (x, A, B, u, v). G (M, N); x (M, K) (empty when A is frozen); h (M, r) fp32
    (empty when B, u and v are all frozen).
    """
    need_x, need_A, need_B, need_u, need_v = needs
    _check_device(G)
    M, N = G.shape
    K = weight.shape[1]
    r = A.shape[0]
    if M == 0:
        zeros = lambda t, need: torch.zeros_like(t) if need else G.new_empty(0)  # noqa: E731
        return [G.new_zeros((0, K)) if need_x else G.new_empty(0), zeros(A, need_A), zeros(B, need_B),
                zeros(u, need_u), zeros(v, need_v)]
    dropout = dropout_p > 0.0
    # g = (G v) B is the "h" of the dX product: (G, W^T, (B v)^T, A^T) in place of (x, W, A, B).
    Bv = B if v is None else B * v[:, None].to(B.dtype)
    need_g = need_x or need_A or need_u
    dx = g = None
    if need_x:
        dx, g = _adapted_matmul(G, weight.t(), None, Bv.t(), A.t(), u, None, scaling, dropout_p, seed,
                                in_dropout=False, out_mask=dropout, path=choose_fwd_path(M, r), write_h=need_g)
    elif need_g:
        g = torch.empty((M, r), device=G.device, dtype=torch.float32)
        _adapter_epilogue_(None, G, Bv.t(), A.t(), None, None, g, seed, scaling, dropout_p,
                           in_dropout=False, out_mask=False, write_h=True, write_out=False)
    dA = du = dB = dv = None
    if need_A or need_u:
        su = scaling if u is None else scaling * u.float()
        if need_A:
            dA = _dA(x, g * su, A, seed, dropout_p, dropout)
        if need_u:
            du = scaling * (g * h).sum(0)
    if need_B or need_v:
        dB, dv = _dB_dv(G, h, u, v, B, scaling, need_B, need_v)
    # Unneeded gradients come back as distinct empty tensors (outputs of a custom op may not alias).
    cast = lambda t, like: t.to(like.dtype) if t is not None else G.new_empty(0)  # noqa: E731
    return [dx if dx is not None else G.new_empty(0), cast(dA, A), cast(dB, B), cast(du, u), cast(dv, v)]


@_bwd_op.register_fake
def _(G, x, weight, A, B, u, v, h, seed, scaling, dropout_p, needs):
    need_x, need_A, need_B, need_u, need_v = needs
    like = lambda t, need: t.new_empty(t.shape) if need else G.new_empty(0)  # noqa: E731
    return [G.new_empty((G.shape[0], weight.shape[1])) if need_x else G.new_empty(0), like(A, need_A),
            like(B, need_B), like(u, need_u), like(v, need_v)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, u, v, seed, scaling, dropout_p, save_h = inputs
    _, h = output
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.has_u, ctx.has_v = u is not None, v is not None
    # x is needed only for dA: with A frozen nothing of size M x K is kept alive for backward.
    keep_x = A.requires_grad
    ctx.save_for_backward(x if keep_x else None, weight, A, B, u, v, h, seed)


def _backward(ctx, grad_out, grad_h):
    x, weight, A, B, u, v, h, seed = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4],
             ctx.has_u and ctx.needs_input_grad[5], ctx.has_v and ctx.needs_input_grad[6]]
    if not any(needs):
        return (None,) * 11
    empty = grad_out.new_empty(0)
    dx, dA, dB, du, dv = _bwd_op(grad_out, x if x is not None else empty, weight, A, B, u, v, h, seed,
                                 ctx.scaling, ctx.dropout_p, needs)
    pick = lambda t, need: t if need else None  # noqa: E731
    return (pick(dx, needs[0]), None, None, pick(dA, needs[1]), pick(dB, needs[2]), pick(du, needs[3]),
            pick(dv, needs[4]), None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def tied_lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                            B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor], scaling: float,
                            dropout_p: float, training: bool) -> torch.Tensor:
    """The Triton implementation of :func:`tiedlora_kernels.tied_lora_linear` (same arguments; validated
    by the caller). Flattens leading dims (a view whenever strides allow), launches, restores them."""
    _check_device(x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"tied_lora_linear (triton): {name} requires grad, but the kernels treat the base layer "
                             "as frozen; freeze it or use TIEDLORA_BACKEND=torch to train it")
    p = float(dropout_p) if training else 0.0
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    seed = draw_seed(x.device) if p > 0 else torch.zeros(1, device=x.device, dtype=torch.int64)
    save_h = B.requires_grad or (u is not None and u.requires_grad) or (v is not None and v.requires_grad)
    out, _ = _fwd_op(x2, weight, bias, A, B, u, v, seed, float(scaling), p, bool(save_h))
    return out.reshape(*lead, weight.shape[0])
