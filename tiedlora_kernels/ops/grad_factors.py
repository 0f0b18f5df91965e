"""The adapter's parameter gradients in one launch: the dA tiles (``grad_down_tile``, one pass over
x) and the dB / dv / du tiles (``grad_up_tile``, one pass over G) as two roles of one grid, then
``grad_finish`` sums both sets of row-split partials. Four gradients in two launches: a
host-bound training step pays each launch's issue time (~60 us on the H200 machine's host, more
than either pass takes on the GPU at a small model's sizes), so the two passes share one.

Grid (a_programs + p_programs,): program q < a_programs is dA's (K tile q % k_tiles, row split
q // k_tiles); the rest are P's (column tile, row split) likewise. Each role sizes its own row
splits to fill the device (``row_splits``), as two launches would. Bytes: those of the two passes
(grad_down.py, grad_up.py); nothing shared, nothing added.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import block_r, cdiv, kernels_interpreted, launch_options, precisions, reduction_tiles, row_splits, vec
from .grad_down import grad_down_tile
from .grad_finish import grad_finish
from .grad_up import grad_up_tile


@triton.jit
def _grad_factors_kernel(
    X, G, H, GR, U, DA_PART, PART, SEED,
    M, K, N, R, a_rows_per_split, p_rows_per_split, du_row, a_programs, k_tiles, n_tiles,
    stride_xm, stride_xk, stride_gm, stride_gn, stride_hm, stride_grm, stride_ps,
    scaling, p_drop,
    NEED_DA: tl.constexpr, NEED_P: tl.constexpr, NEED_DU: tl.constexpr, HAS_U: tl.constexpr,
    X_DROPOUT: tl.constexpr, SMALL_PREC: tl.constexpr, BLOCK_M_A: tl.constexpr, BLOCK_M_P: tl.constexpr,
    BLOCK_COLS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """X (M, K), G (M, N) any strides; H, GR (M, R) fp32 unit column stride; DA_PART (a_splits, R, K)
    and PART (p_splits, rows, R) fp32 contiguous (see the two tiles)."""
    pid = tl.program_id(0)
    if pid < a_programs:
        if NEED_DA:
            grad_down_tile(X, GR, U, DA_PART, SEED, M, K, R, a_rows_per_split, stride_xm, stride_xk, stride_grm,
                           scaling, p_drop, pid % k_tiles, pid // k_tiles,
                           HAS_U, X_DROPOUT, SMALL_PREC, BLOCK_M_A, BLOCK_COLS, BLOCK_R)
    else:
        if NEED_P or NEED_DU:
            q = pid - a_programs
            grad_up_tile(G, H, GR, U, PART, M, N, R, p_rows_per_split, du_row,
                         stride_gm, stride_gn, stride_hm, stride_grm, stride_ps,
                         scaling, q % n_tiles, q // n_tiles,
                         NEED_P, NEED_DU, HAS_U, SMALL_PREC, BLOCK_M_P, BLOCK_COLS, BLOCK_R)


class FactorTiles(NamedTuple):
    """A launch configuration of ``_grad_factors_kernel``: the row tiles of the dA role (over x) and
    of the P role (over G), the column tile both share, warps, pipeline stages (None: Triton's)."""

    block_m_a: int
    block_m_p: int
    block_cols: int
    num_warps: int
    num_stages: Optional[int] = None


def _factor_tiles(r: int, small_prec: str) -> FactorTiles:
    """The configuration at rank r (``reduction_tiles``); the IEEE fp32 dot of a 64-row tile of G
    spills on sm_90 (bench/results/compile/), so fp32 activations without TF32 take 32-row P tiles.
    ``python -m bench.tile_sweep`` times the alternatives on a GPU."""
    _, block_m, block_cols, warps = reduction_tiles(r)
    block_m_p = 32 if small_prec == "ieee" and not kernels_interpreted() else block_m
    return FactorTiles(block_m, block_m_p, block_cols, warps)


def grad_factors(x: Optional[torch.Tensor], G: torch.Tensor, h: Optional[torch.Tensor], g: Optional[torch.Tensor],
                 A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                 scaling: float, p_drop: float, seed: Optional[torch.Tensor], x_dropout: bool, need_da: bool,
                 need_db: bool, need_dv: bool, need_du: bool, tiles: Optional[FactorTiles] = None,
                 ) -> tuple[Optional[torch.Tensor], ...]:
    """(dA (r, K), dB (N, r), dv (N,), du (r,)) in their parameters' dtypes, None where not needed.

    x (M, K) any strides (needed for dA), G (M, N) any strides, h (M, r) fp32 (needed for dB, dv,
    du) and g (M, r) fp32 (needed for dA, du), both unit column stride; the dropout seed and mask
    flag regenerate x's mask for dA. ``tiles``: the launch configuration (None: ``_factor_tiles``)."""
    M, N = G.shape
    r, K = A.shape
    need_p = need_db or need_dv
    need_up = need_p or need_du
    small_prec = precisions(G.dtype)["SMALL_PREC"]
    cfg = tiles or _factor_tiles(r, small_prec)
    k_tiles = cdiv(K, cfg.block_cols) if need_da else 0
    a_splits, a_rows = row_splits(M, cfg.block_m_a, k_tiles, 4 * K * r, G.device) if need_da else (0, 1)
    n_tiles = (max(1, cdiv(N, cfg.block_cols)) if need_p else 1) if need_up else 0  # tile 0 writes du (N = 0 too)
    part_rows = (N if need_p else 0) + (1 if need_du else 0)
    p_splits, p_rows = row_splits(M, cfg.block_m_p, n_tiles, 4 * part_rows * r, G.device) if need_up else (0, 1)
    da_part = torch.empty((a_splits, r, K), device=G.device, dtype=torch.float32) if need_da else None
    part = torch.empty((p_splits, part_rows, r), device=G.device, dtype=torch.float32) if need_up else None
    du_row = part_rows - 1 if need_du else -1
    a_programs = k_tiles * a_splits
    placeholder = g if g is not None else h
    _grad_factors_kernel[(a_programs + n_tiles * p_splits,)](
        x if need_da else placeholder, G, h if h is not None else placeholder, placeholder, vec(u, placeholder),
        da_part if da_part is not None else placeholder, part if part is not None else placeholder,
        seed if seed is not None else placeholder,
        M, K, N, r, a_rows, p_rows, du_row, a_programs, max(k_tiles, 1), max(n_tiles, 1),
        x.stride(0) if need_da else 0, x.stride(1) if need_da else 0, G.stride(0), G.stride(1),
        h.stride(0) if h is not None else 0, placeholder.stride(0), part.stride(0) if part is not None else 0,
        float(scaling), float(p_drop),
        NEED_DA=need_da, NEED_P=need_p, NEED_DU=need_du, HAS_U=u is not None, X_DROPOUT=x_dropout,
        SMALL_PREC=small_prec, BLOCK_M_A=cfg.block_m_a, BLOCK_M_P=cfg.block_m_p, BLOCK_COLS=cfg.block_cols,
        BLOCK_R=block_r(r), **launch_options(cfg.num_warps, cfg.num_stages),
    )
    return grad_finish(part, da_part, A, B, u, v, du_row, need_da, need_db, need_dv, need_du)
