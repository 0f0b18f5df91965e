"""What the benchmark measures: the shape grids and one builder per implementation.

Every implementation of a case runs on the same inputs: x (M, K) bf16, a frozen W (N, K) and
bias, and adapters of rank r per preset (lora: A, B train; vera: u, v train; tl6: all train).
A builder returns ``(fn, params)``: ``fn(x) -> out`` and the trained tensors fwd+bwd produces
gradients for (besides dX).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiedlora_kernels import reference, tied_lora_linear

SHAPES_KN = [(4096, 4096), (4096, 12288), (4096, 11008), (11008, 4096)]
GRIDS = {
    # The full grid.
    "full": dict(M=[1, 16, 512, 4096, 16384], KN=SHAPES_KN, rank=[8, 16, 64, 128], preset=["lora", "vera", "tl6"]),
    # The target cases: M = 8192, K = N = 4096 at r = 16 / 128, plus decode.
    "targets": dict(M=[1, 16, 8192], KN=[(4096, 4096)], rank=[16, 128], preset=["lora", "tl6"]),
    # CPU smoke: tiny shapes, no speed claims.
    "smoke": dict(M=[1, 16, 64], KN=[(64, 48)], rank=[4, 8], preset=["lora", "vera", "tl6"]),
}
#: Trained tensors per preset (u / v absent for lora).
PRESET_TENSORS = {"lora": dict(train=("A", "B"), u=False, v=False),
                  "vera": dict(train=("u", "v"), u=True, v=True),
                  "tl6": dict(train=("A", "B", "u", "v"), u=True, v=True)}


@dataclass
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


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    """Random inputs (fresh, never zeros: B is random so the adapter path does real work)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    spec = PRESET_TENSORS[case.preset]
    t = Inputs(
        x=rnd(case.M, case.K).to(device, case.dtype),
        W=(rnd(case.N, case.K) / case.K**0.5).to(device, case.dtype),
        b=rnd(case.N).to(device, case.dtype),
        A=(rnd(case.rank, case.K) / case.K**0.5).to(device),
        B=(rnd(case.N, case.rank) * 0.1).to(device),
        u=rnd(case.rank).to(device) if spec["u"] else None,
        v=rnd(case.N).to(device) if spec["v"] else None,
    )
    for name in spec["train"]:
        getattr(t, name).requires_grad_(True)
    return t


@contextmanager
def env(**kw):
    old = {k: os.environ.get(k) for k in kw}
    os.environ.update({k: v for k, v in kw.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def trained(t: Inputs) -> list[torch.Tensor]:
    return [p for p in (t.A, t.B, t.u, t.v) if p is not None and p.requires_grad]


def _ours(path: str):
    def build(t: Inputs):
        def fn(x):
            with env(TIEDLORA_BACKEND="triton", TIEDLORA_FWD_PATH=path):
                return tied_lora_linear(x, t.W, t.b, t.A, t.B, t.u, t.v, t.scaling)
        return fn, trained(t)
    return build


def _reference(t: Inputs):
    return (lambda x: reference.tied_lora_linear(x, t.W, t.b, t.A, t.B, t.u, t.v, t.scaling)), trained(t)


def _limit(t: Inputs):
    return (lambda x: F.linear(x, t.W, t.b)), []


def _merged(t: Inputs):
    Wm = reference.merged_weight(t.W, t.A.detach(), t.B.detach(), None if t.u is None else t.u.detach(),
                                 None if t.v is None else t.v.detach(), t.scaling)
    return (lambda x: F.linear(x, Wm, t.b)), []


def _addmm(t: Inputs):
    """The best plain-torch recipe: cuBLAS base with bias, then one in-place addmm of the rank-r term
    (u and the scale folded into h, v folded into B: two small ops instead of two (M, N) passes)."""
    def fn(x):
        out = torch.addmm(t.b, x, t.W.t())
        h = x.to(t.A.dtype) @ t.A.t()
        z = h * (t.scaling if t.u is None else t.scaling * t.u)
        Bv = t.B if t.v is None else t.B * t.v[:, None]
        return out.addmm_(z.to(x.dtype), Bv.t().to(x.dtype))  # addmm saves x and W, not out: in place is safe
    return fn, trained(t)


class _OneLinear(nn.Module):
    def __init__(self, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(W.shape[1], W.shape[0], dtype=W.dtype, device=W.device)
        with torch.no_grad():
            self.lin.weight.copy_(W)
            self.lin.bias.copy_(b)

    def forward(self, x):
        return self.lin(x)


def _peft(kind: str):
    def build(t: Inputs):
        import peft

        r = t.A.shape[0]
        cfg = (peft.LoraConfig(r=r, lora_alpha=r, target_modules=["lin"], lora_dropout=0.0) if kind == "lora" else
               peft.VeraConfig(r=r, target_modules=["lin"], vera_dropout=0.0))
        model = peft.get_peft_model(_OneLinear(t.W, t.b), cfg)
        with torch.no_grad():  # non-zero B / lambda_b so the adapter path does real work
            for n, p in model.named_parameters():
                if "lora_B" in n or "vera_lambda_b" in n:
                    p.normal_(0, 0.1)
        return model, [p for p in model.parameters() if p.requires_grad]
    return build


#: impl name -> (builder, presets it runs for: None = every preset, or the one preset it implements)
IMPLS: dict[str, tuple[Callable, Optional[str]]] = {
    "limit": (_limit, "shape"),
    "merged": (_merged, "shape"),
    "ours_fused": (_ours("fused"), None),
    "ours_epilogue": (_ours("epilogue"), None),
    "ours": (_ours("auto"), None),
    "reference": (_reference, None),
    "addmm": (_addmm, None),
    "peft_lora": (_peft("lora"), "lora"),
    "peft_vera": (_peft("vera"), "vera"),
}


def flops(case: Case, op: str, impl: str) -> float:
    """Useful FLOPs: the base GEMM (2MNK; twice for fwd+bwd's dX) plus the adapter terms."""
    M, K, N, r = case.M, case.K, case.N, case.rank
    base = 2 * M * N * K * (1 if op == "fwd" else 2)
    if impl in ("limit", "merged"):
        return base
    adapter = 2 * M * r * (K + N) * (1 if op == "fwd" else 3)
    return base + adapter


def min_bytes(case: Case, op: str) -> float:
    """Compulsory traffic of the base layer in bf16: read x and W, write out (fwd); plus read G, W, write dX."""
    M, K, N = case.M, case.K, case.N
    e = 2
    fwd = e * (M * K + N * K + M * N)
    return fwd if op == "fwd" else fwd + e * (M * N + N * K + M * K)
