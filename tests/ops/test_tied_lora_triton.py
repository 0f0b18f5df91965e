"""The Triton kernels against the float64 reference: forward and every gradient.

On a CPU these run the real kernels under TRITON_INTERPRET=1 (set by conftest), so shapes stay
small; tests marked ``cuda`` cover realistic shapes on a GPU.
"""

import os

import pytest
import torch

from helpers import rel_err
from tiedlora_kernels import reference, tied_lora_linear
from tiedlora_kernels.ops import triton_interpreting

if not (torch.cuda.is_available() or triton_interpreting()):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from tiedlora_kernels.ops import tied_lora_triton as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: ‖out − ref‖ / ‖ref‖ against float64, per activation dtype (fp32: IEEE dots; bf16: one rounding
#: of the output plus bf16 operands of the base product).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
NAMES = ("x", "A", "B", "u", "v")


def make(M, K, N, r, *, dtype=torch.float32, adapter_dtype=torch.float32, lead=(), bias=True, u=True, v=True,
         train=NAMES, x_layout="contiguous", w_layout="linear", seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if x_layout == "transposed":  # a (K, M) buffer viewed as (M, K): non-unit last stride
        x = rnd(*lead, K, M).transpose(-1, -2)
    elif x_layout == "sliced":  # every other column of a wider buffer
        x = rnd(*lead, M, 2 * K)[..., ::2]
    else:
        x = rnd(*lead, M, K)
    W = rnd(K, N).t() if w_layout == "conv1d" else rnd(N, K)  # Conv1D passes weight.t()
    t = dict(x=x.to(dtype), weight=(W / K**0.5).to(dtype), bias=rnd(N).to(dtype) if bias else None,
             A=(rnd(r, K) / K**0.5).to(adapter_dtype), B=rnd(N, r).to(adapter_dtype),
             u=rnd(r).to(adapter_dtype) if u else None, v=rnd(N).to(adapter_dtype) if v else None)
    for n in NAMES:
        if t[n] is not None:
            t[n] = t[n].to(DEVICE).requires_grad_(n in train)
    for n in ("weight", "bias"):
        if t[n] is not None:
            t[n] = t[n].to(DEVICE)
    return t


def run(t, fn, G=None, scaling=0.7, **kw):
    out = fn(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], scaling, **kw)
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out) if G is None else G
    out.backward(G)
    return out, G, {n: t[n].grad for n in NAMES if t[n] is not None}


def as_f64(t):
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in t.items()}


def check(t, scaling=0.7, path=None, monkeypatch=None, dtype=torch.float32):
    if path is not None:
        monkeypatch.setenv("TIEDLORA_FWD_PATH", path)
    out, G, grads = run(t, kernels.tied_lora_linear_triton, scaling=scaling, dropout_p=0.0, training=True)
    t64 = as_f64(t)
    ref, _, ref_grads = run(t64, reference.tied_lora_linear, G=G.double(), scaling=scaling)
    assert out.dtype == t["x"].dtype and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype], "out"
    for n in NAMES:
        if t[n] is None:
            continue
        if t[n].requires_grad:
            assert grads[n] is not None and grads[n].dtype == t[n].dtype, n
            assert rel_err(grads[n], ref_grads[n]) < TOL[dtype], n
        else:
            assert grads[n] is None, f"frozen {n} got a gradient"


SHAPES = [(1, 5, 3, 1), (7, 33, 40, 3), (37, 33, 40, 16), (20, 64, 17, 5)]


@pytest.mark.parametrize("path", ["fused", "epilogue"])
@pytest.mark.parametrize("M,K,N,r", SHAPES, ids=lambda s: str(s))
def test_matches_reference(monkeypatch, path, M, K, N, r):
    check(make(M, K, N, r), path=path, monkeypatch=monkeypatch)


@pytest.mark.parametrize("path", ["fused", "epilogue"])
@pytest.mark.parametrize("variant", [
    dict(lead=(2, 3)), dict(bias=False, u=False, v=False), dict(u=True, v=False), dict(x_layout="transposed"),
    dict(x_layout="sliced", lead=(2,)), dict(w_layout="conv1d"),
], ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_layouts_and_optional_tensors(monkeypatch, path, variant):
    check(make(9, 24, 20, 4, **variant), path=path, monkeypatch=monkeypatch)


@pytest.mark.parametrize("path", ["fused", "epilogue"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float32), (torch.float16, torch.float16)],
                         ids=["bf16-fp32", "bf16-bf16", "fp16-fp32", "fp16-fp16"])
