"""Fused ops and the backend switch.

``TIEDLORA_BACKEND`` (read at call time) picks the implementation of :func:`tied_lora_linear`:

- ``auto`` (default): the Triton kernels for CUDA tensors in fp32/bf16/fp16 with a frozen base
  layer, the torch reference otherwise (CPU tensors, fp64, a base weight that trains);
- ``torch``: always the reference (``tiedlora_kernels.reference``);
- ``triton``: always the Triton kernels. On CPU tensors this needs ``TRITON_INTERPRET=1`` set
  before the kernels are first imported (how CI checks kernel parity without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .. import reference
from ..validation import check_tied_lora_inputs

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> str:
    """The backend that will run for activations ``x`` (and base ``weight``/``bias``): ``"torch"`` or ``"triton"``."""
    want = os.environ.get("TIEDLORA_BACKEND", "auto").strip().lower() or "auto"
    if want not in BACKENDS:
        raise ValueError(f"TIEDLORA_BACKEND must be one of {BACKENDS}, got {want!r}")
    if want == "torch":
        return "torch"
    if want == "auto":
        base_trains = any(t is not None and t.requires_grad for t in (weight, bias))
        fits = x.is_cuda and x.dtype != torch.float64 and not base_trains
        return "triton" if fits and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("TIEDLORA_BACKEND=triton but the triton package is not installed")
    if not x.is_cuda and not triton_interpreting():
        raise RuntimeError(f"TIEDLORA_BACKEND=triton needs CUDA tensors (x is on {x.device}), "
                           "or TRITON_INTERPRET=1 to run the kernels on the CPU interpreter")
    return "triton"


def tied_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    u: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Adapted linear layer: out = x W^T + b + s * (((dropout(x) A^T) * u) B^T) * v.

    With ``row_scale`` c: out = c * (x W^T + s * (((dropout(x) A^T) * u) B^T) * v) + b, the
    magnitude of DoRA and Simple DoRA, applied in the kernels' epilogue.

    Args:
        x: (..., K) activations, any leading dims and strides; fp32, bf16 or fp16.
        weight: (N, K) frozen base weight, same dtype as x (HF ``Conv1D`` passes ``weight.t()``).
        bias: (N,) or None.
        A: (r, K) down projection; B: (N, r) up projection (tied: the same tensors in every layer
            of a kind; gradients from every layer are summed in fp32 for fp32 adapters).
        u: (r,) or None (constant 1); v: (N,) or None (constant 1).
        scaling: s (alpha / r, times gamma).
        dropout_p: dropout probability on the adapter input; applied only when ``training``.
        row_scale: (N,) or None; fp32 or x's dtype, trained or frozen.

    Returns:
        (..., N) tensor in x's dtype, differentiable in x, A, B, u, v and row_scale (whichever
        require grad).

    Example:
        >>> x = torch.randn(2, 7, 32); W = torch.randn(48, 32)
        >>> A = torch.randn(4, 32); B = torch.zeros(48, 4)
        >>> torch.allclose(tied_lora_linear(x, W, None, A, B), x @ W.T)
        True
    """
    check_tied_lora_inputs(x, weight, bias, A, B, u, v, scaling, dropout_p, row_scale)
    if resolve_backend(x, weight, bias) == "triton":
        from .tied_lora_triton import tied_lora_linear_triton

        return tied_lora_linear_triton(x, weight, bias, A, B, u, v, float(scaling), float(dropout_p), training,
                                       row_scale=row_scale)
    return reference.tied_lora_linear(x, weight, bias, A, B, u, v, scaling, dropout_p, training, row_scale)
