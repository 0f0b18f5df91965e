"""Argument checks shared by every implementation of the adapted linear op.

Each check raises before any kernel launches, and its message names the argument, the
expected shape/dtype/device and what was given.
"""

from __future__ import annotations

import math
import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t, shape: tuple, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tied_lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"tied_lora_linear: {name} must be a floating tensor (fp16/bf16/fp32/fp64), "
                        f"got {_describe(t)}")
    if tuple(t.shape) != shape:
        want = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"tied_lora_linear: {name} must have shape {want}, got {_describe(t)}")
    if t.device != device:
        raise ValueError(f"tied_lora_linear: {name} must be on {device} (the device of x), got {_describe(t)}")


def check_tied_lora_inputs(x, weight, bias, A, B, u, v, scaling, dropout_p, row_scale=None) -> None:
    """Validate the arguments of ``tied_lora_linear`` (see its docstring for the shapes)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tied_lora_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"tied_lora_linear: x must be a floating tensor (fp16/bf16/fp32/fp64), got {_describe(x)}")
    if x.dim() < 1:
        raise ValueError(f"tied_lora_linear: x must have at least 1 dimension (..., K), got {_describe(x)}")
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
    if not isinstance(A, torch.Tensor) or A.dim() != 2:
        got = _describe(A) if isinstance(A, torch.Tensor) else type(A).__name__
        raise ValueError(f"tied_lora_linear: A must be a 2-D tensor (r, K={K}), got {got}")
    r = A.shape[0]
    if r < 1:
        raise ValueError(f"tied_lora_linear: rank r = A.shape[0] must be >= 1, got {_describe(A)}")
    _check_tensor("A", A, (r, K), dev)
    _check_tensor("B", B, (N, r), dev)
    if u is not None:
        _check_tensor("u", u, (r,), dev)
    if v is not None:
        _check_tensor("v", v, (N,), dev)
    if row_scale is not None:
        _check_tensor("row_scale", row_scale, (N,), dev)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"tied_lora_linear: scaling must be a finite float, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"tied_lora_linear: dropout_p must be in [0, 1), got {dropout_p!r}")


def adapter_compute_dtype(x: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    """The dtype the adapter path is computed in: the wider of the activation and adapter dtypes."""
    return torch.promote_types(x.dtype, A.dtype)


__all__ = ["check_tied_lora_inputs", "adapter_compute_dtype"]