def test_low_precision_activations(monkeypatch, path, dtype, adapter_dtype):
    t = make(37, 48, 40, 8, dtype=dtype, adapter_dtype=adapter_dtype)
    check(t, path=path, monkeypatch=monkeypatch, dtype=dtype)


#: Trained tensors of each preset (SPEC.md Table 1); absent u / v are None.
PRESET_TRAIN = {
    "lora": (("x", "A", "B"), False, False), "vera": (("x", "u", "v"), True, True), "tl1": (("x", "A"), False, False),
    "tl2": (("x", "A", "u", "v"), True, True), "tl3": (("x", "B"), False, False), "tl4": (("x", "B", "u"), True, False),
    "tl5": (("x", "A", "B"), False, False), "tl6": (NAMES, True, True),
}


@pytest.mark.parametrize("preset", sorted(PRESET_TRAIN))
def test_every_preset_frozen_set(monkeypatch, preset):
    train, has_u, has_v = PRESET_TRAIN[preset]
    check(make(11, 20, 14, 4, u=has_u, v=has_v, train=train), monkeypatch=monkeypatch, path="epilogue")


def test_frozen_A_does_not_keep_x_alive():
    """With A frozen only h (M, r) is saved for backward, never x (M, K)."""
    def saved_numels(t):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: sizes.append(s.numel()) or s, lambda s: s):
            kernels.tied_lora_linear_triton(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 1.0,
                                            0.0, True)
        return sizes

    M, K, N, r = 40, 24, 20, 4
    frozen_A = saved_numels(make(M, K, N, r, train=("x", "B", "u", "v")))
    assert M * K not in frozen_A and M * r in frozen_A
    trained_A = saved_numels(make(M, K, N, r))
    assert M * K in trained_A


