"""The adapted linear op and its backend switch.

``TIEDLORA_BACKEND`` picks the implementation of :func:`tied_lora_linear`:

- ``auto`` (default): the GPU path (cuBLAS GEMMs + this package's Triton kernels, ``ops/tied_lora.py``)
  for CUDA tensors in fp32/bf16/fp16 with a frozen base layer and a rank the device's shared memory
  fits (:func:`gpu_rank_limits`), the torch reference otherwise (CPU tensors, fp64 activations or
  adapters, a base weight that trains, a larger rank);
- ``torch``: always the reference (``tiedlora_kernels.reference``);
- ``triton``: always the GPU path. On CPU tensors this needs ``TRITON_INTERPRET=1`` set before the
  kernels are first imported (how CI checks kernel parity without a GPU).

The settings the switch reads (the environment, whether triton is installed) are read by
:func:`dispatch_settings`, which ``torch.compile`` evaluates once in Python when it traces a call,
never inside the graph: no torch version's dynamo has to trace ``os.environ`` or
``importlib.util.find_spec`` (torch 2.11's refuses the latter). A compiled model keeps the backend
it was traced with; changing ``TIEDLORA_BACKEND`` afterwards needs ``torch._dynamo.reset()``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch
from torch.autograd import forward_ad

from .. import reference
from ..validation import check_tied_lora_add_inputs, check_tied_lora_inputs, plain_float

BACKENDS = ("auto", "torch", "triton")


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    # Triton's own reading of the variable (getenv_bool): "false", "off", "no" are off
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (looked up once per process)."""
    return importlib.util.find_spec("triton") is not None


#: Shared memory per block (KiB, CUDA's opt-in maximum) by compute capability, where torch does not report it.
_SMEM_KIB = {(9, 0): 227, (8, 0): 163, (8, 7): 163, (8, 6): 99, (8, 9): 99, (7, 5): 64, (7, 0): 96}


@functools.lru_cache(maxsize=None)
def gpu_rank_limits() -> tuple[int, ...]:
    """Per visible CUDA device, the largest rank the GPU path's kernels fit in its shared memory.

    Compiled for each architecture without running (``bench.compile_report``), a training step's
    kernels need about 40 KiB at rank 32, 80 at 64, 110 at 128, 136-208 at 256 and over 227 at 512:
    rank <= 128 on sm_80/sm_90 (163/227 KiB), <= 64 on sm_86/89 (99 KiB), <= 32 below. Above it
    ``auto`` takes the torch path and ``triton`` raises."""
    limits = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        smem = getattr(props, "shared_memory_per_block_optin", 0) // 1024 or _SMEM_KIB.get((props.major, props.minor), 64)
        limits.append(128 if smem >= 160 else 64 if smem >= 96 else 32)
    return tuple(limits)


def dispatch_settings() -> tuple[str, bool, bool, tuple[int, ...]]:
    """(``TIEDLORA_BACKEND``, triton installed, ``TRITON_INTERPRET`` set, :func:`gpu_rank_limits`):
    everything the switch reads besides the tensors. Under ``torch.compile`` dynamo calls this in
    Python and bakes the result into the graph instead of tracing it."""
    want = os.environ.get("TIEDLORA_BACKEND", "auto").strip().lower() or "auto"
    return want, triton_available(), triton_interpreting(), gpu_rank_limits()


# What ``torch.compiler.assume_constant_result`` marks (dynamo then calls the function instead of
# tracing it), set here directly: that decorator imports dynamo, ~0.9 s added to every import of
# this package. tests/ops/test_dispatch.py compiles the dispatch with fullgraph=True and fails if
# a torch release stops honouring the mark.
dispatch_settings._dynamo_marked_constant = True


