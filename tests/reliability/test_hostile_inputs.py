"""Hostile inputs: generated shapes/strides/dtypes against a float64 formula, NaN/Inf propagation,
empty batches, clear errors that name the argument, and bit-identical reruns.

Generated cases use hypothesis with ``derandomize=True`` (the same cases every run, no example
database), so a failure reproduces and nothing is flaky. Each property runs inside a plain test
that counts its examples and asserts how many ran.

Accuracy is judged elementwise against a rounding-error bound, not a norm: the float64 formula
run on absolute values (|x| |W|^T + |b| + s ((|x| |A|^T) |u|) |B|^T |v|, and its gradients for an
upstream |G|) bounds every sum's magnitude, so ``|ours - exact| <= TOL[dtype] * bound`` holds for
any correct implementation and adapts to cancellation, while a wrong term breaks it.
"""

import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiedlora_kernels
from tiedlora_kernels import TiedLoRAConfig, inject, reference, validation

KERNEL_FILE = Path(tiedlora_kernels.__file__).parent / "ops" / "tied_lora.py"
needs_kernels = pytest.mark.skipif(not KERNEL_FILE.exists(), reason="GPU path (ops/tied_lora.py) missing")

#: Elementwise bound factor per activation dtype: |ours - exact| <= TOL * (abs-value bound) + floor.
#: Derivation: fp32/fp64 sums of at most ~100 terms (K, N, r <= 12, rows <= 81) cost < 100 eps;
#: bf16 rounds the base output, the cast adapter path and their sum (and with bf16 adapters each
#: of h, z, delta): at most ~8 roundings of 2**-8.
TOL = {torch.float64: 1e-13, torch.float32: 2e-5, torch.bfloat16: 3e-2}
FLOOR = 1e-30
#: Examples per property (derandomized, so these exact cases run every time).
EXAMPLES = {"torch_forward_backward": 500, "nan_inf": 150, "triton": 15}
SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COUNTS: dict[str, int] = {}


# ---------------------------------------------------------------------------------------------
# The oracle.

def formula64(x, W, b, A, B, u, v, s, c=None):
    """out = c * (x W^T + s (((x A^T) * u) B^T) * v) + b in float64 autograd (no dropout; c = 1 if None)."""
    z = (x @ A.T) * (u if u is not None else 1.0)
    d = z @ B.T
    if v is not None:
        d = d * v
    out = x @ W.T + s * d
    if c is not None:
        out = out * c
    return out + b if b is not None else out