def test_tied_over_three_layers(monkeypatch):
    """One A, B in 3 chained layers: the kernel's dA, dB equal the float64 autograd sum over layers."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    g = torch.Generator().manual_seed(4)
    M, d, r = 13, 24, 4
    A = (torch.randn(r, d, generator=g) / d**0.5).requires_grad_()
    B = torch.randn(d, r, generator=g).requires_grad_()
    layers = [(torch.randn(d, d, generator=g) / d**0.5, torch.randn(r, generator=g).requires_grad_(),
               torch.randn(d, generator=g).requires_grad_()) for _ in range(3)]
    x = torch.randn(M, d, generator=g).requires_grad_()

    def net(fn, x, A, B, layers):
        for W, u, v in layers:
            x = fn(x, W, None, A, B, u, v, 0.5)
        return x

    out = net(tied_lora_linear, x, A, B, layers)
    G = torch.randn_like(out)
    out.backward(G)
    d64 = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    x64, A64, B64 = d64(x), d64(A), d64(B)
    l64 = [(W.double(), d64(u), d64(v)) for W, u, v in layers]
    ref = net(reference.tied_lora_linear, x64, A64, B64, l64)
    ref.backward(G.double())
    assert rel_err(out, ref) < 1e-5
    for got, want in [(x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)] + \
            [(a[i].grad, b[i].grad) for a, b in zip(layers, l64) for i in (1, 2)]:
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("path", ["fused", "epilogue"])
def test_dropout_mask_is_the_same_in_forward_and_backward(monkeypatch, path):
    monkeypatch.setenv("TIEDLORA_FWD_PATH", path)
    M, K, N, r, p = 24, 40, 18, 4, 0.3
    t = make(M, K, N, r)
    torch.manual_seed(123)
    seed = kernels.draw_seed(DEVICE)
    torch.manual_seed(123)
    out, G, grads = run(t, kernels.tied_lora_linear_triton, scaling=0.7, dropout_p=p, training=True)
    keep = kernels.dropout_mask(seed, M, K, p).double()
    t64 = as_f64(t)

    def explicit(x, weight, bias, A, B, u, v, s):  # the formula with this mask, float64
        xd = x * keep / (1 - p)
        return x @ weight.T + bias + s * (((xd @ A.T) * u) @ B.T) * v

    ref, _, ref_grads = run(t64, explicit, G=G.double(), scaling=0.7)
    assert rel_err(out, ref) < 1e-5
    for n in NAMES:
        assert rel_err(grads[n], ref_grads[n]) < 1e-5, n
    assert abs(keep.mean().item() - (1 - p)) < 0.06


def test_dropout_off_in_eval_and_masks_differ_per_call():
    t = make(16, 32, 12, 4)
    args = (t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 1.0)
    ev = kernels.tied_lora_linear_triton(*args, 0.5, False)
    assert torch.equal(ev, kernels.tied_lora_linear_triton(*args, 0.0, True))
    a = kernels.tied_lora_linear_triton(*args, 0.5, True)
    b = kernels.tied_lora_linear_triton(*args, 0.5, True)
    assert not torch.equal(a, b)


def test_empty_batch():
    t = make(0, 12, 10, 3, lead=(2,))
    out, _, grads = run(t, kernels.tied_lora_linear_triton, dropout_p=0.0, training=True)
    assert out.shape == (2, 0, 10)
    assert grads["x"].shape == (2, 0, 12)
    for n in ("A", "B", "u", "v"):
        assert torch.count_nonzero(grads[n]) == 0


@pytest.mark.parametrize("path", ["fused", "epilogue"])
def test_deterministic_reruns(monkeypatch, path):
    monkeypatch.setenv("TIEDLORA_FWD_PATH", path)
    results = []
    for _ in range(3):
        t = make(33, 40, 24, 8)
        out, _, grads = run(t, kernels.tied_lora_linear_triton, dropout_p=0.0, training=True)
        results.append([out] + [grads[n] for n in NAMES])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("path", ["fused", "epilogue"])
def test_nan_poisoned_allocations_are_all_written(monkeypatch, path):
    """Every buffer the launchers allocate starts as NaN: an element a kernel forgets shows up."""
    real_empty = torch.empty

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    check(make(37, 33, 40, 5), path=path, monkeypatch=monkeypatch)


def test_bad_path_and_trainable_base_raise(monkeypatch):
    t = make(4, 8, 6, 2)
    monkeypatch.setenv("TIEDLORA_FWD_PATH", "magic")
    with pytest.raises(ValueError, match="TIEDLORA_FWD_PATH"):
        kernels.tied_lora_linear_triton(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 1.0, 0.0, True)
    monkeypatch.delenv("TIEDLORA_FWD_PATH")
    with pytest.raises(ValueError, match="weight requires grad"):
        kernels.tied_lora_linear_triton(t["x"], t["weight"].requires_grad_(), t["bias"], t["A"], t["B"], t["u"],
                                        t["v"], 1.0, 0.0, True)


def test_torch_compile_fullgraph_no_graph_break(monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    t = make(10, 16, 12, 4, lead=(2,))

    def f(x, weight, bias, A, B, u, v):
        return tied_lora_linear(x, weight, bias, A, B, u, v, 0.5).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [t[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")]
    loss = compiled(*args)
    loss.backward()
    got = {n: t[n].grad.clone() for n in NAMES}
    for n in NAMES:
        t[n].grad = None
    f(*args).backward()
    for n in NAMES:
        assert rel_err(got[n], t[n].grad) < 1e-6, n


# ---------------------------------------------------------------------------------------------
# GPU only: realistic shapes (run on a lent GPU; see bench/gpu_session.sh)
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["fused", "epilogue"])
@pytest.mark.parametrize("M,K,N,r", [(4096, 4096, 4096, 16), (4096, 4096, 4096, 128), (16, 4096, 11008, 64),
                                     (1, 4096, 12288, 8), (8191, 4095, 1001, 3)])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_gpu_bf16_realistic(monkeypatch, path, M, K, N, r, adapter_dtype):
    t = make(M, K, N, r, dtype=torch.bfloat16, adapter_dtype=adapter_dtype)
    check(t, path=path, monkeypatch=monkeypatch, dtype=torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["fused", "epilogue"])
def test_gpu_fp32_and_dropout(monkeypatch, path):
    check(make(1000, 1024, 768, 32), path=path, monkeypatch=monkeypatch)
    test_dropout_mask_is_the_same_in_forward_and_backward(monkeypatch, path)
