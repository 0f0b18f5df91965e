"""What every kernel of the adapted linear layer shares: the dot with its precision rules, the
dropout keep-mask, and the launch arithmetic (padded rank, programs that fill the device, row
splits of the two-stage reductions).

Precision. Big dots run in the activation dtype with fp32 accumulators (bf16/fp16 tensor cores;
fp32 as IEEE fp32 unless torch allows TF32 for fp32 matmuls, exactly as cuBLAS does). Small rank-r
dots take fp32 operands (TF32 tensor cores for 16-bit activations, where they cost < 1 % of the
layer). Under ``TRITON_INTERPRET=1`` bf16 operands are upcast to fp32 before ``tl.dot``: the
interpreter's bf16 dot returns garbage (triton 3.6 and 3.9); on a GPU they stay bf16. The
interpreter (triton 3.9) also rounds an fp32 -> bf16 store toward zero where a GPU rounds to nearest:
bf16 results on a CPU carry up to twice a GPU's rounding error, which the tests' bf16 tolerances allow.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import triton_interpreting


@triton.jit
def keep_mask(seed, o_row, o_col, n_cols, p_drop):
    """Philox keep-mask of elements (row, col) of a row-major (.., n_cols) tensor (True = kept).

    Each element draws from its own counter row * n_cols + col (int64: no wrap for M K >= 2^31),
    so the mask of x (M, K) is the same whichever kernel, tile or program regenerates it."""
    o_elem = o_row[:, None] * n_cols + o_col[None, :]
    return tl.rand(seed, o_elem) >= p_drop


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with an fp32 accumulator; UPCAST casts both operands to fp32 first (interpreter bf16)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def down_project(X, D, DS, o_m, m_m, o_r, m_r, K, stride_xm, stride_xk, stride_dk, stride_dr, seed, p_drop,
                 keep_scale, IN_DROPOUT: tl.constexpr, HAS_DSCALE: tl.constexpr, WIDE_DOT: tl.constexpr,
                 UPCAST: tl.constexpr, MAIN_PREC: tl.constexpr, SMALL_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """h = dropout(X[o_m]) (D diag(DS))^T [BM, BR] fp32: one pass over rows o_m of X (M, K) against
    D (R, K), both any strides; HAS_DSCALE scales D's columns by DS (K,) unit stride, in fp32 (the
    backward's D = (B v)^T without materialising B v). Every kernel's rank-r down projection
    (adapter_term's, the serving banks').

    The dot runs in X's dtype (tensor cores for bf16/fp16) with D cast to it, except WIDE_DOT
    (fp16 X, fp32 or bf16 D): there D cast to fp16 would flush its small values (gamma's scaled
    init) to zero, so both operands go to fp32 (TF32 on a GPU: fp32's exponent range)."""
    b_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)                                        # [BM, BR]
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        b_x = tl.load(X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)                                # [BM, BK]
        if IN_DROPOUT:
            b_keep = keep_mask(seed, o_m, o_k, K, p_drop)
            b_x = tl.where(b_keep, b_x.to(tl.float32) * keep_scale, 0.0).to(b_x.dtype)
        b_dt = tl.load(D + o_k[:, None] * stride_dk + o_r[None, :] * stride_dr,
                       mask=m_k[:, None] & m_r[None, :], other=0.0)                                # [BK, BR]
        if HAS_DSCALE:
            b_dt = b_dt.to(tl.float32) * tl.load(DS + o_k, mask=m_k, other=0.0).to(tl.float32)[:, None]
        b_h = down_dot(b_x, b_dt, b_h, WIDE_DOT, UPCAST, MAIN_PREC, SMALL_PREC)
    return b_h


@triton.jit
def down_dot(b_x, b_dt, b_h, WIDE_DOT: tl.constexpr, UPCAST: tl.constexpr, MAIN_PREC: tl.constexpr,
             SMALL_PREC: tl.constexpr):
    """b_h + b_x b_dt: one K step of the down projection, x [BM, BK] against D^T [BK, BR], with
    :func:`down_project`'s precision rule (D cast to x's dtype, or both in fp32 for WIDE_DOT)."""
    if WIDE_DOT:
        b_h = tl.dot(b_x.to(tl.float32), b_dt.to(tl.float32), b_h, input_precision=SMALL_PREC)
    else:
        b_h = mma(b_x, b_dt.to(b_x.dtype), b_h, UPCAST, MAIN_PREC)
    return b_h


@triton.jit
def up_project(b_z, P, o_r, m_r, o_n, m_n, stride_pr, stride_pn, SMALL_PREC: tl.constexpr):
    """b_z P[o_n]^T [BM, BN] fp32: the rank-r up projection of z [BM, BR] fp32 onto columns o_n of
    P (N, R) (any strides), read in fp32 (padded rank rows and columns past N read as 0). Every
    kernel's epilogue (adapter_term's, the serving banks')."""
    b_pt = tl.load(P + o_r[:, None] * stride_pr + o_n[None, :] * stride_pn,
                   mask=m_r[:, None] & m_n[None, :], other=0.0).to(tl.float32)                  # [BR, BN]
    return tl.dot(b_z, b_pt, input_precision=SMALL_PREC)


