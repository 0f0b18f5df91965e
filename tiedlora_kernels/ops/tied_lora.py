"""The adapted linear layer on the GPU: cuBLAS does the two big GEMMs, this package's kernels do
everything cuBLAS cannot. In a traced graph (``torch.compile``, ``torch.export``, compiled
autograd, ``make_fx``: ``_tracing``) the layer is one ``torch.library`` custom op with its autograd
formula (``fullgraph=True`` sees one node, no graph break); in eager mode the same forward and
backward run as a plain ``autograd.Function`` (``_EagerTiedLoRA``), whose dispatch costs a
fraction of the custom op's on the host.

Formula (docs/MATH.md), x flattened to (M, K), W (N, K), A (r, K), B (N, r), u (r,), v (N,):

    out = x W^T + b + s * ((dropout(x) A^T * u) B^T) * v
    with a row scale c (N,): y = x W^T + s * (...) * v, out = c * y + b   (DoRA / Simple DoRA)

Forward (2 launches; 3 with a row scale; 1 for at most ``FUSED_DECODE_MAX_ROWS`` rows when no h or y
is kept, ``decode_linear``: the base GEMV and the adapter in one pass over W, off until a GPU measures it):
    L, h = adapter_term(x)           L = s ((x_d A^T) * u) (B v)^T + b in x's dtype, h = x_d A^T fp32
    out  = L.addmm_(x, W^T)          cuBLAS with beta = 1: the adapter term enters through the
                                     GEMM's epilogue read of C, out lives in L's buffer
    row scale: L has no b; y = L.addmm_(x, W^T); out = b + y * c (one elementwise pass, fp32 math)
Backward, G = dL/dout (M, N):
    row scale: G, dc = G * c, sum_rows(G * y)       row_scale_grad: one pass over G and y
    Ldx, g = adapter_term(G)        g = G (B v) fp32, Ldx = s (g * u) A * keep / (1 - p)
    dx = Ldx.addmm_(G, W)           cuBLAS with beta = 1
    dA, dB, dv, du = grad_factors(x, G, h, g)   one launch: a pass over x for dA (dropout mask
                                    regenerated from the seed) and one more over G (with h, g) for
                                    dB, dv, du; then grad_finish sums the partials and writes the
                                    four gradients in their dtypes

Over a base layer that computes its own output E (a quantized layer: ``tied_lora_add``), there is
no weight: adapter_term adds E in its epilogue (out = E + L, or y = E + L with a row scale), dx
is Ldx alone (the base layer's autograd adds its own part), and E's gradient is G (G * c).

Saved for backward: h (M, r) fp32 only when B, u or v trains; x only when A trains (nothing of
size M x K is kept when A is frozen); y (M, N) only when a row scale trains; the frozen weight
and the adapter tensors (parameters: no copies); the dropout seed (one int64), never the mask.
Nothing is saved under no_grad. Frozen tensors launch nothing. All accumulation is fp32;
gradients are returned in each parameter's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import decode_linear as fused_decode
from .adapter_term import adapter_term
from .dropout import draw_dropout_seed
from .grad_factors import grad_factors
from .row_scale_grad import row_scale_grad


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one (a model spread over
    several GPUs, e.g. ``device_map="auto"``, calls layers on each)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward_impl(x, weight, base_out, bias, A, B, u, v, row_scale, seed, scaling, dropout_p, store_h, store_y):
    """(out (M, N), h (M, r) fp32 or (0, r), y (M, N) or (0, N)) for x (M, K) and either the base
    weight (N, K) or the base layer's output ``base_out`` (M, N); see the module docstring."""
    with _on_device_of(x):
        return _forward_on_device(x, weight, base_out, bias, A, B, u, v, row_scale, seed, scaling, dropout_p,
                                  store_h, store_y)


def _forward_on_device(x, weight, base_out, bias, A, B, u, v, row_scale, seed, scaling, dropout_p, store_h, store_y):
    M, r, N = x.shape[0], A.shape[0], B.shape[0]
    no_h = lambda: x.new_empty((0, r), dtype=torch.float32)  # noqa: E731  (allocated only where returned)
    no_y = lambda: x.new_empty((0, N))  # noqa: E731
    if M == 0:
        return x.new_empty((0, N)), no_h(), no_y()
    if M <= fused_decode.FUSED_DECODE_MAX_ROWS and weight is not None and not (store_h or store_y) \
            and dropout_p == 0:
        # a few rows, no h or y to keep (inference; or only x / A train: their gradients need x alone)
        out = fused_decode.decode_linear(x, weight, bias, A, B, u, v, row_scale, scaling)
        return out, no_h(), no_y()
    lead_bias = bias if row_scale is None else None  # with a row scale the bias comes after the scale
    L, h = adapter_term(x, A, B, u, v, lead_bias, scaling, dropout_p, seed, in_dropout=dropout_p > 0,
                        out_dropout=False, store_h=store_h, addend=base_out)
    y = L.addmm_(x, weight.t()) if weight is not None else L
    h = h if h is not None else no_h()
    if row_scale is None:
        return y, h, no_y()
    out = torch.empty_like(y)  # b + y * c computed in fp32 (c may be fp32 on bf16 y), rounded once
    if bias is not None:
        torch.addcmul(bias, y, row_scale, out=out)
    else:
        torch.mul(y, row_scale, out=out)
    return out, h, (y if store_y else no_y())


