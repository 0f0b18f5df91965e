"""Plain-PyTorch reference of every op: the oracle the fused kernels are tested against.

Nothing here imports from ``tiedlora_kernels.ops``; autograd provides every gradient. These
functions stay forever, readable first, and are also the ``TIEDLORA_BACKEND=torch`` path.
docs/MATH.md states the formula, the variants' effective tensors and the gradients autograd
computes here (section 6), which the fused kernels write out by hand.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .validation import adapter_compute_dtype, check_tied_lora_add_inputs, check_tied_lora_inputs


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
    """out = x W^T + b + s * (((dropout(x) A^T) * u) B^T) * v, in plain torch ops; with a row scale
    c, out = c * (x W^T + s * (((dropout(x) A^T) * u) B^T) * v) + b (DoRA's and Simple DoRA's magnitude).

    Args:
        x: (..., K) activations.
        weight: (N, K) frozen base weight (any strides; HF ``Conv1D`` passes ``weight.t()``).
        bias: (N,) or None.
        A: (r, K); B: (N, r); u: (r,) or None (= 1); v: (N,) or None (= 1).
        scaling: s.
        dropout_p / training: dropout on the adapter input only, active when ``training``.
        row_scale: c (N,) or None, one scale per output feature, applied before the bias.

    Returns:
        (..., N) in x's dtype. The adapter path is computed in the wider of x's and the adapter's
        dtype (fp32 adapters on bf16 activations compute the path in fp32, as PEFT does); the row
        scale multiplies the rounded pre-scale output in the wider of x's and c's dtype.
    """
    check_tied_lora_inputs(x, weight, bias, A, B, u, v, scaling, dropout_p, row_scale)
    return unchecked_tied_lora_linear(x, weight, bias, A, B, u, v, scaling, dropout_p, training, row_scale)


def unchecked_tied_lora_linear(x, weight, bias, A, B, u, v, scaling, dropout_p, training, row_scale):
    """:func:`tied_lora_linear` on inputs the caller has validated (the op's dispatch validates once,
    whichever backend runs)."""
    base = F.linear(x, weight, bias if row_scale is None else None)
    out = base + _adapter_delta(x, A, B, u, v, scaling, dropout_p, training)
    return _scale_and_bias(out, row_scale, bias)


def tied_lora_add(
    x: torch.Tensor,
    base_out: torch.Tensor,
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
    """out = c * (base_out + s * (((dropout(x) A^T) * u) B^T) * v) + b: the adapter over a base layer
    that computes its own output (a quantized linear), ``base_out`` being that output without bias.

    Args:
        x: (..., K) the base layer's input; base_out: (..., N) its output without bias, x's dtype.
        bias, A, B, u, v, scaling, dropout_p, training, row_scale: as in :func:`tied_lora_linear`.

    Returns:
        (..., N) in x's dtype, with the same roundings as :func:`tied_lora_linear`.
    """
    check_tied_lora_add_inputs(x, base_out, bias, A, B, u, v, scaling, dropout_p, row_scale)
    return unchecked_tied_lora_add(x, base_out, bias, A, B, u, v, scaling, dropout_p, training, row_scale)


def unchecked_tied_lora_add(x, base_out, bias, A, B, u, v, scaling, dropout_p, training, row_scale):
    """:func:`tied_lora_add` on inputs the caller has validated."""
    out = base_out + _adapter_delta(x, A, B, u, v, scaling, dropout_p, training)
    if row_scale is None and bias is not None:
        out = out + bias
    return _scale_and_bias(out, row_scale, bias)


def _adapter_delta(x, A, B, u, v, scaling, dropout_p, training) -> torch.Tensor:
    """s * (((dropout(x) A^T) * u) B^T) * v computed in the wider of x's and A's dtype, cast to x's
    (under torch.autocast too: autocast would otherwise run these products in its lower dtype)."""
    ct = adapter_compute_dtype(x, A)
    with autocast_off(x.device.type):
        xd = F.dropout(x, dropout_p, training) if dropout_p > 0 else x
        h = F.linear(xd.to(ct), A.to(ct))
        z = h * u.to(ct) if u is not None else h
        delta = F.linear(z, B.to(ct))
        if v is not None:
            delta = delta * v.to(ct)
        return (scaling * delta).to(x.dtype)


#: Device types torch.autocast knows (it raises for others, such as ``meta``).
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


def autocast_off(device_type: str):
    """A context in which ``torch.autocast`` is off for ``device_type`` (a plain context for a device
    type autocast does not know, such as ``meta``, and where autocast is off already: entering
    ``torch.autocast`` costs a few microseconds of host time, paid by every adapted layer's call)."""
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _scale_and_bias(out: torch.Tensor, row_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """c * out + b in the wider of out's and c's dtype, rounded to out's dtype (out unchanged without c)."""
    if row_scale is None:
        return out
    cs = torch.promote_types(out.dtype, row_scale.dtype)
    out = (out.to(cs) * row_scale.to(cs)).to(out.dtype)
    return out + bias if bias is not None else out


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor],
                  v: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """W' = W + s * diag(v) B diag(u) A, computed in fp32 (fp64 for fp64 weights), in W's dtype.

    Shapes: weight (N, K), A (r, K), B (N, r), u (r,) or None, v (N,) or None.
    """
    ct = torch.promote_types(weight.dtype, torch.float32)
    Bm = B.to(ct)
    if u is not None:
        Bm = Bm * u.to(ct)
    if v is not None:
        Bm = Bm * v.to(ct)[:, None]
    return (weight.to(ct) + scaling * (Bm @ A.to(ct))).to(weight.dtype)


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_2 per row (N,) of weight (N, K), fp32 (fp64 for fp64 weights), accumulated and returned
    unrounded: DoRA's magnitude starts at this value and its row scale is m / this norm, so a
    norm rounded to a 16-bit W's dtype would move the adapted layer off the identity at init."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.promote_types(weight.dtype, torch.float32))


def merged_row_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor],
                    v: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """||W + D||_2 per row (N,), D = s diag(v) B diag(u) A (DoRA's norm), fp32 (fp64 for fp64
    weights), without forming the (N, K) merged weight.

    Row i: ||W_i + D_i||^2 = ||W_i||^2 + e_i with z_i = B_i * u (r,), D_i = s v_i z_i A and
    e_i = 2 <W_i, D_i> + ||D_i||^2 = s v_i z_i . (2 (W A^T)_i + s v_i (A A^T) z_i); the norm is taken
    as ||W_i|| sqrt(1 + e_i / ||W_i||^2), which is ||W_i|| exactly when the update is 0 (DoRA at
    init: c = m / norm = 1 exactly). Bytes: W cast to fp32 once (a 16-bit W; an fp32 W is used as
    it is), read for its row norms and for W A^T (one skinny fp32 GEMM); the rest is (N, r) and
    (r, r) work. Forming W + D in fp32 moves ~3x these bytes with four (N, K) fp32 temporaries.

    Shapes: weight (N, K), A (r, K), B (N, r), u (r,) or None, v (N,) or None. A row whose update
    cancels W almost exactly (||W_i + D_i|| below ~1e-3 ||W_i||) loses that many digits; 1 + e / ||W||^2
    is clamped at 0, so such a row's norm is never NaN.
    """
    ct = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(ct)
    A_ct = A.to(ct)
    z = B.to(ct) * u.to(ct) if u is not None else B.to(ct)                                      # (N, r)
    sv = v.to(ct) * scaling if v is not None else torch.full((weight.shape[0],), scaling, dtype=ct,
                                                             device=weight.device)
    # e = s v (z . (2 W A^T + s v z (A A^T)))
    e = sv * (z * torch.addmm(F.linear(w, A_ct), z * sv[:, None], A_ct @ A_ct.t(), alpha=0.5)).sum(1) * 2
    n = torch.linalg.vector_norm(w, dim=1)
    scaled = n * (1 + e / n.square()).clamp_min(0).sqrt()
    return torch.where(n > 0, scaled, e.clamp_min(0).sqrt())


def unmerged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor],
                    v: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """Inverse of :func:`merged_weight` (subtracts the same fp32 delta)."""
    return merged_weight(weight, A, B, u, v, -scaling)
