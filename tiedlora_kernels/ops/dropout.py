"""Adapter-input dropout: the seed one call draws, and the keep-mask the kernels apply for it.

The kernels never store the mask: each one that needs it (adapter_term on x in the forward, on
the dX columns in the backward, the dA tile on x) regenerates it from (seed, m * K + k) with Philox
(``common.keep_mask``). ``dropout_mask`` materialises the same mask, for tests and debugging.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, keep_mask, launch_options


@triton.jit
def _dropout_keep_kernel(SEED, KEEP, M, K, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """KEEP (M, K) int8 contiguous: 1 where the kernels keep x[m, k] for this seed, else 0."""
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    b_keep = keep_mask(tl.load(SEED), o_m, o_k, K, p_drop)
    tl.store(KEEP + o_m[:, None] * K + o_k[None, :], b_keep.to(tl.int8), mask=(o_m < M)[:, None] & (o_k < K)[None, :])


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
        _dropout_keep_kernel[(cdiv(M, 32), cdiv(K, 32))](
            seed.to(device), keep, M, K, float(p), BLOCK_M=32, BLOCK_K=32, **launch_options(4))
    return keep.bool()