@torch.library.custom_op("tiedlora::tied_lora_linear_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: Optional[torch.Tensor], base_out: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                row_scale: Optional[torch.Tensor], seed: Optional[torch.Tensor], scaling: float, dropout_p: float,
                store_h: bool, store_y: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> (out (M, N) in x's dtype, h (M, r) fp32 or (0, r) unless ``store_h``, pre-scale
    y (M, N) in x's dtype or (0, N) unless ``store_y``). Exactly one of ``weight`` (N, K) and
    ``base_out`` (M, N) is given."""
    return _forward_impl(x, weight, base_out, bias, A, B, u, v, row_scale, seed, scaling, dropout_p, store_h,
                         store_y)


@_forward_op.register_fake
def _(x, weight, base_out, bias, A, B, u, v, row_scale, seed, scaling, dropout_p, store_h, store_y):
    M, r, N = x.shape[0], A.shape[0], B.shape[0]
    return (x.new_empty((M, N)), x.new_empty((M if store_h else 0, r), dtype=torch.float32),
            x.new_empty((M if store_y and row_scale is not None else 0, N)))


def _backward_impl(G, x, weight, A, B, u, v, row_scale, h, y, seed, scaling, dropout_p, needs):
    """[dx, dA, dB, du, dv, dc, G * c] for ``needs``, None where not needed; see ``_backward_op``."""
    with _on_device_of(G):
        return _backward_on_device(G, x, weight, A, B, u, v, row_scale, h, y, seed, scaling, dropout_p, needs)


def _backward_on_device(G, x, weight, A, B, u, v, row_scale, h, y, seed, scaling, dropout_p, needs):
    need_x, need_a, need_b, need_u, need_v, need_c, need_gs = needs
    M, K = G.shape[0], A.shape[1]
    if M == 0:  # empty batch: zero gradients, no launch
        # contiguous, as the fake kernel says (zeros_like would keep a transposed factor's strides)
        zeros = lambda t, need: torch.zeros(t.shape, dtype=t.dtype, device=t.device) if need else None  # noqa: E731
        return [G.new_zeros((0, K)) if need_x else None, zeros(A, need_a), zeros(B, need_b),
                zeros(u, need_u), zeros(v, need_v), zeros(row_scale, need_c),
                G.new_zeros(G.shape) if need_gs else None]
    dc = gs = None
    if row_scale is not None:
        # out = c * y + b: one pass gives dL/dy = G * c, which every other gradient is taken from, and dc.
        G, dc = row_scale_grad(G, y, row_scale, need_gs=any(needs[:5]) or need_gs, need_dc=need_c)
        gs = G if need_gs else None
    dropping = dropout_p > 0
    dx = g = None
    if need_x or need_a or need_u:
        # g = G (B v) is the "h" of dx's adapter term: adapter_term with roles (G, (B v)^T, A^T, u),
        # the dropout mask on its output columns (x's shape).
        Ldx, g = adapter_term(G, B.t(), A.t(), u, None, None, scaling, dropout_p, seed, in_dropout=False,
                              out_dropout=dropping, store_h=need_a or need_u, write_out=need_x, down_scale=v)
        if need_x:
            dx = Ldx.addmm_(G, weight) if weight is not None else Ldx
    da = du = db = dv = None
    if need_a or need_b or need_v or need_u:
        da, db, dv, du = grad_factors(x, G, h, g, A, B, u, v, scaling, dropout_p, seed, dropping,
                                      need_a, need_b, need_v, need_u)
    # dA, dB, du, dv come in their parameters' dtypes (grad_finish); dc is an fp32 sum
    return [dx, da, db, du, dv, dc.to(row_scale.dtype) if dc is not None else None, gs]


@torch.library.custom_op("tiedlora::tied_lora_linear_backward", mutates_args=())
def _backward_op(G: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor], A: torch.Tensor,
                 B: torch.Tensor,
                 u: Optional[torch.Tensor], v: Optional[torch.Tensor], row_scale: Optional[torch.Tensor],
                 h: Optional[torch.Tensor], y: Optional[torch.Tensor], seed: Optional[torch.Tensor], scaling: float,
                 dropout_p: float, needs: list[bool]) -> list[torch.Tensor]:
    """[dx (M, K), dA, dB, du, dv, dc, G * c (M, N)] for ``needs`` = (x, A, B, u, v, row_scale, the
    base output's G * c); an unneeded one is a 0-element tensor.

    G (M, N) any strides; x (M, K) (None unless A trains); weight (N, K) or None (a base layer that
    computes its own output: dx is the adapter's part only); h (M, r) fp32 (None unless B, u or v
    trains); y (M, N) the pre-scale output (None unless the row scale trains).
    """
    grads = _backward_impl(G, x, weight, A, B, u, v, row_scale, h, y, seed, scaling, dropout_p, needs)
    # A custom op returns tensors that do not alias each other: each unneeded slot its own empty one.
    return [t if t is not None else G.new_empty(0) for t in grads]


@_backward_op.register_fake
def _(G, x, weight, A, B, u, v, row_scale, h, y, seed, scaling, dropout_p, needs):
    like = lambda t, need: t.new_empty(t.shape) if need else G.new_empty(0)  # noqa: E731
    return [G.new_empty((G.shape[0], A.shape[1])) if needs[0] else G.new_empty(0),
            like(A, needs[1]), like(B, needs[2]), like(u, needs[3]), like(v, needs[4]), like(row_scale, needs[5]),
            like(G, needs[6])]


def _setup_context(ctx, inputs, output):
    x, weight, base_out, bias, A, B, u, v, row_scale, seed, scaling, dropout_p, store_h, store_y = inputs
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.has_u, ctx.has_v, ctx.has_c = u is not None, v is not None, row_scale is not None
    # h and y are saved state, never used downstream: no zero-filled (M, N) gradient for y.
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    # x only feeds dA: with A frozen nothing of size M x K stays alive (h, (M, r), is kept instead);
    # y (M, N) only when the row scale trains (its gradient is sum_rows(G * y)).
    ctx.save_for_backward(x if A.requires_grad else None, weight, A, B, u, v, row_scale,
                          output[1] if store_h else None, output[2] if store_y else None, seed)


def _gradients(ctx, grad_out, run_backward):
    """The 14 input gradients of the forward from dL/dout; ``run_backward`` is ``_backward_op`` (the
    custom op, what a compiled graph records) or ``_backward_impl`` (its body, eager mode)."""
    if torch.is_grad_enabled():
        # create_graph=True: the backward op has no derivative of its own.
        raise RuntimeError("tied_lora_linear (triton): double backward (autograd.grad / backward with "
                           "create_graph=True) is not supported by the Triton kernels; use TIEDLORA_BACKEND=torch "
                           "for higher-order gradients")
    functorch = torch._C._functorch
    # (compiled autograd traces this backward: it cannot call these checks, nor does it batch gradients)
    if grad_out is not None and not torch.compiler.is_compiling() and (
            functorch.is_legacy_batchedtensor(grad_out) or functorch.is_functorch_wrapped_tensor(grad_out)):
        # The forward ran plain (so the kernels), the backward batched: a batched tensor has no
        # storage for the kernels to read.
        raise RuntimeError("tied_lora_linear (triton): batched gradients (autograd.grad(is_grads_batched=True), "
                           "torch.autograd.functional.jacobian/hessian(vectorize=True)) have no Triton kernels; "
                           "use TIEDLORA_BACKEND=torch, or vectorize=False")
    x, weight, A, B, u, v, row_scale, h, y, seed = ctx.saved_tensors
    ni = ctx.needs_input_grad
    need_base = ni[2]  # the base layer's own output (tied_lora_add): its gradient is G, or G * c
    needs = [ni[0], ni[4], ni[5], ctx.has_u and ni[6], ctx.has_v and ni[7], ctx.has_c and ni[8],
             need_base and ctx.has_c]
    if grad_out is None:
        return (None,) * 14
    if not any(needs):  # only the base output's gradient, and no row scale: it is G itself
        return (None, None, grad_out if need_base else None) + (None,) * 11
    grads = run_backward(grad_out, x, weight, A, B, u, v, row_scale, h, y, seed, ctx.scaling, ctx.dropout_p, needs)
    dx, da, db, du, dv, dc, gs = (t if need else None for t, need in zip(grads, needs))
    d_base = (gs if ctx.has_c else grad_out) if need_base else None
    return dx, None, d_base, None, da, db, du, dv, dc, None, None, None, None, None


def _compiled_backward(ctx, grad_out, grad_h, grad_y):
    return _gradients(ctx, grad_out, _backward_op)


_forward_op.register_autograd(_compiled_backward, setup_context=_setup_context)


class _EagerTiedLoRA(torch.autograd.Function):
    """Eager mode's autograd node: the custom op's forward, context and backward, without the custom
    op's dispatch. That dispatch (schema binding, redispatch through the autograd and backend keys,
    dynamo's disable wrapper) costs about as much host time as the kernels' own launches, twice per
    layer and step (forward and backward); a training step that is host-bound pays it in full.
    A traced graph records the custom op instead (``_run``, ``_tracing``): one opaque node.
    The context is set up inside ``forward`` (not in a ``setup_context``): with one, every
    ``apply`` binds its arguments through ``inspect.signature``, tens of microseconds a call."""

    @staticmethod
    def forward(ctx, *args):
        output = _forward_impl(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_h, grad_y):
        # Compiled autograd traces this backward with dynamo even when the forward ran eagerly.
        return _gradients(ctx, grad_out, _backward_op if _tracing() else _backward_impl)


def _tracing() -> bool:
    """Whether this call is being traced into a graph (``torch.compile``, ``torch.export``, compiled
    autograd, or a ``make_fx`` / AOTAutograd trace without dynamo): the graph must record the custom
    ops, never the Triton launches inside them."""
    return (torch.compiler.is_compiling()
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None)


def tied_lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                            B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor], scaling: float,
                            dropout_p: float, training: bool, *, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The GPU implementation of :func:`tiedlora_kernels.ops.tied_lora_linear` (inputs validated, and
    the route checked, by it).

    Args:
        x: (..., K) fp32/bf16/fp16, any leading dims and strides (flattened with ``reshape``: a view
            whenever the leading dims merge, a copy otherwise; the kernels take any 2-D strides).
        weight: (N, K) frozen, x's dtype, any strides (HF ``Conv1D``'s ``weight.t()`` is read in place).
        bias: (N,) frozen or None.
        A: (r, K); B: (N, r); u: (r,) or None; v: (N,) or None: fp32 or x's dtype, trained or frozen.
        scaling: s. dropout_p: dropout on the adapter input, applied only when ``training``; the
            Philox seed is drawn from torch's generator (see :func:`draw_dropout_seed`).
        row_scale: c (N,) or None: out = c * (x W^T + adapter) + b; when it trains, the pre-scale
            output (M, N) is kept for its gradient.

    Returns:
        (..., N) in x's dtype, differentiable in x, A, B, u, v, row_scale (whichever require grad).
    """
    return _run(x, weight, None, bias, A, B, u, v, scaling, dropout_p, training, row_scale)


def tied_lora_add_triton(x: torch.Tensor, base_out: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                         B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor], scaling: float,
                         dropout_p: float, training: bool, *, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The GPU implementation of :func:`tiedlora_kernels.ops.tied_lora_add`: out = c * (base_out +
    s * (((dropout(x) A^T) * u) B^T) * v) + b, one pass over x, one read of base_out, one write.

    Args:
        x: (..., K); base_out: (..., N) the base layer's output without its bias, x's dtype, any strides,
            differentiable (its gradient is G, or G * c). Others as in :func:`tied_lora_linear_triton`.
    """
    return _run(x, None, base_out, bias, A, B, u, v, scaling, dropout_p, training, row_scale)


def _run(x, weight, base_out, bias, A, B, u, v, scaling, dropout_p, training, row_scale):
    p = float(dropout_p) if training else 0.0
    K, N = x.shape[-1], B.shape[0]
    rows = _rows(x)
    x2 = x.reshape(rows, K)  # reshape(-1, K) is ambiguous when K = 0
    e2 = base_out.reshape(rows, N) if base_out is not None else None
    seed = draw_dropout_seed(x.device) if p > 0 else None
    # Saved state only where a backward can follow (not under no_grad / inference_mode).
    grad = torch.is_grad_enabled()
    store_h = grad and (B.requires_grad or any(t is not None and t.requires_grad for t in (u, v)))
    store_y = grad and row_scale is not None and row_scale.requires_grad
    args = (x2, weight, e2, bias, A, B, u, v, row_scale, seed, float(scaling), p, bool(store_h), bool(store_y))
    differentiable = grad and any(t is not None and t.requires_grad for t in (x, base_out, A, B, u, v, row_scale))
    if _tracing():
        out = _forward_op(*args)[0]
    elif differentiable:
        out = _EagerTiedLoRA.apply(*args)[0]
    else:  # inference, eager: no autograd node at all
        out = _forward_impl(*args)[0]
    return out.reshape(*x.shape[:-1], N)


def _rows(x: torch.Tensor) -> int:
    """Rows of x (..., K) flattened to 2-D: the product of its leading dims."""
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return rows


__all__ = ["tied_lora_linear_triton", "tied_lora_add_triton"]
