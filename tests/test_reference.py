"""The reference op against an explicit float64 formula (docs/MATH.md), gradcheck, tied sums, errors."""

import pytest
import torch

from helpers import rel_err
from tiedlora_kernels import reference, tied_lora_linear


def make_inputs(M=7, K=11, N=13, r=3, lead=(), bias=True, u=True, v=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(
        x=rnd(*lead, M, K).requires_grad_(), weight=rnd(N, K), bias=rnd(N) if bias else None,
        A=rnd(r, K).requires_grad_(), B=rnd(N, r).requires_grad_(),
        u=rnd(r).requires_grad_() if u else None, v=rnd(N).requires_grad_() if v else None,
    )


def spec_formula(x, weight, bias, A, B, u, v, s):
    """docs/MATH.md's forward and gradients written out by hand (no autograd), float64."""
    xf = x.reshape(-1, x.shape[-1])
    one_r = torch.ones(A.shape[0], dtype=x.dtype)
    one_n = torch.ones(B.shape[0], dtype=x.dtype)
    u_, v_ = (u if u is not None else one_r), (v if v is not None else one_n)
    h = xf @ A.T
    z = s * h * u_
    delta = (z @ B.T) * v_
    out = xf @ weight.T + (bias if bias is not None else 0) + delta
    return out.reshape(*x.shape[:-1], -1), h, z, u_, v_


def spec_grads(G, x, weight, A, B, h, z, u_, v_, s):
    Gf = G.reshape(-1, G.shape[-1])
    xf = x.reshape(-1, x.shape[-1])
    Gv = Gf * v_
    g = Gv @ B
    gh = s * g * u_
    return dict(x=(Gf @ weight + gh @ A).reshape(x.shape), A=gh.T @ xf, B=Gv.T @ z,
                u=s * (g * h).sum(0), v=(Gf * (z @ B.T)).sum(0))


CASES = [
    dict(),
    dict(M=1, r=1),
    dict(lead=(2, 3), M=5),
    dict(bias=False, u=False, v=False),
    dict(u=True, v=False),
    dict(K=1, N=1, r=1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("s", [1.0, 0.37])
def test_reference_matches_spec_formula(case, s):
    t = make_inputs(**case)
    out = reference.tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], scaling=s)
    exp, h, z, u_, v_ = spec_formula(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], s)
    assert rel_err(out, exp) < 1e-12
    G = torch.randn_like(out)
    out.backward(G)
    want = spec_grads(G, t["x"], t["weight"], t["A"], t["B"], h, z, u_, v_, s)
    for name in ("x", "A", "B", "u", "v"):
        if t[name] is not None:
            assert rel_err(t[name].grad, want[name]) < 1e-12, name


def test_reference_gradcheck():
    t = make_inputs(M=4, K=5, N=6, r=2, lead=(2,))
    f = lambda x, A, B, u, v: reference.tied_lora_linear(x, t["weight"], t["bias"], A, B, u, v, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(f, (t["x"], t["A"], t["B"], t["u"], t["v"]))


def test_tied_gradients_are_the_sum_over_layers():
    """One A, B shared by 3 chained layers: autograd's dA, dB equal the hand-summed per-layer terms."""
    t = make_inputs(M=6, K=8, N=8, r=3)
    A, B = t["A"], t["B"]
    g = torch.Generator().manual_seed(3)
    layers = [(torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64),
               torch.randn(8, generator=g, dtype=torch.float64)) for _ in range(3)]
    x = t["x"]
    acts = [x]
    for W, u, v in layers:
        acts.append(reference.tied_lora_linear(acts[-1], W, None, A, B, u, v, 0.5))
    G = torch.randn_like(acts[-1])
    acts[-1].backward(G)
    dA = torch.zeros_like(A)
    dB = torch.zeros_like(B)
    grad = G
    for (W, u, v), xin in reversed(list(zip(layers, acts[:-1]))):
        xin = xin.detach()
        _, h, z, u_, v_ = spec_formula(xin, W, None, A.detach(), B.detach(), u, v, 0.5)
        d = spec_grads(grad, xin, W, A.detach(), B.detach(), h, z, u_, v_, 0.5)
        dA += d["A"]
        dB += d["B"]
        grad = d["x"]
    assert rel_err(A.grad, dA) < 1e-12
    assert rel_err(B.grad, dB) < 1e-12


