"""What the benchmark measures: the shape grids and one builder per implementation.

Every implementation of a case runs on the same inputs: x (M, K) bf16, a frozen W (N, K) and
bias, and fp32 adapters of rank r per preset (lora: A, B train; vera: u, v train; tl6: all train).
A builder returns an :class:`Impl`: the callable, the tensors fwd+bwd produces gradients for
(besides dX), the frozen tensors (kept out of the saved-activation count), the environment it
runs under, and the factors it computes (what the correctness oracle is evaluated on).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiedlora_kernels import reference, tied_lora_linear

SHAPES_KN = [(4096, 4096), (4096, 12288), (4096, 11008), (11008, 4096)]
GRIDS = {
    # The full grid (3,720 measurements: several GPU calls with --resume).
    "full": dict(M=[1, 16, 512, 4096, 16384], KN=SHAPES_KN, rank=[8, 16, 64, 128], preset=["lora", "vera", "tl6"]),
    # The target cases: M = 8192, K = N = 4096 at r = 16 / 128, plus decode (M = 1, 16).
    "targets": dict(M=[8192, 1, 16], KN=[(4096, 4096)], rank=[16, 128], preset=["lora", "vera", "tl6"]),
    # CPU smoke: tiny shapes, no speed claims.
    "smoke": dict(M=[1, 16, 64], KN=[(64, 48)], rank=[4, 8], preset=["lora", "vera", "tl6"]),
}
#: Trained tensors per preset (u / v absent, i.e. the constant 1, for lora).
PRESET_TENSORS = {"lora": dict(train=("A", "B"), u=False, v=False),
                  "vera": dict(train=("u", "v"), u=True, v=True),
                  "tl6": dict(train=("A", "B", "u", "v"), u=True, v=True)}


@dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    rank: int
    preset: str
    dtype: torch.dtype = torch.bfloat16


@dataclass
class Inputs:
    x: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    u: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    scaling: float = 1.0


@dataclass
class Impl:
    """One implementation of a case, ready to time.

    fn: ``fn(x) -> out``. params: trained tensors (their ``.grad`` is reset between timed calls).
    weights: frozen tensors whose storages are weights, not activations, when autograd saves them.
    env: environment variables set around every call, forward and backward (the kernels read them
    at call time, the backward included). factors: ``(W, b, A, B, u, v, scaling)`` the impl computes,
    for the fp32 oracle; None where there is nothing to check (the limit computes no adapter).
    info: facts recorded with each measurement (the weight's layout for the limit and merged).
    """

    fn: Callable
    params: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    factors: Optional[tuple] = None
    adapter_dtype: Optional[str] = None
    info: dict = field(default_factory=dict)


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    """Random inputs (B is random, not zero, so the adapter path does real work). Drawn on the
    device from a seeded generator: the same inputs for every impl of a case, and fast."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s, scale=1.0, dtype=torch.float32):
        return (torch.randn(*s, generator=g, device=device) * scale).to(dtype)

    spec = PRESET_TENSORS[case.preset]
    t = Inputs(
        x=rnd(case.M, case.K, dtype=case.dtype),
        W=rnd(case.N, case.K, scale=case.K ** -0.5, dtype=case.dtype),
        b=rnd(case.N, dtype=case.dtype),
        A=rnd(case.rank, case.K, scale=case.K ** -0.5),
        B=rnd(case.N, case.rank, scale=0.1),
        u=rnd(case.rank) if spec["u"] else None,
        v=rnd(case.N) if spec["v"] else None,
    )
    for name in spec["train"]:
        getattr(t, name).requires_grad_(True)
    return t


@contextmanager
def env(**kw):
    old = {k: os.environ.get(k) for k in kw}
    os.environ.update(kw)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def adapters(t: Inputs) -> list[torch.Tensor]:
    return [p for p in (t.A, t.B, t.u, t.v) if p is not None]


def trained(t: Inputs) -> list[torch.Tensor]:
    return [p for p in adapters(t) if p.requires_grad]


def frozen(t: Inputs) -> list[torch.Tensor]:
    return [t.W, t.b] + [p for p in adapters(t) if not p.requires_grad]


def factors(t: Inputs) -> tuple:
    return (t.W, t.b, t.A, t.B, t.u, t.v, t.scaling)


def _ours(t: Inputs) -> Impl:
    return Impl(lambda x: tied_lora_linear(x, t.W, t.b, t.A, t.B, t.u, t.v, t.scaling), trained(t), frozen(t),
                dict(TIEDLORA_BACKEND="triton"), factors(t), str(t.A.dtype)[6:])


def _reference(t: Inputs) -> Impl:
    return Impl(lambda x: reference.tied_lora_linear(x, t.W, t.b, t.A, t.B, t.u, t.v, t.scaling), trained(t),
                frozen(t), {}, factors(t), str(t.A.dtype)[6:])


def weight_layout(w: torch.Tensor) -> dict:
    """What cuBLAS sees of a weight: shape, strides, dtype, contiguity and the alignment of its data
    pointer (the largest power of two up to 256 bytes dividing it)."""
    ptr = w.data_ptr()
    align = 256
    while align > 1 and ptr % align:
        align //= 2
    return dict(shape=list(w.shape), stride=list(w.stride()), dtype=str(w.dtype).removeprefix("torch."),
                contiguous=w.is_contiguous(), storage_offset=w.storage_offset(), align_bytes=align)


def _limit(t: Inputs) -> Impl:
    return Impl(lambda x: F.linear(x, t.W, t.b), [], [t.W, t.b], info=dict(weight=weight_layout(t.W)))


def merged_weight(t: Inputs) -> torch.Tensor:
    """The merged weight W' = W + s diag(v) B diag(u) A in W's dtype, laid out exactly as W (checked):
    the merged layer must differ from the limit in the weight's values only."""
    d = lambda p: None if p is None else p.detach()  # noqa: E731
    Wm = reference.merged_weight(t.W, d(t.A), d(t.B), d(t.u), d(t.v), t.scaling)
    a, b = weight_layout(t.W), weight_layout(Wm)
    same = lambda lay: {k: v for k, v in lay.items() if k != "align_bytes"}  # noqa: E731
    assert same(a) == same(b), (a, b)
    assert b["align_bytes"] >= 16, b  # cuBLAS's vectorised loads need 16-byte alignment
    return Wm


def _merged(t: Inputs) -> Impl:
    d = lambda p: None if p is None else p.detach()  # noqa: E731
    Wm = merged_weight(t)
    # The oracle of the merged layer is the adapted layer itself: merging must not change the function.
    fac = (t.W, t.b, d(t.A), d(t.B), d(t.u), d(t.v), t.scaling)
    return Impl(lambda x: F.linear(x, Wm, t.b), [], [Wm, t.b], {}, fac, info=dict(weight=weight_layout(Wm)))


def _addmm(t: Inputs) -> Impl:
    """The best plain-torch recipe (unsloth's shape): cuBLAS base with the bias folded in, then one
    in-place addmm of the rank-r term, u and s folded into h and v folded into B, so the (M, N)
    output is touched by two GEMMs and no elementwise pass. addmm_ saves x and W, not ``out``, so
    writing into it in place is safe for autograd."""
    def fn(x):
        out = torch.addmm(t.b, x, t.W.t())
        h = x.to(t.A.dtype) @ t.A.t()
        z = h * (t.scaling if t.u is None else t.scaling * t.u)
        Bv = t.B if t.v is None else t.B * t.v[:, None]
        return out.addmm_(z.to(x.dtype), Bv.t().to(x.dtype))
    return Impl(fn, trained(t), frozen(t), {}, factors(t), str(t.A.dtype)[6:])


class _OneLinear(nn.Module):
    def __init__(self, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(W.shape[1], W.shape[0], dtype=W.dtype, device=W.device)
        with torch.no_grad():
            self.lin.weight.copy_(W)
            self.lin.bias.copy_(b)

    def forward(self, x):
        return self.lin(x)


def _peft_factors(model: nn.Module, kind: str) -> tuple:
    """(W, b, A, B, u, v, s) of the one PEFT layer, as its forward computes them."""
    layer = next(m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "active_adapters"))
    name = layer.active_adapters[0]
    W, b = layer.base_layer.weight, layer.base_layer.bias
    if kind == "lora":
        return W, b, layer.lora_A[name].weight, layer.lora_B[name].weight, None, None, layer.scaling[name]
    A = layer.vera_A[name][:, : layer.in_features]
    B = layer.vera_B[name][: layer.out_features, :]
    return W, b, A, B, layer.vera_lambda_d[name], layer.vera_lambda_b[name], 1.0


def _peft(kind: str):
    def build(t: Inputs) -> Impl:
        import peft

        r = t.A.shape[0]
        cfg = (peft.LoraConfig(r=r, lora_alpha=r, target_modules=["lin"], lora_dropout=0.0) if kind == "lora" else
               peft.VeraConfig(r=r, target_modules=["lin"], vera_dropout=0.0))
        model = peft.get_peft_model(_OneLinear(t.W, t.b), cfg)
        with torch.no_grad():  # non-zero B / lambda_b so the adapter path does real work
            for n, p in model.named_parameters():
                if "lora_B" in n or "vera_lambda_b" in n:
                    p.normal_(0, 0.1)
        params = [p for p in model.parameters() if p.requires_grad]
        weights = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
        return Impl(model, params, weights, {}, _peft_factors(model, kind), str(params[0].dtype)[6:])
    return build


#: impl name -> (builder, presets it runs for: "shape" = once per shape (no adapter), None = every
#: preset, or the one preset it implements). The order is the order of measurement within a case.
IMPLS: dict[str, tuple[Callable, Optional[str]]] = {
    "limit": (_limit, "shape"),
    "ours": (_ours, None),
    "merged": (_merged, None),
    "addmm": (_addmm, None),
    "peft_lora": (_peft("lora"), "lora"),
    "peft_vera": (_peft("vera"), "vera"),
    "reference": (_reference, None),
}
#: Impls that need the Triton kernels (a GPU, or the interpreter); smoke mode leaves them out.
KERNEL_IMPLS = ("ours",)


def flops(case: Case, op: str, impl: str) -> float:
    """Useful FLOPs: the base GEMM (2MNK; twice for fwd+bwd's dX) plus the adapter terms (fwd:
    h and z B^T, 2Mr(K + N); fwd+bwd adds g = Gv B and gh A for dX and dA, dB: ~3x that)."""
    M, K, N, r = case.M, case.K, case.N, case.rank
    base = 2 * M * N * K * (1 if op == "fwd" else 2)
    if impl in ("limit", "merged"):
        return base
    return base + 2 * M * r * (K + N) * (1 if op == "fwd" else 3)


def min_bytes(case: Case, op: str) -> float:
    """Compulsory traffic of the base layer in bf16: read x and W, write out (fwd); plus read G and
    W, write dX (bwd). The same figure for every impl, so GB/s compares like with like."""
    M, K, N = case.M, case.K, case.N
    e = 2
    fwd = e * (M * K + N * K + M * N)
    return fwd if op == "fwd" else fwd + e * (M * N + N * K + M * K)
