"""Optional CUDA extension (``csrc/``): the decode adapter epilogue as ``torch.ops.tiedlora_C``.

Built only on request (``TIEDLORA_BUILD_CUDA=1 pip install --no-build-isolation -e .``); the
Triton kernels are the default path and need nothing from here.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch


@functools.cache
def available() -> bool:
    """True when the compiled extension ``tiedlora_kernels._C`` is importable."""
    try:
        from .. import _C  # noqa: F401
    except ImportError:
        return False
    return True


def decode_epilogue_(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     u: Optional[torch.Tensor], v: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """In place: out (M, N) += s * ((x A^T) * u) B^T * v for x (M, K); returns h = x A^T (M, r) in fp32."""
    if not available():
        raise RuntimeError("the tiedlora CUDA extension is not built: reinstall with TIEDLORA_BUILD_CUDA=1 "
                           "pip install --no-build-isolation -e .")
    return torch.ops.tiedlora_C.decode_epilogue_(out, x, A, B, u, v, float(scaling))