@triton.jit
def store_with_bias(OUT, BIAS, b_out, o_m, m_m, o_n, m_n, stride_om, stride_on, HAS_BIAS: tl.constexpr):
    """OUT[o_m, o_n] = b_out (+ BIAS[o_n]), computed in fp32, rounded once to OUT's dtype."""
    if HAS_BIAS:
        b_out += tl.load(BIAS + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + o_m[:, None] * stride_om + o_n[None, :] * stride_on, b_out.to(OUT.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


def wide_dot(x: torch.Tensor, down: torch.Tensor, down_scale: Optional[torch.Tensor] = None) -> bool:
    """The WIDE_DOT flag of :func:`down_project` for activations ``x``, down projection ``down`` and
    its column scale: 16-bit x with a down projection of another dtype (fp32 adapters on bf16 or
    fp16 activations, mixed precision's usual setup, where the reference and PEFT compute in fp32),
    or, on fp16 x, a scaled one (formed in fp32; fp16's range would flush it). Casting D to x's
    dtype instead rounds every factor to 8 (bf16) or 11 (fp16) bits, and with it h and g, which all
    four factor gradients are made of: ~4e-3 relative error on bf16 where the fp32 dot (TF32 on a
    GPU) keeps them near fp32's; and fp16's range flushes small fp32 or bf16 factor values. A
    down projection of x's dtype with a wider scale (bf16 B, fp32 v) counts as wider."""
    if x.dtype == torch.float16:
        return down.dtype != torch.float16 or down_scale is not None
    # bf16 has fp32's range: a bf16 D scaled by a bf16 v (bf16 adapters) stays narrow, as the bf16
    # reference; a wider scale (bf16 B, fp32 v) widens D v, which the reference forms in fp32
    return x.dtype == torch.bfloat16 and (down.dtype != torch.bfloat16 or
                                          (down_scale is not None and down_scale.dtype != torch.bfloat16))


# The launchers' arithmetic is plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are jit
# functions, and called from Python each goes through the JIT's dispatcher (several microseconds of
# host time, a dozen times per layer and training step). So is the interpreter flag read once.


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b."""
    return -(-a // b)


def block_r(r: int) -> int:
    """Padded rank: a power of two, at least 16 (the smallest tl.dot dimension on tensor cores)."""
    return max(16, 1 << (r - 1).bit_length())


@functools.lru_cache(maxsize=None)
def kernels_interpreted() -> bool:
    """Whether this package's kernels run on the Triton interpreter. ``triton.jit`` fixed that when it
    decorated them, at import, from ``TRITON_INTERPRET``; this reads the variable once, at the first
    launch (changing it later changes neither). The dispatch's checks read the environment on each
    call (:func:`tiedlora_kernels.ops.triton_interpreting`)."""
    return triton_interpreting()


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


def precisions(act_dtype: torch.dtype) -> dict:
    """constexpr dot settings for activations of ``act_dtype``: UPCAST (bf16 under the interpreter),
    MAIN_PREC (the dot over the activations), SMALL_PREC (the fp32 rank-r dots)."""
    if kernels_interpreted():
        return dict(UPCAST=act_dtype == torch.bfloat16, MAIN_PREC="ieee", SMALL_PREC="ieee")
    if act_dtype == torch.float32:
        prec = "tf32" if tf32_allowed() else "ieee"
        return dict(UPCAST=False, MAIN_PREC=prec, SMALL_PREC=prec)
    return dict(UPCAST=False, MAIN_PREC="tf32", SMALL_PREC="tf32")  # MAIN_PREC is moot for 16-bit operands


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs that fill the device twice over (1 under the interpreter: programs run serially)."""
    if kernels_interpreted() or device.type != "cuda":
        return 1
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def column_splits(row_programs: int, N: int, block_n: int, device, splits: Optional[int] = None) -> tuple[int, int]:
    """(splits, columns per split) of the N output columns when each of ``row_programs`` programs
    would otherwise write all of them: at decode one row block cannot fill the device, so its
    columns are split over more programs (each split recomputes h from its rows of x). ``splits``
    asks for that many (at most one per column tile) instead of the rule."""
    col_tiles = max(1, cdiv(N, block_n))
    want = splits if splits is not None else target_programs(device) // max(row_programs, 1)
    splits = max(1, min(col_tiles, want))
    return splits, cdiv(col_tiles, splits) * block_n


def launch_options(num_warps: int, num_stages: Optional[int] = None) -> dict:
    """The launch keywords of every kernel: ``num_stages`` only when set (None: Triton's default), and
    FP fusion (FMA) on, as every Triton before 3.10 defaults to and these kernels are checked with:
    triton 3.10 turns the default off (3.9 warns about it at the first compile), which would change
    their rounding with the installed version."""
    options = dict(num_warps=num_warps, enable_fp_fusion=True)
    if num_stages is not None:
        options["num_stages"] = num_stages
    return options


def row_splits(M: int, block_m: int, other_programs: int, bytes_per_split: int, device) -> tuple[int, int]:
    """(splits, rows per split) of a two-stage row reduction: enough programs to fill the device,
    no more splits than row blocks, and at most 256 MiB of fp32 partials. Each split writes its own
    partial and torch sums them: deterministic, no atomics."""
    n_blocks = cdiv(max(M, 1), block_m)
    splits = max(1, min(n_blocks, target_programs(device) // max(other_programs, 1),
                        (256 << 20) // max(bytes_per_split, 1)))
    rows = cdiv(n_blocks, splits) * block_m
    return cdiv(max(M, 1), rows), rows


def reduction_tiles(r: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_M, column block, num_warps) of the split-row gradient reductions (dB/dv over
    N columns, dA over K columns, dc): narrower column tiles and 8 warps at large rank keep the
    [columns, BLOCK_R] fp32 accumulator in registers."""
    b_r = block_r(r)
    interp = kernels_interpreted()
    block_cols = 32 if interp or b_r >= 128 else 64
    return b_r, 32 if interp else 64, block_cols, 8 if b_r >= 128 else 4


def vec(t: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """A (n,) vector argument as the kernels read it (unit stride: a strided u, v or bias is copied,
    n elements at most), or a placeholder pointer that a False HAS_* flag keeps unread."""
    return t.contiguous() if t is not None else placeholder