def test_dropout_only_touches_adapter_path():
    t = make_inputs(M=50, K=16, N=8, r=4)
    args = (t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 1.0)
    base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    eval_out = reference.tied_lora_linear(*args, dropout_p=0.5, training=False)
    assert torch.equal(eval_out, reference.tied_lora_linear(*args))
    train_out = reference.tied_lora_linear(*args, dropout_p=0.5, training=True)
    assert not torch.allclose(train_out, eval_out)
    # With B = 0 the adapter path vanishes: dropout must leave the base path untouched.
    zero_B = (t["x"], t["weight"], t["bias"], t["A"], torch.zeros_like(t["B"]), t["u"], t["v"], 1.0)
    assert torch.equal(reference.tied_lora_linear(*zero_B, dropout_p=0.5, training=True), base)


def test_merged_weight_reproduces_forward():
    t = make_inputs(M=9, K=10, N=12, r=4)
    Wm = reference.merged_weight(t["weight"], t["A"], t["B"], t["u"], t["v"], 0.8)
    out = reference.tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.8)
    assert rel_err(torch.nn.functional.linear(t["x"], Wm, t["bias"]), out) < 1e-12
    back = reference.unmerged_weight(Wm, t["A"], t["B"], t["u"], t["v"], 0.8)
    assert rel_err(back, t["weight"]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,r,u,v", [(13, 11, 3, True, True), (1, 37, 1, False, True), (40, 9, 5, True, False),
                                       (7, 64, 16, False, False)])
def test_merged_row_norm_matches_the_norm_of_the_merged_weight(dtype, N, K, r, u, v):
    """DoRA's ||W + s diag(v) B diag(u) A||_row (W + D formed in the wide dtype), against that weight
    formed in float64; the adapter factors fp32 (fp64 for fp64), an update of the size training gives it."""
    t = make_inputs(M=1, K=K, N=N, r=r, u=u, v=v, seed=N + K)
    fac = torch.float64 if dtype == torch.float64 else torch.float32
    W = t["weight"].to(dtype)
    A, B = t["A"].detach().to(fac), (t["B"].detach() / 4).to(fac)
    uu = t["u"].detach().to(fac) if u else None
    vv = t["v"].detach().to(fac) if v else None
    # the oracle written out here, not through reference.merged_weight (which shares the code under test)
    dW = B.double() * (uu.double() if u else 1.0) @ A.double()
    ref = (W.double() + 0.7 * (vv.double()[:, None] if v else 1.0) * dW).norm(dim=1)
    got = reference.merged_row_norm(W, A, B, uu, vv, 0.7)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert rel_err(got, ref) < tol
    assert rel_err(reference.row_norm(W), W.double().norm(dim=1)) < tol


def test_merged_row_norm_keeps_a_small_fp16_down_projection():
    """fp16 W with an fp32 A of values below fp16's normal range (gamma's scaled init): W + D is
    formed in fp32, where A cast to fp16 would flush to 0 and drop the update."""
    t = make_inputs(M=1, K=24, N=6, r=2, seed=3)
    W = t["weight"].half()
    A = (t["A"].detach() * 1e-8).float()
    B = (t["B"].detach() * 5e7).float()
    ref = (W.double() + B.double() @ A.double()).norm(dim=1)
    assert rel_err(reference.merged_row_norm(W, A, B, None, None, 1.0), ref) < 1e-2
    assert rel_err(ref, W.double().norm(dim=1)) > 0.05  # the update matters at this size