@st.composite
def cases(draw, max_dim=12, max_rows=9, dtypes=(torch.float32, torch.float64, torch.bfloat16)):
    lead = tuple(draw(st.lists(st.integers(0, max_rows), min_size=0, max_size=2)))
    K = draw(st.integers(1, max_dim))
    N = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(dtypes))
    adapter_dtype = draw(st.sampled_from(sorted({torch.float32, dtype}, key=str)))
    return dict(
        lead=lead, K=K, N=N, r=r, dtype=dtype, adapter_dtype=adapter_dtype,
        bias=draw(st.booleans()), u=draw(st.booleans()), v=draw(st.booleans()),
        c=draw(st.booleans()),  # a row scale (DoRA's magnitude)
        # How each tensor is laid out in memory: contiguous, a strided slice, or a transpose.
        x_layout=draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
        w_layout=draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
        ab_layout=draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
        scaling=draw(st.sampled_from([1.0, 0.5, 2.0, -0.75])),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` with other strides (only for tensors of >= 1 dims)."""
    if layout == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        big[..., 1::2] = t
        out = big[..., 1::2]
    elif layout == "transposed" and t.dim() >= 2:
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        return t.contiguous()
    assert torch.equal(out, t)
    return out


def build(case):
    """The inputs in their dtypes and layouts, plus float64 copies of the same values."""
    g = torch.Generator().manual_seed(case["seed"])
    K, N, r, dt, adt = case["K"], case["N"], case["r"], case["dtype"], case["adapter_dtype"]
    raw = {
        "x": torch.randn(*case["lead"], K, generator=g),
        "W": torch.randn(N, K, generator=g) / K ** 0.5,
        "b": torch.randn(N, generator=g) if case["bias"] else None,
        "A": torch.randn(r, K, generator=g) / K ** 0.5,
        "B": torch.randn(N, r, generator=g),
        "u": torch.randn(r, generator=g) if case["u"] else None,
        "v": torch.randn(N, generator=g) if case["v"] else None,
        "c": 1 + 0.5 * torch.randn(N, generator=g) if case.get("c") else None,
    }
    dtypes = {"x": dt, "W": dt, "b": dt, "A": adt, "B": adt, "u": adt, "v": adt, "c": adt}
    layouts = {"x": case["x_layout"], "W": case["w_layout"], "A": case["ab_layout"], "B": case["ab_layout"]}
    ours, exact = {}, {}
    for k, t in raw.items():
        if t is None:
            ours[k] = exact[k] = None
            continue
        t = _laid_out(t.to(dtypes[k]), layouts.get(k, "contiguous"))
        ours[k] = t.requires_grad_(k != "W" and k != "b")
        exact[k] = t.detach().double().requires_grad_(k != "W" and k != "b")
    return ours, exact


def check_against_formula(fn, case):
    ours, exact = build(case)
    s = case["scaling"]
    args = lambda d: (d["x"], d["W"], d["b"], d["A"], d["B"], d["u"], d["v"], d["c"])  # noqa: E731
    row_scale = {"row_scale": ours["c"]} if ours["c"] is not None else {}
    out = fn(*args(ours)[:-1], scaling=s, **row_scale)
    assert out.shape == (*case["lead"], case["N"]) and out.dtype == case["dtype"]
    want = formula64(*args(exact)[:-1], s, exact["c"])
    absd = {k: (t.detach().abs().requires_grad_(t.requires_grad) if t is not None else None) for k, t in exact.items()}
    bound = formula64(*args(absd)[:-1], abs(s), absd["c"])

    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"] + 1)).to(out.dtype)
    grads = torch.autograd.grad(out, [t for t in args(ours) if t is not None and t.requires_grad], G,
                                allow_unused=True)
    want_grads = torch.autograd.grad(want, [t for t in args(exact) if t is not None and t.requires_grad],
                                     G.double(), allow_unused=True)
    bound_grads = torch.autograd.grad(bound, [t for t in args(absd) if t is not None and t.requires_grad],
                                      G.double().abs(), allow_unused=True)
    names = [k for k in ("x", "A", "B", "u", "v", "c") if ours[k] is not None]
    pairs = [("out", out, want, bound)] + list(zip(names, grads, want_grads, bound_grads))
    for name, have, w, bnd in pairs:
        if have is None:  # empty batch: autograd reports "no path" as None; zero is what it means
            have = torch.zeros_like(w)
        assert have.shape == w.shape, name
        # A gradient is rounded to its tensor's dtype (fp32 adapters on fp64 activations, say).
        tol = max(TOL[case["dtype"]], TOL[have.dtype])
        err = (have.detach().double() - w.detach()).abs()
        lim = tol * bnd.detach() + FLOOR
        assert bool((err <= lim).all()), (name, float((err - lim).max()), case)


def _run_counted(key, prop):
    COUNTS[key] = 0
    prop()
    assert COUNTS[key] >= EXAMPLES[key] * 0.9, COUNTS  # hypothesis ran (nearly) every example asked for
    return COUNTS[key]


# ---------------------------------------------------------------------------------------------
# Generated cases against the float64 formula.

def test_generated_cases_match_the_float64_formula(monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")

    @settings(max_examples=EXAMPLES["torch_forward_backward"], **SETTINGS)
    @given(case=cases())
    def prop(case):
        COUNTS["torch_forward_backward"] += 1
        check_against_formula(tiedlora_kernels.tied_lora_linear, case)
        check_against_formula(reference.tied_lora_linear, case)

    _run_counted("torch_forward_backward", prop)


@needs_kernels
@pytest.mark.interpreter
def test_generated_cases_match_the_float64_formula_triton_backend(monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")

    @settings(max_examples=EXAMPLES["triton"], **SETTINGS)
    @given(case=cases(max_dim=6, max_rows=3, dtypes=(torch.float32, torch.bfloat16)))
    def prop(case):
        COUNTS["triton"] += 1
        check_against_formula(tiedlora_kernels.tied_lora_linear, case)

    _run_counted("triton", prop)


def _mutant(kind):
    """A deliberately wrong op, to show the oracle above rejects it."""
    def fn(x, W, b, A, B, u, v, scaling, row_scale=None):
        if kind == "row-scale-ignored":
            row_scale = None
        elif kind == "row-scale-grad-lost":
            row_scale = row_scale.detach()
        elif kind == "u-ignored":
            u = None
        elif kind == "bias-dropped":
            b = None
        elif kind == "scaling-squared":
            scaling = scaling * scaling
        elif kind == "A-grad-lost":
            A = A.detach()
        elif kind == "v-twice":
            v = v * v
        elif kind == "dropout-always-on":
            torch.manual_seed(0)
            return reference.tied_lora_linear(x, W, b, A, B, u, v, scaling, dropout_p=0.1, training=True)
        return reference.tied_lora_linear(x, W, b, A, B, u, v, scaling, row_scale=row_scale)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["u-ignored", "bias-dropped", "scaling-squared", "A-grad-lost", "v-twice",
                                  "dropout-always-on", "row-scale-ignored", "row-scale-grad-lost"])
def test_the_oracle_rejects_wrong_implementations(kind, dtype):
    case = dict(lead=(2, 5), K=12, N=9, r=4, dtype=dtype, adapter_dtype=torch.float32, bias=True, u=True, v=True,
                c=True, x_layout="sliced", w_layout="transposed", ab_layout="contiguous", scaling=0.5, seed=1)
    with pytest.raises(AssertionError):
        check_against_formula(_mutant(kind), case)
    check_against_formula(_mutant("none"), case)


# ---------------------------------------------------------------------------------------------
# NaN / Inf propagate exactly as in the reference.

def _poisoned(case, n_bad, where, seed):
    ours, _ = build(case)
    g = torch.Generator().manual_seed(seed)
    x = ours["x"].detach().clone()
    flat = x.view(-1) if x.is_contiguous() else None
    if flat is None or flat.numel() == 0:
        x = x.contiguous()
        flat = x.view(-1)
    if flat.numel():
        idx = torch.randint(0, flat.numel(), (n_bad,), generator=g)
        vals = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, (n_bad,), generator=g)]
        flat[idx] = vals.to(flat.dtype)
    ours["x"] = x
    if where == "A" and ours["A"].numel():
        A = ours["A"].detach().clone()
        A[0, 0] = float("inf")
        ours["A"] = A
    return ours


def test_nan_and_inf_propagate_exactly_as_the_reference(monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")

    @settings(max_examples=EXAMPLES["nan_inf"], **SETTINGS)
    @given(case=cases(), n_bad=st.integers(1, 4), where=st.sampled_from(["x", "A"]), seed=st.integers(0, 999))
    def prop(case, n_bad, where, seed):
        COUNTS["nan_inf"] += 1
        t = _poisoned(case, n_bad, where, seed)
        args = (t["x"], t["W"], t["b"], t["A"], t["B"], t["u"], t["v"])
        out = tiedlora_kernels.tied_lora_linear(*args, scaling=case["scaling"])
        ref = reference.tied_lora_linear(*args, scaling=case["scaling"])
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.isinf(), ref.isinf())
        assert torch.equal(out.nan_to_num(0.0, 1.0, -1.0), ref.nan_to_num(0.0, 1.0, -1.0))
        # And the reference itself: exactly the non-finite pattern of the float64 formula.
        exact = formula64(*(a.detach().double() if a is not None else None for a in args), case["scaling"])
        if case["dtype"] != torch.bfloat16:  # bf16 can overflow where float64 does not (never here: |values| < 10)
            assert torch.equal(ref.isnan(), exact.isnan())
            assert torch.equal(ref.isinf(), exact.isinf())

    _run_counted("nan_inf", prop)


@needs_kernels
@pytest.mark.interpreter
def test_nan_and_inf_propagate_exactly_as_the_reference_triton_backend(monkeypatch):
    case = dict(lead=(3,), K=5, N=4, r=2, dtype=torch.float32, adapter_dtype=torch.float32, bias=True, u=True,
                v=True, x_layout="contiguous", w_layout="contiguous", ab_layout="contiguous", scaling=1.0, seed=3)
    for where, seed in (("x", 0), ("x", 1), ("A", 2)):
        t = _poisoned(case, 2, where, seed)
        args = (t["x"], t["W"], t["b"], t["A"], t["B"], t["u"], t["v"])
        monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
        out = tiedlora_kernels.tied_lora_linear(*args)
        ref = reference.tied_lora_linear(*args)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())


# ---------------------------------------------------------------------------------------------
# Empty batches.

@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["0xK", "2x0xK", "0x3xK"])
def test_empty_batch_works_and_gives_zero_factor_gradients(monkeypatch, lead):
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    K, N, r = 6, 5, 3
    x = torch.randn(*lead, K, requires_grad=True)
    W, b = torch.randn(N, K), torch.randn(N)
    A, B = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    u, v = torch.randn(r, requires_grad=True), torch.randn(N, requires_grad=True)
    out = tiedlora_kernels.tied_lora_linear(x, W, b, A, B, u, v)
    assert out.shape == (*lead, N)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for t in (A, B, u, v):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), t.shape


def test_empty_batch_through_an_injected_model(monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    from helpers import tiny_gpt2

    model = tiny_gpt2()
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    h = torch.randn(0, 7, 32, requires_grad=True)
    out = model.transformer.h[0].attn.c_attn(h)
    assert out.shape == (0, 7, 96)
    out.sum().backward()
    assert torch.equal(model.tiedlora["c_attn"].A.grad, torch.zeros_like(model.tiedlora["c_attn"].A))


# ---------------------------------------------------------------------------------------------
# Clear errors that name the argument.

def _args(**over):
    K, N, r = 6, 5, 3
    d = dict(x=torch.randn(4, K), weight=torch.randn(N, K), bias=torch.randn(N), A=torch.randn(r, K),
             B=torch.randn(N, r), u=torch.randn(r), v=torch.randn(N))
    d.update(over)
    return d


ERRORS = [
    ("int-x", _args(x=torch.ones(4, 6, dtype=torch.int64)), TypeError, r"\bx must be a floating tensor"),
    ("bool-x", _args(x=torch.ones(4, 6, dtype=torch.bool)), TypeError, r"\bx must be a floating tensor"),
    ("list-x", _args(x=[[1.0] * 6]), TypeError, r"\bx must be a torch.Tensor"),
    ("scalar-x", _args(x=torch.tensor(1.0)), ValueError, r"\bx must have at least 1 dimension"),
    ("x-wrong-K", _args(x=torch.randn(4, 7)), ValueError, r"\bx must have last dimension K=6"),
    ("weight-on-meta", _args(weight=torch.randn(5, 6, device="meta")), ValueError, r"\bweight must be on cpu"),
    ("x-on-meta", _args(x=torch.randn(4, 6, device="meta")), ValueError, r"\bweight must be on meta"),
    ("A-on-meta", _args(A=torch.randn(3, 6, device="meta")), ValueError, r"\bA must be on cpu"),
    ("bf16-weight-fp32-x", _args(weight=torch.randn(5, 6, dtype=torch.bfloat16)), TypeError,
     r"weight dtype torch.bfloat16 must equal x dtype torch.float32"),
    ("int-A", _args(A=torch.ones(3, 6, dtype=torch.int32)), TypeError, r"\bA must be a floating tensor"),
    ("A-wrong-K", _args(A=torch.randn(3, 7)), ValueError, r"\bA must have shape \(3, 6\)"),
    ("A-1d", _args(A=torch.randn(6)), ValueError, r"\bA must be a 2-D tensor"),
    ("rank-0", _args(A=torch.randn(0, 6), B=torch.randn(5, 0), u=None), ValueError, r"rank r = A.shape\[0\] must be >= 1"),
    ("B-rank-mismatch", _args(B=torch.randn(5, 4)), ValueError, r"\bB must have shape \(5, 3\)"),
    ("u-wrong", _args(u=torch.randn(4)), ValueError, r"\bu must have shape \(3,\)"),
    ("v-wrong", _args(v=torch.randn(6)), ValueError, r"\bv must have shape \(5,\)"),
    ("bias-wrong", _args(bias=torch.randn(6)), ValueError, r"\bbias must have shape \(5,\)"),
    ("weight-3d", _args(weight=torch.randn(1, 5, 6)), ValueError, r"\bweight must be a 2-D tensor"),
    # the row scale c (N,): a (1,) or (M, N) scale would broadcast silently in torch and be read out
    # of bounds by a kernel that expects N elements
    ("row_scale-1", _args(row_scale=torch.randn(1)), ValueError, r"\brow_scale must have shape \(5,\)"),
    ("row_scale-MxN", _args(row_scale=torch.randn(4, 5)), ValueError, r"\brow_scale must have shape \(5,\)"),
    ("row_scale-int", _args(row_scale=torch.ones(5, dtype=torch.int64)), TypeError,
     r"\brow_scale must be a floating tensor"),
    ("row_scale-on-meta", _args(row_scale=torch.randn(5, device="meta")), ValueError, r"\brow_scale must be on cpu"),
]


@pytest.mark.parametrize("args, exc, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
@pytest.mark.parametrize("fn, backend", [(tiedlora_kernels.tied_lora_linear, "torch"),
                                         pytest.param(tiedlora_kernels.tied_lora_linear, "triton",
                                                      marks=[needs_kernels, pytest.mark.interpreter]),
                                         (reference.tied_lora_linear, "torch")],
                         ids=["dispatch-torch", "dispatch-triton", "reference"])
def test_bad_arguments_raise_errors_naming_the_argument(monkeypatch, fn, backend, args, exc, match):
    """The same clear error on every backend, raised before anything runs."""
    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    with pytest.raises(exc, match=match):
        fn(**args)


@pytest.mark.parametrize("kw, match", [
    (dict(scaling=float("nan")), r"\bscaling must be a finite real number"),
    (dict(scaling=True), r"\bscaling must be a finite real number"),
    (dict(dropout_p=1.0), r"\bdropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), r"\bdropout_p must be in \[0, 1\)"),
], ids=["scaling-nan", "scaling-bool", "dropout-1", "dropout-negative"])
def test_bad_scalars_raise_errors_naming_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        tiedlora_kernels.tied_lora_linear(**_args(), **kw)


@pytest.mark.parametrize("training", ["False", 0, None, torch.tensor(False)], ids=["str", "int", "None", "tensor"])
@pytest.mark.parametrize("check", [validation.check_tied_lora_inputs, validation.check_tied_lora_add_inputs],
                         ids=["linear", "add"])
def test_training_flag_must_be_a_bool(check, training):
    """``training`` decides whether dropout runs: a truthy non-bool (the string "False") would switch it on
    in the kernels, so only True or False is taken."""
    a = _args()
    second = a["weight"] if check is validation.check_tied_lora_inputs else a["x"] @ a["weight"].t()  # base_out
    with pytest.raises(TypeError, match=rf"training must be a bool \(True or False\), got {re.escape(repr(training))}"):
        check(a["x"], second, a["bias"], a["A"], a["B"], a["u"], a["v"], 1.0, 0.5, training=training)
    check(a["x"], second, a["bias"], a["A"], a["B"], a["u"], a["v"], 1.0, 0.5, training=False)


def test_unknown_backend_is_named():
    os.environ["TIEDLORA_BACKEND"] = "cuda-please"
    try:
        with pytest.raises(ValueError, match="TIEDLORA_BACKEND must be one of"):
            tiedlora_kernels.tied_lora_linear(**_args())
    finally:
        del os.environ["TIEDLORA_BACKEND"]


CONFIG_ERRORS = [
    ("rank-0", lambda: TiedLoRAConfig(rank=0), r"TiedLoRAConfig\.rank must be a positive int, got 0"),
    ("rank-float", lambda: TiedLoRAConfig(rank=4.0), r"TiedLoRAConfig\.rank must be a positive int"),
    ("rank-bool", lambda: TiedLoRAConfig(rank=True), r"TiedLoRAConfig\.rank must be a positive int"),
    ("preset", lambda: TiedLoRAConfig(preset="tl7"), r"TiedLoRAConfig\.preset: unknown preset 'tl7'"),
    ("dropout", lambda: TiedLoRAConfig(dropout=1.5), r"TiedLoRAConfig\.dropout must be a number in \[0, 1\)"),
    ("gamma", lambda: TiedLoRAConfig(gamma=0), r"TiedLoRAConfig\.gamma must be a finite number > 0"),
    ("alpha", lambda: TiedLoRAConfig(alpha=float("inf")), r"TiedLoRAConfig\.alpha must be a finite nonzero number"),
    ("adapter_dtype", lambda: TiedLoRAConfig(adapter_dtype="int8"), r"TiedLoRAConfig\.adapter_dtype must be one of"),
    ("init_A", lambda: TiedLoRAConfig(init_A="ones"), r"TiedLoRAConfig\.init_A must be one of"),
    ("target_modules-regex", lambda: TiedLoRAConfig(target_modules="q_proj("), r"TiedLoRAConfig\.target_modules: invalid regex"),
    ("target_modules-empty", lambda: TiedLoRAConfig(target_modules=[]), r"TiedLoRAConfig\.target_modules must be"),
    ("from_dict-bogus", lambda: TiedLoRAConfig.from_dict({"rank": 4, "bogus": 1}), r"unknown fields \['bogus'\]"),
    ("from_dict-bad-rank", lambda: TiedLoRAConfig.from_dict({"rank": -2}), r"TiedLoRAConfig\.rank must be a positive int, got -2"),
    ("frozen-zero-factor", lambda: TiedLoRAConfig(preset="lora", train_B=False), r"B is initialised to zero and frozen"),
]


@pytest.mark.parametrize("make, match", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_wrong_config_fields_raise_errors_naming_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_rank_larger_than_a_layer_is_refused_naming_the_layer():
    from helpers import tiny_llama

    model = tiny_llama(hidden=32)  # k_proj / v_proj: 32 -> 16 (2 kv heads of 8)
    with pytest.raises(ValueError, match=r"inject: rank=17 is larger than layer 'model\.layers\.0\.self_attn\.k_proj' "
                                         r"\(in_features=32, out_features=16\)"):
        inject(model, TiedLoRAConfig(rank=17, preset="tl6"))
    assert not hasattr(model, "tiedlora") and all(p.requires_grad for p in model.parameters())  # untouched


def test_wrong_input_dtype_into_an_injected_model_is_named(monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    from helpers import tiny_gpt2

    model = tiny_gpt2()
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    layer = model.transformer.h[0].attn.c_attn
    with pytest.raises(TypeError, match=r"weight dtype torch.float32 must equal x dtype torch.bfloat16"):
        layer(torch.randn(2, 32, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"\bx must be a floating tensor"):
        layer(torch.ones(2, 32, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Determinism: identical reruns are bit-identical.

def _forward_backward(seed, dropout_p, training=True):
    g = torch.Generator().manual_seed(seed)
    K, N, r = 48, 40, 8
    x = torch.randn(3, 17, K, generator=g).requires_grad_()
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    A = torch.randn(r, K, generator=g).requires_grad_()
    B = torch.randn(N, r, generator=g).requires_grad_()
    u = torch.randn(r, generator=g).requires_grad_()
    v = torch.randn(N, generator=g).requires_grad_()
    torch.manual_seed(seed)  # dropout's mask
    outs = []
    for _ in range(3):  # a tied factor: the same A, B used by three "layers" in one graph
        outs.append(tiedlora_kernels.tied_lora_linear(x, W, b, A, B, u, v, 0.5, dropout_p, training))
    G = torch.randn(outs[0].shape, generator=g)
    sum((o * G).sum() for o in outs).backward()
    return [torch.stack(outs).detach(), x.grad, A.grad, B.grad, u.grad, v.grad]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[needs_kernels, pytest.mark.interpreter])])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_reruns_are_bit_identical(monkeypatch, backend, dropout_p):
    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    runs = [_forward_backward(7, dropout_p) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