def resolve_backend(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    rank: int = 1, operands: tuple = (), op: str = "tied_lora_linear") -> str:
    """The backend that will run for activations ``x`` (and base ``weight``/``bias``, adapter ``rank``
    and the op's other ``operands``: A, B, u, v, row_scale, base_out; None entries allowed):
    ``"torch"`` or ``"triton"``.

    Raises (before any launch) when ``TIEDLORA_BACKEND`` is unknown, or is ``triton`` and the inputs
    cannot run there; the message names ``op``, the argument and what the GPU path needs."""
    want, installed, interpreting, rank_limits = dispatch_settings()
    rank_limit = rank_limits[x.device.index] if x.is_cuda and x.device.index is not None and \
        x.device.index < len(rank_limits) else None
    if want not in BACKENDS:
        raise ValueError(f"TIEDLORA_BACKEND must be one of {BACKENDS}, got {want!r}")
    if want == "torch":
        return "torch"
    # auto: a base that requires grad takes the torch route under no_grad too, so that reentrant
    # checkpointing's no-grad forward and its recompute draw the same dropout mask
    base_trains = any(t is not None and t.requires_grad for t in (weight, bias))
    present = [t for t in operands if t is not None]
    wide_operand = any(t.dtype == torch.float64 for t in present)  # the kernels compute in fp32 at most
    # torch.jit.trace records tensor ops as they run, sizes as tensors: the kernels' launchers cannot run
    # under it, and the torch route traces as it is
    jit_tracing = torch.jit.is_tracing()
    if want == "auto":
        fits = (x.is_cuda and installed and x.layout == torch.strided and x.dtype != torch.float64
                and not wide_operand and not base_trains
                and (rank_limit is None or rank <= rank_limit) and not _transformed(x, weight, bias, *present)
                and not jit_tracing)
        return "triton" if fits else "torch"
    if jit_tracing:
        raise RuntimeError(f"{op} (triton): torch.jit.trace cannot record the Triton kernels; use "
                           "TIEDLORA_BACKEND=auto or torch (the torch route traces), or torch.export")
    if not installed:
        raise RuntimeError("TIEDLORA_BACKEND=triton but the triton package is not installed")
    if not x.is_cuda and not interpreting:
        raise RuntimeError(f"{op} (triton): x must be a CUDA tensor, got device {x.device}; "
                           "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU "
                           "interpreter, or use TIEDLORA_BACKEND=torch")
    if x.layout != torch.strided:
        raise TypeError(f"{op} (triton): x must be a dense (strided) tensor on the Triton backend, got layout "
                        f"{x.layout}; use TIEDLORA_BACKEND=torch (or auto), or x.to_dense()")
    if x.dtype == torch.float64:
        raise TypeError(f"{op} (triton): x must be float32, bfloat16 or float16 on the Triton "
                        f"backend, got dtype {x.dtype}; use TIEDLORA_BACKEND=torch (or auto) for float64")
    if wide_operand:
        raise TypeError(f"{op} (triton): the adapter tensors (A, B, u, v, row_scale) must be float32, bfloat16 or "
                        "float16 on the Triton backend (its kernels compute in fp32 at most), got a float64 one; "
                        "use TIEDLORA_BACKEND=torch (or auto)")
    if _transformed(x, weight, bias, *present):
        raise RuntimeError(f"{op} (triton): forward-mode AD (torch.autograd.forward_ad) and torch.func transforms "
                           "(grad, vmap, jvp) have no Triton kernels; use TIEDLORA_BACKEND=auto or torch")
    for name, t in (("weight", weight), ("bias", bias)):
        if torch.is_grad_enabled() and t is not None and t.requires_grad:
            raise ValueError(f"{op} (triton): {name} requires grad, but the kernels treat the base "
                             "layer as frozen; freeze it, or use TIEDLORA_BACKEND=torch to train it")
    if rank_limit is not None and rank > rank_limit:
        raise ValueError(f"{op} (triton): rank r = A.shape[0] = {rank} is above {rank_limit}, the largest "
                         f"the kernels' tiles fit in {x.device}'s shared memory; use TIEDLORA_BACKEND=auto or torch")
    return "triton"


def _transformed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether forward-mode AD or a torch.func transform is at work on the call: the kernels have no
    forward-mode derivative (forward_ad tangents would be dropped silently) and take no functorch-wrapped
    tensors. Under torch.compile neither is traced: dynamo runs its own transforms on the graph it records."""
    if torch.compiler.is_compiling():
        return False
    return forward_ad._current_level >= 0 or any(
        t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def autocast_base(x, *base):
    """Under ``torch.autocast``: x and the base layer's tensors (weight or base output, bias) cast to
    the autocast dtype, as ``F.linear`` casts its operands; the adapter tensors keep their dtype (fp32
    adapters are what mixed precision wants). Outside autocast (or for non-tensors, fp64): unchanged."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return (x, *base)
    device = x.device.type
    if device not in reference.AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return (x, *base)
    dtype = torch.get_autocast_dtype(device)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return (cast(x), *(cast(t) for t in base))


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
    magnitude of DoRA and Simple DoRA. The math and the gradients: docs/MATH.md.

    Args:
        x: (..., K) activations, any leading dims and strides; fp32, bf16 or fp16 (fp64: torch backend).
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
    x, weight, bias = autocast_base(x, weight, bias)
    check_tied_lora_inputs(x, weight, bias, A, B, u, v, scaling, dropout_p, row_scale, training)
    if resolve_backend(x, weight, bias, A.shape[0], (A, B, u, v, row_scale)) == "triton":
        from .tied_lora import tied_lora_linear_triton

        return tied_lora_linear_triton(x, weight, bias, A, B, u, v, float(scaling), float(dropout_p), training,
                                       row_scale=row_scale)
    return reference.unchecked_tied_lora_linear(x, weight, bias, A, B, u, v, plain_float(scaling),
                                                plain_float(dropout_p), training, row_scale)


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
    """The adapter over a base layer that computes its own output (a quantized linear):
    out = c * (base_out + s * (((dropout(x) A^T) * u) B^T) * v) + b, with c = 1 when ``row_scale`` is None.

    On the GPU: one pass over x, one read of ``base_out``, one write of out (the adapter_term kernel
    with ``base_out`` as its addend); the base layer's own autograd gives its part of dx.

    Args:
        x: (..., K) the base layer's input. base_out: (..., N) the base layer's output for x, without
            its bias, x's dtype, differentiable (its gradient is G, or G * c).
        bias: (N,) or None, added last. A, B, u, v, scaling, dropout_p, training, row_scale: as in
            :func:`tied_lora_linear`.

    Returns:
        (..., N) in x's dtype.
    """
    x, base_out, bias = autocast_base(x, base_out, bias)
    check_tied_lora_add_inputs(x, base_out, bias, A, B, u, v, scaling, dropout_p, row_scale, training)
    if resolve_backend(x, None, bias, A.shape[0], (A, B, u, v, row_scale, base_out), op="tied_lora_add") == "triton":
        from .tied_lora import tied_lora_add_triton

        return tied_lora_add_triton(x, base_out, bias, A, B, u, v, float(scaling), float(dropout_p), training,
                                    row_scale=row_scale)
    return reference.unchecked_tied_lora_add(x, base_out, bias, A, B, u, v, plain_float(scaling),
                                             plain_float(dropout_p), training, row_scale)