def test_merged_row_norm_of_an_update_that_cancels_the_weight_is_not_nan():
    """W + D = 0 in exact arithmetic: the norm of what rounding leaves, small and never NaN."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 8, generator=g)
    A = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]  # orthogonal: B A = -W exactly up to rounding
    B = -W @ A.t()
    n = reference.merged_row_norm(W, A, B, None, None, 1.0)
    assert not n.isnan().any() and (n < 1e-2 * W.norm(dim=1)).all()


def test_mixed_precision_output_dtype():
    t = make_inputs(dtype=torch.float32)
    x = t["x"].detach().bfloat16()
    out = tied_lora_linear(x, t["weight"].bfloat16(), None, t["A"], t["B"], t["u"], t["v"])
    assert out.dtype == torch.bfloat16


BAD = [
    ("x", lambda t: t.update(x=torch.ones(7, 11, dtype=torch.int64)), TypeError, "x must be a floating"),
    ("x", lambda t: t.update(x=torch.randn(7, 12, dtype=torch.float64)), ValueError, "last dimension K=11"),
    ("weight", lambda t: t.update(weight=torch.randn(13, 11)), TypeError, "weight dtype"),
    ("weight", lambda t: t.update(weight=torch.randn(13, dtype=torch.float64)), ValueError, "weight must be a 2-D"),
    ("bias", lambda t: t.update(bias=torch.randn(12, dtype=torch.float64)), ValueError, r"bias must have shape \(13,\)"),
    ("A", lambda t: t.update(A=torch.randn(3, 10, dtype=torch.float64)), ValueError, "A must have shape"),
    ("A", lambda t: t.update(A=torch.randn(0, 11, dtype=torch.float64)), ValueError, "rank r"),
    ("B", lambda t: t.update(B=torch.randn(13, 4, dtype=torch.float64)), ValueError, r"B must have shape \(13, 3\)"),
    ("u", lambda t: t.update(u=torch.randn(4, dtype=torch.float64)), ValueError, r"u must have shape \(3,\)"),
    ("v", lambda t: t.update(v=torch.randn(3, dtype=torch.float64)), ValueError, r"v must have shape \(13,\)"),
    ("v", lambda t: t.update(v=torch.randn(13, dtype=torch.float64, device="meta")), ValueError, "v must be on cpu"),
    ("A", lambda t: t.update(A=torch.ones(3, 11, dtype=torch.int32)), TypeError, "A must be a floating"),
]


@pytest.mark.parametrize("fn", [reference.tied_lora_linear, tied_lora_linear], ids=["reference", "dispatch"])
@pytest.mark.parametrize("arg,mutate,exc,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_raise_naming_the_argument(fn, arg, mutate, exc, msg):
    t = make_inputs()
    mutate(t)
    with pytest.raises(exc, match=msg):
        fn(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"])


@pytest.mark.parametrize("kw,msg", [(dict(scaling=float("nan")), "scaling"), (dict(dropout_p=1.0), "dropout_p")])
def test_bad_scalars_raise(kw, msg):
    t = make_inputs()
    with pytest.raises(ValueError, match=msg):
        tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], **kw)


def test_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "cuda-magic")
    t = make_inputs()
    with pytest.raises(ValueError, match="TIEDLORA_BACKEND"):
        tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"])


@pytest.mark.parametrize("small", ["u", "v", "scaling"])
def test_fp16_intermediates_beyond_fp16_range_stay_finite(small):
    """fp16 activations and adapter with h = x A^T or (h * u) B^T past fp16's 65504 while the output fits
    (a small u, v or s): the reference keeps them in fp32, as the kernels do (it formed them in fp16:
    inf and NaN in the output and dA where float64 has none)."""
    t = make_inputs(M=4, K=32, N=16, r=4, bias=False)
    x, W = (t["x"].detach() * 30).half(), (t["weight"] / 32**0.5).half()
    A, B = (t["A"].detach() * 200).half().requires_grad_(), t["B"].detach().half()
    u = torch.full((4,), 1e-4, dtype=torch.float16) if small == "u" else None
    v = torch.full((16,), 1e-4, dtype=torch.float16) if small == "v" else None
    s = 1e-4 if small == "scaling" else 1.0
    out = reference.tied_lora_linear(x, W, None, A, B, u, v, s)
    out.float().square().sum().backward()
    ref = spec_formula(x.double(), W.double(), None, A.detach().double(), B.double(),
                       None if u is None else u.double(), None if v is None else v.double(), s)[0]
    assert (x.double() @ A.detach().double().T).abs().max() > 65504 and ref.abs().max() < 1e3
    assert torch.isfinite(out).all() and torch.isfinite(A.grad).all()
    assert rel_err(out, ref) < 2e-3

