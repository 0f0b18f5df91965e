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
        dtype, fp32 for fp16 (fp32 adapters on bf16 activations compute the path in fp32, as PEFT does;
        fp16 intermediates would overflow where the kernels' fp32 ones do not); the row
        scale multiplies the rounded pre-scale output in the wider of x's and c's dtype.
    """
    check_tied_lora_inputs(x, weight, bias, A, B, u, v, scaling, dropout_p, row_scale, training)
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
    check_tied_lora_add_inputs(x, base_out, bias, A, B, u, v, scaling, dropout_p, row_scale, training)
    return unchecked_tied_lora_add(x, base_out, bias, A, B, u, v, scaling, dropout_p, training, row_scale)


def unchecked_tied_lora_add(x, base_out, bias, A, B, u, v, scaling, dropout_p, training, row_scale):
    """:func:`tied_lora_add` on inputs the caller has validated."""
    out = base_out + _adapter_delta(x, A, B, u, v, scaling, dropout_p, training)
    if row_scale is None and bias is not None:
        out = out + bias
    return _scale_and_bias(out, row_scale, bias)


def _adapter_delta(x, A, B, u, v, scaling, dropout_p, training) -> torch.Tensor:
    """s * (((dropout(x) A^T) * u) B^T) * v computed in :func:`adapter_compute_dtype`, cast to x's
    (under torch.autocast too: autocast would otherwise run these products in its lower dtype)."""
    ct = adapter_compute_dtype(x, A)
    with autocast_off(x.device.type):
        # (torch draws no dropout mask over a sparse tensor: a sparse x is dropped out densified)
        xd = F.dropout(x if x.layout == torch.strided else x.to_dense(), dropout_p) if dropout_p > 0 and training else x
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
                  v: Optional[torch.Tensor], scaling: float, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W' = c * (W + s * diag(v) B diag(u) A), computed in fp32 (fp64 for fp64 weights) and rounded
    to W's dtype once.

    Shapes: weight (N, K), A (r, K), B (N, r), u (r,) or None, v (N,) or None, row_scale c (N,) or
    None (constant 1).
    """
    wide = _merged_wide(weight, A, B, u, v, scaling)
    if row_scale is not None:
        wide.mul_(row_scale.to(wide.device, wide.dtype)[:, None])
    return wide.to(weight.dtype)


def _merged_wide(weight, A, B, u, v, scaling) -> torch.Tensor:
    """W + s diag(v) B diag(u) A in fp32 (fp64 for fp64 weights), laid out as W: W's wide copy with
    the rank-r product added by one GEMM's epilogue (``addmm_``, beta = 1)."""
    ct = torch.promote_types(weight.dtype, torch.float32)
    Bm = B.to(ct)
    if u is not None:
        Bm = Bm * u.to(ct)
    if v is not None:
        Bm = Bm * v.to(ct)[:, None]
    return weight.to(ct, copy=True).addmm_(Bm, A.to(ct), alpha=scaling)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 at least (fp64 stays fp64): where what is derived from 16-bit adapters is formed."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_2 per row (N,) of weight (N, K), fp32 (fp64 for fp64 weights), unrounded: DoRA's
    magnitude starts at this value and its row scale is m / :func:`merged_row_norm`, which at init
    (a zero update) reduces the same wide values in the same layout: c = 1 exactly."""
    return torch.linalg.vector_norm(at_least_fp32(weight), dim=1)


def direction_norm(norm: torch.Tensor) -> torch.Tensor:
    """A row norm or row scale (N,) to divide by, with 0 replaced by 1: a zero row (a pruned output
    row, a zero padding row) has no direction, and W0 = W / 1 keeps it zero where W / 0 is 0/0 = NaN."""
    return torch.where(norm == 0, torch.ones_like(norm), norm)


def dora_row_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """DoRA's row scale c = m / norm (N,), in fp32 at least (a bf16 m divided in bf16 put the logits
    3e-3 relative off float64 where every other preset is ~2e-7), the norm through
    :func:`direction_norm` (c = m on a zero row: m starts at the norm, 0, so the row starts at its
    base output)."""
    return at_least_fp32(magnitude) / direction_norm(at_least_fp32(norm))


def merged_row_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor],
                    v: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """||W + s diag(v) B diag(u) A||_2 per row (N,) (DoRA's norm), fp32 (fp64 for fp64 weights).

    W + D formed once in fp32 (:func:`_merged_wide`: W's wide copy, then one ``addmm_``) and its row
    norms taken: three launches for a 16-bit W and fp32 factors, ~18 bytes moved per weight element.
    (The norm by expansion, ||W||^2 + 2 <W, D> + ||D||^2 from W A^T, moves fewer bytes but takes
    ~15 small launches, more than a host-bound training step affords per layer.)

    Shapes: weight (N, K), A (r, K), B (N, r), u (r,) or None, v (N,) or None.
    """
    return torch.linalg.vector_norm(_merged_wide(weight, A, B, u, v, scaling), dim=1)


def unmerged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor],
                    v: Optional[torch.Tensor], scaling: float, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of :func:`merged_weight`: W'/c minus the same delta, in fp32, rounded once. Rows
    with c = 0 cannot be inverted (W' is 0 there): they come back as minus the delta, and the caller
    restores them from a copy kept at merge time."""
    ct = torch.promote_types(weight.dtype, torch.float32)
    wide = weight.to(ct)
    if row_scale is not None:
        wide = wide / direction_norm(row_scale.to(wide.device, ct))[:, None]
    return _merged_wide(wide, A, B, u, v, -scaling).to(weight.dtype)
