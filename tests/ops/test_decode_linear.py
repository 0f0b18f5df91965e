"""The one-launch decode kernel (``tiedlora_kernels/ops/decode_linear.py``: base GEMV and adapter in
one pass over W) against the float64 reference forward, and the dispatch that takes it.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set by conftest); the cuda-marked test
takes a realistic decode shape wherever a GPU is at hand.
"""

import importlib

import pytest
import torch

from helpers import rel_err
from tiedlora_kernels import reference, tied_lora_linear
from tiedlora_kernels.ops import triton_interpreting

if not (torch.cuda.is_available() or triton_interpreting()):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = [] if torch.cuda.is_available() else [pytest.mark.interpreter]

fused = importlib.import_module("tiedlora_kernels.ops.decode_linear")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make(M, K, N, r, *, dtype=torch.float32, adapter_dtype=torch.float32, bias=True, u=True, v=True, c=False,
         x_layout="contiguous", w_layout="linear", seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dev = lambda t, dt: t.to(DEVICE, dt)  # noqa: E731
    x = dev(rnd(K, M), dtype).t() if x_layout == "transposed" else dev(rnd(M, K), dtype)
    W = dev(rnd(K, N) / K**0.5, dtype).t() if w_layout == "conv1d" else dev(rnd(N, K) / K**0.5, dtype)
    return dict(x=x, weight=W, bias=dev(rnd(N), dtype) if bias else None, A=dev(rnd(r, K) / K**0.5, adapter_dtype),
                B=dev(rnd(N, r), adapter_dtype), u=dev(rnd(r), adapter_dtype) if u else None,
                v=dev(rnd(N), adapter_dtype) if v else None,
                c=dev(1 + 0.5 * rnd(N), torch.float32) if c else None)


def check(t, scaling=0.7, tol=None):
    out = fused.decode_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], t["c"], scaling)
    d = lambda k: None if t[k] is None else t[k].double()  # noqa: E731
    ref = reference.tied_lora_linear(d("x"), d("weight"), d("bias"), d("A"), d("B"), d("u"), d("v"), scaling,
                                     row_scale=d("c"))
    assert out.dtype == t["x"].dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < (tol or TOL[t["x"].dtype]), f"rel err {err:.2e}"


@pytest.mark.parametrize("M,K,N,r", [(1, 33, 40, 16), (1, 64, 48, 1), (5, 37, 29, 3), (16, 70, 65, 33),
                                     (17, 40, 33, 4)], ids=lambda v: str(v))
def test_shapes(M, K, N, r):
    """Rows 1 to two row blocks, K and N not multiples of the tiles, rank 1 and above a power of two."""
    check(make(M, K, N, r))


@pytest.mark.parametrize("bias,u,v,c", [(False, False, False, False), (True, False, True, False),
                                        (False, True, False, True), (True, True, True, True)],
                         ids=["plain-lora", "bias-v", "u-rowscale", "everything"])
def test_optional_tensors(bias, u, v, c):
    check(make(3, 40, 36, 4, bias=bias, u=u, v=v, c=c))


@pytest.mark.parametrize("x_layout,w_layout", [("transposed", "linear"), ("contiguous", "conv1d"),
                                               ("transposed", "conv1d")])
def test_strides(x_layout, w_layout):
    """x of unit stride along M, and HF Conv1D's weight read as weight.t() in place."""
    check(make(4, 40, 36, 4, x_layout=x_layout, w_layout=w_layout))


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_low_precision(dtype, adapter_dtype):
    check(make(2, 72, 40, 8, dtype=dtype, adapter_dtype=adapter_dtype, c=True))


def test_fp16_activations_with_tiny_fp32_down_factor():
    """gamma's scaled init (A ~ 1e-6, s ~ 1e6) on fp16 activations: h keeps fp32's exponent range."""
    t = make(3, 40, 36, 8, dtype=torch.float16)
    t["A"] = t["A"] * 1e-6
    check(t, scaling=0.7e6)


def test_inf_in_x_does_not_reach_the_padded_rank():
    """x holding an inf: out is inf/NaN only where the reference's is (rank 3 padded to 16 columns)."""
    t = make(2, 40, 36, 3)
    t["x"][0, 5] = float("inf")
    out = fused.decode_linear(t["x"], t["weight"], None, t["A"], t["B"], t["u"], t["v"], None, 1.0)
    ref = reference.tied_lora_linear(t["x"].double(), t["weight"].double(), None, t["A"].double(), t["B"].double(),
                                     t["u"].double(), t["v"].double(), 1.0)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.isfinite(out[1]).all()


def test_dispatch_takes_it_for_few_rows_when_the_forward_keeps_nothing(monkeypatch):
    """tied_lora_linear (triton route) sends at most FUSED_DECODE_MAX_ROWS rows here when its forward
    keeps no h or y for a backward (no grad, or only A / x training: their gradients need x, saved
    anyway); more rows, a trained B, u, v or row scale (h / y kept), or dropout in training take
    the general path."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    monkeypatch.setattr(fused, "FUSED_DECODE_MAX_ROWS", 4)
    calls = []
    real = fused.decode_linear
    monkeypatch.setattr(fused, "decode_linear", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    t = make(4, 40, 36, 4)
    A, B = t["A"].clone().requires_grad_(), t["B"].clone().requires_grad_()
    args = lambda x, B=t["B"]: (x, t["weight"], t["bias"], A, B, t["u"], t["v"], 0.7)  # noqa: E731
    with torch.no_grad():
        out = tied_lora_linear(*args(t["x"][None]))  # (1, 4, K): 4 rows
        tied_lora_linear(*args(torch.cat([t["x"], t["x"][:1]])))  # 5 rows
        tied_lora_linear(*args(t["x"]), dropout_p=0.5, training=True)
    tied_lora_linear(*args(t["x"], B))  # B trains: h is kept
    assert calls == [4]
    x = t["x"].clone().requires_grad_()
    G = torch.randn(4, 36, device=DEVICE)
    fused_grads = torch.autograd.grad(tied_lora_linear(*args(x)), (x, A), G)  # A trains: x kept, no h
    assert calls == [4, 4]
    monkeypatch.setattr(fused, "FUSED_DECODE_MAX_ROWS", 0)
    general_grads = torch.autograd.grad(tied_lora_linear(*args(x)), (x, A), G)
    assert all(rel_err(a, b) < TOL[torch.float32] for a, b in zip(fused_grads, general_grads))
    with torch.no_grad():
        assert rel_err(out[0], tied_lora_linear(*args(t["x"]))) < TOL[torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 40])
def test_gpu_decode_shape(M):
    """The GPU's own tiles (the interpreter takes small ones): 256-deep K steps, 32-row blocks above 16 rows."""
    check(make(M, 4096, 4096, 16, dtype=torch.bfloat16, c=True))
