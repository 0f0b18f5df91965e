"""Argument checks shared by every implementation of the adapted linear op.

Each check raises before any kernel launches, and its message names the argument, the
expected shape/dtype/device and what was given. The shapes are those of docs/MATH.md, section 1:
x (..., K), weight (N, K), bias (N,), A (r, K), B (N, r), u (r,), v (N,), row scale c (N,).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

#: dtypes the op's tensors may have: those its kernels and the torch route compute with (float8 has
#: neither the arithmetic nor the finiteness checks).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t, shape: tuple, device: Optional[torch.device], op: str = "tied_lora_linear") -> None:
    """``t`` a floating tensor of ``shape`` on ``device`` (None: any device holding values, not meta)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (fp16/bf16/fp32/fp64), "
                        f"got {_describe(t)}")
    if tuple(t.shape) != shape:
        want = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{op}: {name} must have shape {want}, got {_describe(t)}")
    if device is None and t.is_meta:
        raise ValueError(f"{op}: {name} must hold values, got a tensor on the meta device: {_describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} (the device of x), got {_describe(t)}")


def _check_x(x, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a floating tensor (fp16/bf16/fp32/fp64), got {_describe(x)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., K), got {_describe(x)}")


def check_tied_lora_inputs(x, weight, bias, A, B, u, v, scaling, dropout_p, row_scale=None, training=True) -> None:
    """Validate the arguments of ``tied_lora_linear`` (see its docstring for the shapes)."""
    _check_x(x, "tied_lora_linear")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = _describe(weight) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"tied_lora_linear: weight must be a 2-D tensor (N, K), got {got}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"tied_lora_linear: x must have last dimension K={K} (weight is (N, K) = {tuple(weight.shape)}), "
                         f"got {_describe(x)}")
    dev = x.device
    _check_tensor("weight", weight, (N, K), dev)
    if bias is not None:
        _check_tensor("bias", bias, (N,), dev)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"tied_lora_linear: {name} dtype {t.dtype} must equal x dtype {x.dtype} "
                            "(cast the input or the layer, as for F.linear)")
    _check_adapter("tied_lora_linear", x, N, K, A, B, u, v, scaling, dropout_p, row_scale, training)


def check_tied_lora_add_inputs(x, base_out, bias, A, B, u, v, scaling, dropout_p, row_scale=None,
                               training=True) -> None:
    """Validate the arguments of ``tied_lora_add``: x (..., K), base_out (..., N) in x's dtype with
    x's leading dims, bias (N,), A (r, K), B (N, r), u (r,), v (N,), row_scale (N,)."""
    op = "tied_lora_add"
    _check_x(x, op)
    K = x.shape[-1]
    if not isinstance(B, torch.Tensor) or B.dim() != 2:
        got = _describe(B) if isinstance(B, torch.Tensor) else type(B).__name__
        raise ValueError(f"{op}: B must be a 2-D tensor (N, r), got {got}")
    N = B.shape[0]
    _check_tensor("base_out", base_out, (*x.shape[:-1], N), x.device, op)
    if bias is not None:
        _check_tensor("bias", bias, (N,), x.device, op)
    for name, t in (("base_out", base_out), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} must equal x dtype {x.dtype}")
    _check_adapter(op, x, N, K, A, B, u, v, scaling, dropout_p, row_scale, training)


def _check_adapter(op, x, N, K, A, B, u, v, scaling, dropout_p, row_scale, training) -> None:
    """A (r, K), B (N, r), u (r,), v (N,), row_scale (N,) on x's device; the scalars."""
    check_adapter_tensors(op, N, K, A, B, u, v, row_scale, x.device)
    check_scaling(op, scaling)
    if not _real(dropout_p):
        raise ValueError(f"{op}: dropout_p must be a real number (a Python or numpy scalar, not a tensor or "
                         f"bool) in [0, 1), got {dropout_p!r}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    # a bool, not any truthy value: the string "False" would switch dropout on
    if not isinstance(training, bool):
        raise TypeError(f"{op}: training must be a bool (True or False), got {training!r}")


def check_adapter_tensors(op: str, N: int, K: int, A, B, u, v, row_scale, device: Optional[torch.device]) -> int:
    """A (r, K), B (N, r), u (r,) or None, v (N,) or None, row_scale (N,) or None: floating tensors on
    ``device`` (None: any device holding values); returns the rank r. Errors start with ``op``."""
    if not isinstance(A, torch.Tensor) or A.dim() != 2:
        got = _describe(A) if isinstance(A, torch.Tensor) else type(A).__name__
        raise ValueError(f"{op}: A must be a 2-D tensor (r, K={K}), got {got}")
    r = A.shape[0]
    if r < 1:
        raise ValueError(f"{op}: rank r = A.shape[0] must be >= 1, got {_describe(A)}")
    _check_tensor("A", A, (r, K), device, op)
    _check_tensor("B", B, (N, r), device, op)
    if u is not None:
        _check_tensor("u", u, (r,), device, op)
    if v is not None:
        _check_tensor("v", v, (N,), device, op)
    if row_scale is not None:
        _check_tensor("row_scale", row_scale, (N,), device, op)
    return r


def check_scaling(op: str, scaling) -> None:
    """``scaling`` a finite real number. numbers.Real: Python and numpy scalars alike; a tensor (even
    0-dim) is refused, since the op takes the value as a constant and a tensor's gradient would be
    silently dropped; a bool is refused, not read as 0 or 1. Not checked while torch.compile traces:
    with dynamic shapes, or once a scaling changed, the value is symbolic and ``math.isfinite`` on it
    broke the graph at every adapted layer (and fullgraph failed); eager calls check it."""
    if torch.compiler.is_compiling():
        return
    if not _real(scaling) or not math.isfinite(scaling):
        raise ValueError(f"{op}: scaling must be a finite real number (a Python or numpy scalar, not a tensor "
                         f"or bool), got {scaling!r}")


def plain_float(value):
    """A checked real number as torch takes it: a Python float (a ``fractions.Fraction`` or a numpy
    float32 is no operand of ``F.dropout`` or of a tensor product), unchanged while torch.compile
    traces (``float()`` would specialise a symbolic value)."""
    return value if isinstance(value, float) or torch.compiler.is_compiling() else float(value)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def adapter_compute_dtype(x: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    """The dtype the torch route computes the adapter path in: the wider of the activation and adapter
    dtypes, fp32 in place of fp16. fp16's range ends at 65504, and h = x A^T or (h * u) B^T may pass it
    where the output does not (a small u, v or s): the kernels keep them in fp32 and stay finite, so
    the torch route must too. bf16 has fp32's range and stays bf16 (no M x K fp32 copy of x)."""
    ct = torch.promote_types(x.dtype, A.dtype)
    return torch.float32 if ct == torch.float16 else ct


__all__ = ["FLOAT_DTYPES", "check_adapter_tensors", "check_scaling", "check_tied_lora_inputs",
           "check_tied_lora_add_inputs", "adapter_compute_dtype", "plain_float"]
