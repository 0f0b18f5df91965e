"""The GPU path of the adapted linear op (``tiedlora_kernels/ops/tied_lora.py``: cuBLAS GEMMs and the
Triton kernels of ``ops/``) against the float64 reference: forward and every gradient.

Without a GPU the real kernels run under TRITON_INTERPRET=1 (set by conftest), so shapes stay small;
tests marked ``cuda`` cover realistic shapes and run wherever a GPU is at hand.
Gradients are always taken with a random upstream gradient, on random B (never the zero init).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import tiedlora_kernels
from helpers import rel_err
from tiedlora_kernels import reference
from tiedlora_kernels.ops import triton_interpreting

if not (torch.cuda.is_available() or triton_interpreting()):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = [] if torch.cuda.is_available() else [pytest.mark.interpreter]

kernels = importlib.import_module("tiedlora_kernels.ops.tied_lora")
common = importlib.import_module("tiedlora_kernels.ops.common")
dropout = importlib.import_module("tiedlora_kernels.ops.dropout")
public_tied_lora_linear = tiedlora_kernels.tied_lora_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = ("x", "A", "B", "u", "v", "c")  # c: the row scale (DoRA / Simple DoRA magnitude)
#: ‖out − ref‖ / ‖ref‖ against float64 inputs-as-given, per activation dtype, for the output and
#: every gradient. fp32: IEEE dots, so only summation-order error; fp16/bf16: the output's and the
#: operands' roundings (bf16: 2^-9, fp16: 2^-11 per element).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: Table 1 presets: which tensors train and whether u / v exist (frozen 1 = None). x trains too
#: (a middle layer); ``test_x_frozen`` covers the first layer.
PRESETS = {
    "lora": dict(train=("x", "A", "B"), u=False, v=False),
    "vera": dict(train=("x", "u", "v"), u=True, v=True),
    "tl1": dict(train=("x", "A"), u=False, v=False),
    "tl3": dict(train=("x", "B"), u=False, v=False),
    "tl4": dict(train=("x", "B", "u"), u=True, v=False),
    "tl6": dict(train=("x", "A", "B", "u", "v"), u=True, v=True),
}


def make(M, K, N, r, *, dtype=torch.float32, adapter_dtype=torch.float32, lead=(), bias=True, u=True, v=True,
         c=False, train=PARAMS, x_layout="contiguous", w_layout="linear", seed=0):
    """Random inputs of one layer, as a dict of leaves; B random so the adapter path is non-trivial.
    ``c`` adds a row scale around 1 (a magnitude), some entries negative."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    cast = lambda tensor, dt: tensor.to(device=DEVICE, dtype=dt)  # noqa: E731
    # Views are taken after the cast, so the kernels see the strides asked for.
    if x_layout == "transposed":  # (.., K, M) storage viewed as (.., M, K): unit stride along M
        x = cast(rnd(*lead, K, M), dtype).transpose(-1, -2)
    elif x_layout == "sliced":  # every other column of a wider buffer: stride 2 along K
        x = cast(rnd(*lead, M, 2 * K), dtype)[..., ::2]
    else:
        x = cast(rnd(*lead, M, K), dtype)
    # HF Conv1D stores (K, N) and passes weight.t()
    weight = cast(rnd(K, N) / K**0.5, dtype).t() if w_layout == "conv1d" else cast(rnd(N, K) / K**0.5, dtype)
    t = dict(x=x, weight=weight, bias=cast(rnd(N), dtype) if bias else None,
             A=cast(rnd(r, K) / K**0.5, adapter_dtype), B=cast(rnd(N, r), adapter_dtype),
             u=cast(rnd(r), adapter_dtype) if u else None, v=cast(rnd(N), adapter_dtype) if v else None,
             c=cast(1 + rnd(N), adapter_dtype) if c else None)
    for name in PARAMS:
        if t[name] is not None:
            t[name].requires_grad_(name in train)
    return t


def upstream(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def run(fn, t, G, scaling=0.7, **kw):
    """out and the .grad of every adapter tensor (None where frozen) after out.backward(G)."""
    for name in PARAMS:
        if t[name] is not None:
            t[name].grad = None
    if t.get("c") is not None:
        kw["row_scale"] = t["c"]
    out = fn(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], scaling, **kw)
    out.backward(G)
    return out, {n: t[n].grad for n in PARAMS if t[n] is not None}


def as_f64(t):
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in t.items()}


def kernel(x, weight, bias, A, B, u, v, scaling, dropout_p=0.0, training=True, row_scale=None):
    return kernels.tied_lora_linear_triton(x, weight, bias, A, B, u, v, scaling, dropout_p, training,
                                           row_scale=row_scale)


def oracle(x, weight, bias, A, B, u, v, scaling, row_scale=None):
    return reference.tied_lora_linear(x, weight, bias, A, B, u, v, scaling, 0.0, True, row_scale)


def assert_matches(out, grads, ref, ref_grads, t, tol):
    assert out.dtype == t["x"].dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol, f"out: {rel_err(out, ref):.2e}"
    for name in PARAMS:
        if t[name] is None:
            continue
        if t[name].requires_grad:
            assert grads[name] is not None and grads[name].dtype == t[name].dtype, name
            err = rel_err(grads[name], ref_grads[name])
            # a gradient is rounded to its parameter's dtype at the end (bf16 adapters: 2^-9)
            assert err < max(tol, TOL[t[name].dtype]), f"d{name}: {err:.2e}"
        else:
            assert grads[name] is None, f"frozen {name} got a gradient"


def check(t, scaling=0.7, tol=None):
    G = upstream(t["x"].shape[:-1] + (t["weight"].shape[0],), t["x"].dtype)
    out, grads = run(kernel, t, G, scaling)
    t64 = as_f64(t)
    ref, ref_grads = run(oracle, t64, G.double(), scaling)
    assert_matches(out, grads, ref, ref_grads, t, TOL[t["x"].dtype] if tol is None else tol)
    return out, grads


SHAPES = [(1, 5, 3, 1), (7, 33, 40, 3), (37, 33, 40, 16), (37, 5, 40, 1), (7, 33, 3, 16), (20, 64, 17, 5)]


@pytest.mark.parametrize("M,K,N,r", SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in SHAPES])
def test_parity_shapes(M, K, N, r):
    check(make(M, K, N, r))


@pytest.mark.parametrize("r", [64, 200], ids=lambda r: f"r{r}")
def test_large_rank(r):
    check(make(5, 33, 40, r))


@pytest.mark.parametrize("layout", ["lead3d", "x_sliced", "x_transposed", "w_conv1d"])
def test_layouts(layout):
    kw = dict(lead=(2,)) if layout == "lead3d" else {}
    if layout.startswith("x_"):
        kw = dict(x_layout=layout[2:], lead=(3,) if layout == "x_transposed" else ())
    if layout == "w_conv1d":
        kw = dict(w_layout="conv1d", lead=(2,))
    t = make(7, 33, 40, 3, **kw)
    if layout.startswith("x_"):
        assert not t["x"].is_contiguous()
    if layout == "w_conv1d":
        assert t["weight"].stride() == (1, 40)
    out, _ = check(t)
    assert out.shape == t["x"].shape[:-1] + (40,)


@pytest.mark.parametrize("bias,u,v", [(False, False, False), (True, True, False), (False, False, True)],
                         ids=["nobias-nou-nov", "bias-u-nov", "nobias-nou-v"])
def test_optional_tensors(bias, u, v):
    check(make(7, 33, 40, 3, bias=bias, u=u, v=v))


def _saved_tensors(fn):
    """Run fn under a saved-tensors hook; return its output and (storage pointer, shape) of all it saved."""
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_frozen_sets(preset, monkeypatch):
    """Frozen tensors get no gradient, launch no pass, and keep nothing alive: x is saved only when A
    trains, h only when B, u or v trains, and no dropout mask is ever saved (only the seed)."""
    spec = PRESETS[preset]
    M, K, N, r = 7, 33, 40, 3
    t = make(M, K, N, r, u=spec["u"], v=spec["v"], train=spec["train"])
    calls = []
    original = kernels.grad_factors

    def counted(*args, **kw):
        calls.append(args[-4:])  # need_da, need_db, need_dv, need_du
        return original(*args, **kw)

    monkeypatch.setattr(kernels, "grad_factors", counted)
    trains = {n: t[n] is not None and t[n].requires_grad for n in PARAMS}
    out, saved = _saved_tensors(lambda: kernel(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.7,
                                               dropout_p=0.1, training=True))
    x_ptr, w_ptr = t["x"].untyped_storage().data_ptr(), t["weight"].untyped_storage().data_ptr()
    assert any(ptr == x_ptr for ptr, _ in saved) == trains["A"], "x must be saved exactly when A trains"
    assert any(shape == (M, r) for _, shape in saved) == (trains["B"] or trains["u"] or trains["v"]), "h"
    big = [shape for ptr, shape in saved if ptr not in (x_ptr, w_ptr) and torch.Size(shape).numel() >= M * K]
    assert not big, f"an M x K tensor (a dropout mask?) was saved: {big}"
    out.backward(upstream((M, N), torch.float32))
    want = (trains["A"], trains["B"], trains["v"], trains["u"])
    assert calls == ([want] if any(want) else []), "the gradient pass must compute exactly what trains"
    check(t)


def test_split_reductions_and_column_splits(monkeypatch, nan_allocations):
    """As on a GPU: several row splits in the dA / dB / dv partial sums, several column splits in the
    adapter_term kernel (the interpreter otherwise runs one of each)."""
    monkeypatch.setattr(common, "target_programs", lambda device: 12)
    check(make(100, 33, 70, 5, lead=()))
    check(make(100, 33, 70, 5, lead=(), c=True))  # dc's row splits too
    # dropout across splits: the mask each split and column split regenerates is the forward's
    t = make(100, 33, 70, 5, lead=(), c=True)
    G = upstream((100, 70), torch.float32)
    torch.manual_seed(8)
    out, grads = run(kernel, t, G, 0.7, dropout_p=0.3, training=True)
    torch.manual_seed(8)
    keep = dropout.dropout_mask(dropout.draw_dropout_seed(DEVICE), (100, 33), 0.3)

    def masked_oracle(x, weight, bias, A, B, u, v, scaling, row_scale):
        y = F.linear(x, weight) + oracle(x * keep.double() / 0.7, torch.zeros_like(weight), None, A, B, u, v, scaling)
        return y * row_scale + bias

    ref, ref_grads = run(masked_oracle, as_f64(t), G.double())
    assert_matches(out, grads, ref, ref_grads, t, TOL[torch.float32])


def test_sliced_factors_and_strided_vectors():
    """SPEC's rule for tied layers of different shapes: each uses A_full[:, :K], B_full[:N, :] (views
    with the full tensors' strides); u, v, bias given as strided views. Gradients reach the full tensors."""
    M, K, N, r = 7, 33, 40, 3
    gen = torch.Generator().manual_seed(9)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    leaves = dict(x=rnd(M, K), A=rnd(r, K + 7) / K**0.5, B=rnd(N + 5, r), u=rnd(2 * r), v=rnd(2 * N))
    leaves = {k: t.requires_grad_() for k, t in leaves.items()}
    weight, bias = rnd(N, K) / K**0.5, rnd(2 * N)[::2]
    G = upstream((M, N), torch.float32)

    def grads(fn, leaves, weight, bias):
        out = fn(leaves["x"], weight, bias, leaves["A"][:, :K], leaves["B"][:N], leaves["u"][::2],
                 leaves["v"][1::2], 0.7)
        return [out] + list(torch.autograd.grad(out, list(leaves.values()), G.to(out.dtype)))

    got = grads(kernel, leaves, weight, bias)
    want = grads(oracle, {k: t.detach().double().requires_grad_() for k, t in leaves.items()}, weight.double(),
                 bias.double())
    for name, a, b in zip(["out"] + list(leaves), got, want):
        assert rel_err(a, b) < TOL[torch.float32], name


def test_x_frozen_g_without_dx():
    """First layer: x is frozen, so g comes from the g-only adapter_term pass over G; A and u still train."""
    check(make(7, 33, 40, 3, train=("A", "B", "u", "v")))


def test_only_x_trains():
    """Frozen adapter, trained input: dx alone (g used for the dX adapter term, never stored)."""
    check(make(7, 33, 40, 3, train=("x",)))


def test_tied_over_three_layers():
    """The same A, B in three chained layers: dA, dB equal the float64 sums over layers."""
    D, r, L = 24, 3, 3
    gen = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    shared = dict(A=(rnd(r, D) / D**0.5).requires_grad_(), B=(rnd(D, r) / r**0.5).requires_grad_())
    layers = [dict(weight=rnd(D, D) / D**0.5, bias=rnd(D), u=rnd(r).requires_grad_(), v=rnd(D).requires_grad_())
              for _ in range(L)]
    x = rnd(2, 5, D).requires_grad_()
    G = upstream((2, 5, D), torch.float32)

    def forward(fn, x, A, B, layers):
        for lay in layers:
            x = torch.tanh(fn(x, lay["weight"], lay["bias"], A, B, lay["u"], lay["v"], 0.7))
        return x

    leaves = [x, shared["A"], shared["B"]] + [lay[n] for lay in layers for n in ("u", "v")]
    got = torch.autograd.grad(forward(kernel, x, shared["A"], shared["B"], layers), leaves, G)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, A64, B64 = leaves64[:3]
    layers64 = [dict(weight=lay["weight"].double(), bias=lay["bias"].double(), u=leaves64[3 + 2 * i],
                     v=leaves64[4 + 2 * i]) for i, lay in enumerate(layers)]
    want = torch.autograd.grad(forward(oracle, x64, A64, B64, layers64), leaves64, G.double())
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < TOL[torch.float32], f"leaf {i}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_same_in_forward_and_backward(p):
    """Reference built from the helper's explicit mask for the seed the op draws: forward, dx and dA
    agree only if the backward recomputes the very mask the forward used."""
    t = make(2, 33, 40, 3, lead=(5,))
    G = upstream((5, 2, 40), torch.float32)
    torch.manual_seed(123)
    out, grads = run(kernel, t, G, 0.7, dropout_p=p, training=True)
    torch.manual_seed(123)
    seed = dropout.draw_dropout_seed(DEVICE)
    keep = dropout.dropout_mask(seed, (10, 33), p).reshape(5, 2, 33)

    def masked_oracle(x, weight, bias, A, B, u, v, scaling):
        x_d = x * keep.double() / (1 - p)
        return F.linear(x, weight, bias) + oracle(x_d, torch.zeros_like(weight), None, A, B, u, v, scaling)

    ref, ref_grads = run(masked_oracle, as_f64(t), G.double())
    assert_matches(out, grads, ref, ref_grads, t, TOL[torch.float32])
    no_drop, _ = run(kernel, t, G, 0.7, dropout_p=0.0)
    assert rel_err(out, no_drop) > 1e-3, "dropout changed nothing"


ROW_SCALE_CASES = {  # (M, K, N, r, make kwargs): rows = 1, rank 1, odd N, no bias, 3-D and sliced x, presets
    "M37-r16": (37, 33, 40, 16, {}),
    "M1-r1-nobias": (1, 5, 3, 1, dict(bias=False)),
    "M7-N17-lead3d": (7, 33, 17, 5, dict(lead=(2,))),
    "x_sliced-conv1d": (7, 33, 40, 3, dict(x_layout="sliced", w_layout="conv1d")),
    "frozen-c-lora": (7, 33, 40, 3, dict(u=False, v=False, train=("x", "A", "B"))),
    "c-only": (7, 33, 40, 3, dict(train=("c",))),
    "simple-dora-no-x": (7, 33, 40, 3, dict(u=False, v=False, train=("A", "B", "c"))),
}


@pytest.mark.parametrize("case", list(ROW_SCALE_CASES))
def test_row_scale(case):
    """out = c * (x W^T + adapter) + b: forward and every gradient, dc included."""
    M, K, N, r, kw = ROW_SCALE_CASES[case]
    check(make(M, K, N, r, c=True, **kw))


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["bf16-act-fp32-adapt", "bf16-act-bf16-adapt"])
def test_row_scale_low_precision(dtype, adapter_dtype):
    check(make(37, 33, 40, 16, dtype=dtype, adapter_dtype=adapter_dtype, c=True))


def test_nothing_saved_for_backward_without_grad(monkeypatch):
    """Under no_grad neither h (M, r) nor the pre-scale output y (M, N) is computed for a backward
    that cannot come, even though the adapter tensors and c require grad."""
    t = make(7, 33, 40, 3, c=True)
    calls = []
    original = kernels._forward_impl

    def spy(*args):
        calls.append(args[-2:])  # (store_h, store_y)
        return original(*args)

    monkeypatch.setattr(kernels, "_forward_impl", spy)
    with torch.no_grad():
        out = kernel(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.7, row_scale=t["c"])
    kernel(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.7, row_scale=t["c"])
    assert calls == [(False, False), (True, True)]
    assert out.grad_fn is None
    ref = oracle(*(as_f64(t)[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")), 0.7,
                 row_scale=t["c"].double())
    assert rel_err(out, ref) < TOL[torch.float32]


def test_bias_dtype_must_match_x():
    t = make(3, 8, 5, 2, dtype=torch.bfloat16)
    for backend in ("torch", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TIEDLORA_BACKEND", backend)
            with pytest.raises(TypeError, match="bias dtype torch.float32 must equal x dtype torch.bfloat16"):
                public_tied_lora_linear(t["x"], t["weight"], t["bias"].float(), t["A"], t["B"], row_scale=t["v"])


@pytest.mark.parametrize("c_trains", [True, False], ids=["c-trains", "c-frozen"])
def test_row_scale_saves_preoutput_only_when_trained(c_trains):
    """The pre-scale output y (M, N) is kept for dc = sum_rows(G * y) only when c trains."""
    M, K, N, r = 7, 33, 40, 3
    t = make(M, K, N, r, c=True, train=("x", "A", "B", "u", "v") + (("c",) if c_trains else ()))
    out, saved = _saved_tensors(lambda: run(kernel, t, upstream((M, N), torch.float32))[0])
    assert any(shape == (M, N) for _, shape in saved) == c_trains
    check(t)


def test_row_scale_with_dropout():
    """Dropout on the adapter input with a row scale: the same mask in forward and backward."""
    p = 0.3
    t = make(10, 33, 40, 3, c=True)
    G = upstream((10, 40), torch.float32)
    torch.manual_seed(5)
    out, grads = run(kernel, t, G, 0.7, dropout_p=p, training=True)
    torch.manual_seed(5)
    keep = dropout.dropout_mask(dropout.draw_dropout_seed(DEVICE), (10, 33), p)

    def masked_oracle(x, weight, bias, A, B, u, v, scaling, row_scale):
        y = F.linear(x, weight) + oracle(x * keep.double() / (1 - p), torch.zeros_like(weight), None, A, B, u, v,
                                         scaling)
        return y * row_scale + bias

    ref, ref_grads = run(masked_oracle, as_f64(t), G.double())
    assert_matches(out, grads, ref, ref_grads, t, TOL[torch.float32])


def test_dropout_off_in_eval():
    t = make(7, 33, 40, 3)
    args = (t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.7)
    assert torch.equal(kernel(*args, dropout_p=0.5, training=False), kernel(*args, dropout_p=0.0))


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-act-fp32-adapt", "bf16-act-bf16-adapt", "fp16-act-fp32-adapt",
                              "fp32-act-bf16-adapt"])
def test_low_precision(dtype, adapter_dtype):
    check(make(37, 33, 40, 16, dtype=dtype, adapter_dtype=adapter_dtype))


@pytest.mark.parametrize("c", [False, True], ids=["no-row-scale", "row-scale"])
def test_bf16_activations_keep_fp32_factor_gradients(c):
    """Mixed precision's usual setup, fp32 adapters on bf16 activations: h = x A^T and g = G (B v), of
    which all four factor gradients are made, come from fp32 dots (TF32 on a GPU), as in the
    reference and PEFT. Casting the factors to bf16 for the dot gave 4e-3 to 1.1e-2 relative error.
    With a row scale, y (M, N) and G * c are kept in x's dtype (bf16 rounding, ~3e-3) as the base
    layer's own gradient is; the casts made that 5e-3 to 9e-3."""
    t = make(37, 33, 40, 5, dtype=torch.bfloat16, c=c)
    G = upstream((37, 40), torch.bfloat16)
    _, grads = run(kernel, t, G)
    _, ref_grads = run(oracle, as_f64(t), G.double())
    # the interpreter's dots are IEEE fp32, a GPU's TF32 (~1e-3 more); a row scale adds bf16 rounding of y and G * c
    if c:
        tol = 5e-3 if triton_interpreting() else 6e-3
    else:
        tol = 1e-5 if triton_interpreting() else 2e-3
    for name in ("A", "B", "u", "v") + (("c",) if c else ()):
        assert rel_err(grads[name], ref_grads[name]) < tol, f"d{name}: {rel_err(grads[name], ref_grads[name]):.2e}"


def test_bf16_activations_with_a_bf16_frozen_b_and_fp32_v_keep_fp32_gradients():
    """A frozen B stored in x's dtype (bf16) under an fp32 v: B v is formed in fp32, as the reference
    forms it; rounding it to bf16 for g = G (B v) gave dA and du 3e-3 relative error."""
    t = make(37, 33, 40, 5, dtype=torch.bfloat16, train=("x", "A", "u", "v"))
    t["B"] = t["B"].detach().to(torch.bfloat16)
    G = upstream((37, 40), torch.bfloat16)
    _, grads = run(kernel, t, G)
    _, ref_grads = run(oracle, as_f64(t), G.double())
    tol = 1e-5 if triton_interpreting() else 2e-3
    for name in ("A", "u", "v"):
        assert rel_err(grads[name], ref_grads[name]) < tol, f"d{name}: {rel_err(grads[name], ref_grads[name]):.2e}"


def test_an_infinite_u_gives_infinite_factor_gradients_not_nan():
    """dA and dB scale their row sums by s u after the dot: the tiles' padded rows (zeros) never meet
    the inf, so no NaN appears where the reference has none (0 * inf in padded rows made every entry
    NaN). The reference's row sums of +-inf can be NaN where ours, scaled after summing, are +-inf."""
    t = make(3, 5, 4, 2, train=("A", "B"), v=False)
    with torch.no_grad():
        t["u"][0] = float("inf")
    G = upstream((3, 4), torch.float32).abs() + 0.1
    _, grads = run(kernel, t, G)
    _, ref_grads = run(oracle, as_f64(t), G.double())
    for name in ("A", "B"):
        got, ref = grads[name], ref_grads[name]
        assert not (got.isnan() & ~ref.isnan()).any(), name
        assert torch.equal(got[ref.isinf()], ref[ref.isinf()].float()) and not ref.isfinite().all(), name
        assert rel_err(got[ref.isfinite()], ref[ref.isfinite()]) < 1e-5, name


def test_empty_batch():
    t = make(0, 33, 40, 3, lead=(2,))
    out, grads = run(kernel, t, upstream((2, 0, 40), torch.float32))
    assert out.shape == (2, 0, 40)
    assert grads["x"].shape == (2, 0, 33)
    for name in ("A", "B", "u", "v"):
        assert torch.equal(grads[name], torch.zeros_like(t[name])), name
    t = make(0, 33, 40, 3, c=True)
    _, grads = run(kernel, t, upstream((0, 40), torch.float32))
    assert torch.equal(grads["c"], torch.zeros_like(t["c"]))


def test_deterministic():
    t = make(37, 33, 40, 16, lead=(2,))
    G = upstream((2, 37, 40), torch.float32)
    runs = []
    for _ in range(3):
        torch.manual_seed(7)
        out, grads = run(kernel, t, G, 0.7, dropout_p=0.2)
        runs.append([out.detach()] + [g.clone() for g in grads.values()])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("M,K,N,r", [(37, 33, 40, 16), (5, 65, 70, 3)], ids=["M37-K33-N40-r16", "M5-K65-N70-r3"])
def test_nan_poisoned_allocations(M, K, N, r, nan_allocations):
    check(make(M, K, N, r))
    check(make(M, K, N, r, c=True))


def test_public_op_routes_to_these_kernels(monkeypatch):
    """tiedlora_kernels.tied_lora_linear with TIEDLORA_BACKEND=triton runs this module's kernels.

    The dispatcher imports ``tied_lora_linear_triton`` from this module at call time: a counting
    wrapper in its place shows the call arrives.
    """
    calls = []
    original = kernels.tied_lora_linear_triton

    def counted(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(kernels, "tied_lora_linear_triton", counted)
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    t = make(7, 33, 40, 3, lead=(2,))
    G = upstream((2, 7, 40), torch.float32)

    def public(x, weight, bias, A, B, u, v, scaling):
        return public_tied_lora_linear(x, weight, bias, A, B, u, v, scaling, 0.0, True)

    out, grads = run(public, t, G)
    assert calls, "the public op did not reach the Triton kernels"
    ref, ref_grads = run(oracle, as_f64(t), G.double())
    assert_matches(out, grads, ref, ref_grads, t, TOL[torch.float32])


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) of a block using the op: no graph break, same values as eager."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    t = make(7, 33, 40, 3, lead=(2,), c=True)
    G = upstream((2, 7, 40), torch.float32)

    def block(x, weight, bias, A, B, u, v, scaling, row_scale):
        return torch.tanh(kernel(x, weight, bias, A, B, u, v, scaling, dropout_p=0.1, training=True,
                                 row_scale=row_scale)) * 2

    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):  # the seed drawn as in eager
        torch.manual_seed(11)
        out, grads = run(torch.compile(block, fullgraph=True), t, G)
        grads = {k: g.clone() for k, g in grads.items()}
    torch.manual_seed(11)
    eager, eager_grads = run(block, t, G)
    assert rel_err(out, eager) < 1e-6
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        assert rel_err(grads[name], eager_grads[name]) < 1e-6, name


@pytest.mark.parametrize("setting", ["legacy-high", "new-tf32", "new-ieee"])
def test_tf32_setting_read_through_either_torch_api(setting):
    """torch >= 2.9 refuses the legacy precision getter once the new per-backend setting is used:
    the kernels read whichever API is in use, and an fp32 call runs either way."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    if setting.startswith("new") and not new_api:
        pytest.skip("torch without the fp32_precision API")
    legacy = torch.get_float32_matmul_precision()
    try:
        if setting == "legacy-high":
            torch.set_float32_matmul_precision("high")
        else:
            matmul.fp32_precision = setting.removeprefix("new-")
        want_tf32 = setting != "new-ieee"
        assert common.tf32_allowed() == want_tf32
        assert common.precisions(torch.float32)["MAIN_PREC"] == ("ieee" if common.triton_interpreting() or not want_tf32
                                                                 else "tf32")
        # the compiled kernels' rule, whichever machine runs the test (the interpreter's is always IEEE)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(common, "kernels_interpreted", lambda: False)
            compiled = common.precisions(torch.float32)
            assert compiled["MAIN_PREC"] == compiled["SMALL_PREC"] == ("tf32" if want_tf32 else "ieee")
            assert common.precisions(torch.bfloat16)["SMALL_PREC"] == "tf32" and not compiled["UPCAST"]
        kernel(*(make(3, 8, 5, 2)[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")), 0.5).sum().backward()
    finally:
        if new_api:
            matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision(legacy)


def _public_args(t):
    return dict(x=t["x"], weight=t["weight"], bias=t["bias"], A=t["A"], B=t["B"], u=t["u"], v=t["v"], scaling=0.7)


def test_clear_errors_on_the_triton_route(monkeypatch):
    """What the GPU path cannot do is refused before any launch, naming the argument and the way out."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    t = make(7, 33, 40, 3)
    with pytest.raises(ValueError, match=r"tied_lora_linear \(triton\): weight requires grad"):
        public_tied_lora_linear(**{**_public_args(t), "weight": t["weight"].detach().clone().requires_grad_()})
    base_out = t["x"].detach() @ t["weight"].t()
    with pytest.raises(ValueError, match=r"tied_lora_add \(triton\): bias requires grad"):  # the op named is the one called
        tiedlora_kernels.tied_lora_add(t["x"], base_out, t["bias"].detach().clone().requires_grad_(), t["A"], t["B"])
    t64 = make(7, 33, 40, 3, dtype=torch.float64, adapter_dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16 on the Triton backend, got dtype "
                                        r"torch.float64; use TIEDLORA_BACKEND=torch"):
        public_tied_lora_linear(**_public_args(t64))
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
            public_tied_lora_linear(**_public_args(t))


def test_traced_graphs_record_the_custom_ops_not_the_launches():
    """Eager calls run a plain autograd.Function; anything that traces a graph must see the custom
    ops instead: a make_fx trace (AOTAutograd without dynamo) of forward + backward, and compiled
    autograd tracing the backward of an eager forward. Both gave the right gradients through the
    custom op before eager mode had its own path, and must still."""
    from torch._dynamo import compiled_autograd
    from torch.fx.experimental.proxy_tensor import make_fx

    t = make(6, 8, 5, 3)
    G = upstream((6, 5), torch.float32)
    ref, ref_grads = run(kernel, t, G)

    def fwd_bwd(x, A, B, u, v):
        out = kernel(x, t["weight"], t["bias"], A, B, u, v, 0.7)
        return (out, *torch.autograd.grad(out, (x, A, B, u, v), G))

    args = [t[n] for n in ("x", "A", "B", "u", "v")]
    graph = make_fx(fwd_bwd)(*args)
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {"tiedlora.tied_lora_linear_forward.default", "tiedlora.tied_lora_linear_backward.default"} <= targets
    traced = graph(*args)
    assert rel_err(traced[0], ref) < 1e-6
    for name, got in zip(("x", "A", "B", "u", "v"), traced[1:]):
        assert rel_err(got, ref_grads[name]) < 1e-6, name

    for n in ("x", "A", "B", "u", "v"):
        t[n].grad = None
    out = kernel(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.7)
    with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        out.backward(G)
    for name in ("x", "A", "B", "u", "v"):
        assert rel_err(t[name].grad, ref_grads[name]) < 1e-6, name


def test_double_backward_is_refused_clearly(monkeypatch):
    """create_graph=True through the kernels raises a clear error (the torch backend differentiates twice)."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    t = make(7, 33, 40, 3)
    out = public_tied_lora_linear(**_public_args(t))
    with pytest.raises(RuntimeError, match="double backward .* not supported by the Triton kernels; use "
                                           "TIEDLORA_BACKEND=torch"):
        torch.autograd.grad(out.square().sum(), [t["x"], t["A"]], create_graph=True)


def test_batched_gradients_are_refused_clearly(monkeypatch):
    """autograd.grad(is_grads_batched=True) (jacobian(vectorize=True)) over a forward that ran the kernels:
    a clear error naming the way out, not the kernels failing on a tensor without storage."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    t = make(7, 33, 40, 3)
    out = public_tied_lora_linear(**_public_args(t))
    with pytest.raises(RuntimeError, match="batched gradients .* have no Triton kernels; use TIEDLORA_BACKEND=torch"):
        torch.autograd.grad(out, [t["x"], t["A"]], torch.randn(4, *out.shape), is_grads_batched=True)


@pytest.mark.parametrize("K,N", [(0, 40), (33, 0), (0, 0)], ids=["K0", "N0", "K0-N0"])
def test_zero_features_give_the_right_result(K, N, monkeypatch):
    """K = 0 (out = b, every adapter gradient 0) and N = 0 (an empty output) have one right answer,
    on every backend: the GPU path gives it as the reference does."""
    t = make(5, K, N, 3, lead=(2,))
    G = upstream((2, 5, N), torch.float32)
    out, grads = run(kernel, t, G)
    ref, ref_grads = run(oracle, as_f64(t), G.double())
    assert out.shape == ref.shape == (2, 5, N)
    assert torch.allclose(out.double(), ref, atol=1e-6)
    for name, g in grads.items():
        if g is not None:
            assert g.shape == t[name].shape and torch.allclose(g.double(), ref_grads[name], atol=1e-6), name


# Realistic shapes on a GPU (skipped without one). bf16 rel. error against float64 stays ~3e-3.

GPU_SHAPES = [(4096, 4096, 4096, 16), (4096, 4096, 4096, 128), (1, 4096, 4096, 16), (64, 4096, 11008, 64),
              (4095, 4000, 4100, 256)]


@pytest.mark.cuda
@pytest.mark.parametrize("M,K,N,r", GPU_SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in GPU_SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_realistic(M, K, N, r, dtype):
    check(make(M, K, N, r, dtype=dtype, adapter_dtype=torch.float32, lead=()), tol=TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["vera", "tl6"])
def test_gpu_bf16_adapters_presets(preset):
    spec = PRESETS[preset]
    t = make(2048, 2048, 3072, 16, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16, u=spec["u"], v=spec["v"],
             train=spec["train"], w_layout="conv1d")
    check(t, tol=TOL[torch.bfloat16])


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 4096])
def test_gpu_row_scale(M):
    """Simple DoRA's shape of the op on a GPU: bf16 activations, fp32 adapters, trained magnitude."""
    check(make(M, 4096, 4096, 16, dtype=torch.bfloat16, u=False, v=False, c=True), tol=TOL[torch.bfloat16])


@pytest.mark.cuda
def test_gpu_fp32_and_dropout():
    t = make(1024, 1024, 1536, 32)
    check(t)
    G = upstream((1024, 1536), torch.float32)
    torch.manual_seed(3)
    out, _ = run(kernel, t, G, 0.7, dropout_p=0.1)
    torch.manual_seed(3)
    keep = dropout.dropout_mask(dropout.draw_dropout_seed(DEVICE), (1024, 1024), 0.1)
    assert abs((~keep).float().mean().item() - 0.1) < 0.005
    t64 = as_f64(t)
    ref = F.linear(t64["x"], t64["weight"], t64["bias"]) + oracle(
        t64["x"] * keep.double() / 0.9, torch.zeros_like(t64["weight"]), None, t64["A"], t64["B"], t64["u"],
        t64["v"], 0.7)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.cuda
def test_gpu_decode_under_cuda_graphs():
    """Decode (M = 1, no grad) through torch.compile(mode="reduce-overhead"): CUDA graphs capture the
    adapter kernel and the GEMM; replays match eager."""
    import torch._dynamo

    t = make(1, 1024, 1536, 16, dtype=torch.bfloat16, train=())
    torch._dynamo.reset()
    step = torch.compile(lambda x: public_tied_lora_linear(x, t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"],
                                                           0.7), mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for i in range(4):  # warm-up, record, replays
            x = torch.randn(1, 1024, device=DEVICE, dtype=torch.bfloat16)
            got = step(x).clone()
            want = public_tied_lora_linear(x, t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.7)
            assert rel_err(got, want) < 1e-2, i
    torch._dynamo.reset()


ADD_CASES = {  # tied_lora_add: the adapter over a base layer that computes its own output (quantized bases)
    "M37-r16": (37, 33, 40, 16, {}),
    "M1-r1-nobias-lead3d": (1, 5, 3, 1, dict(bias=False, lead=(2,))),
    "row-scale": (7, 33, 40, 3, dict(c=True)),
    "row-scale-frozen-c": (7, 33, 17, 5, dict(c=True, train=("x", "A", "B", "u", "v"))),
    "only-base-trains": (7, 33, 40, 3, dict(train=())),
    "x_sliced": (7, 33, 40, 3, dict(x_layout="sliced")),
    "bf16": (37, 33, 40, 16, dict(dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("case", list(ADD_CASES))
def test_add_over_a_base_output(case):
    """out = c * (E + s ((x A^T) u) B^T v) + b for a given base output E: forward and every gradient,
    E's included (G, or G * c), against the float64 reference."""
    M, K, N, r, kw = ADD_CASES[case]
    t = make(M, K, N, r, **kw)
    dtype = t["x"].dtype
    E = (torch.randn(t["x"].shape[:-1] + (N,), generator=torch.Generator().manual_seed(3)) * 2).to(DEVICE, dtype)
    E = E.requires_grad_()
    G = upstream(E.shape, dtype)

    def add_op(fn, t, E, G):
        out = fn(t["x"], E, t["bias"], t["A"], t["B"], t["u"], t["v"], 0.7, 0.0, True, t["c"])
        leaves = [E] + [t[n] for n in PARAMS if t[n] is not None and t[n].requires_grad]
        return [out] + list(torch.autograd.grad(out, leaves, G))

    monkey = pytest.MonkeyPatch()
    monkey.setenv("TIEDLORA_BACKEND", "triton")
    try:
        got = add_op(tiedlora_kernels.ops.tied_lora_add, t, E, G)
    finally:
        monkey.undo()
    t64 = as_f64(t)
    want = add_op(reference.tied_lora_add, t64, E.detach().double().requires_grad_(), G.double())
    names = ["out", "E"] + [n for n in PARAMS if t[n] is not None and t[n].requires_grad]
    for name, a, b in zip(names, got, want):
        assert a.dtype == (dtype if name in ("out", "E", "x") else t[name].dtype), name
        assert rel_err(a, b) < TOL[dtype], f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_of", ["A", "B"])
def test_fp16_activations_with_tiny_fp32_factors(scale_of, factor_dtype):
    """fp16 activations with an fp32 (or bf16: adapter_dtype="bfloat16" on an fp16 model) factor far
    below fp16's normal range and a scale s that makes up for it (gamma's scaled initialisation:
    A ~ 1e-6, s ~ 1e6): the rank-r dots keep the factor's exponent range, as the reference does by
    computing in fp32. Casting A (forward) or (B v) (backward) to fp16 flushed them to zero:
    relative errors of 0.14 to 1.0 (bf16 A: 1e-2 to 0.14)."""
    tiny = 1e-6 if scale_of == "A" else 1e-7
    t = make(37, 33, 40, 16, dtype=torch.float16, adapter_dtype=factor_dtype)
    with torch.no_grad():
        t[scale_of].mul_(tiny)
    G = upstream((37, 40), torch.float16)
    out, grads = run(kernel, t, G, scaling=0.7 / tiny)
    ref, ref_grads = run(oracle, as_f64(t), G.double(), scaling=0.7 / tiny)
    assert_matches(out, grads, ref, ref_grads, t, TOL[torch.float16])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_device_that_is_not_current():
    """A layer on cuda:1 called while cuda:0 is current (device_map="auto"): the launches go to the
    tensors' device."""
    t = make(64, 256, 384, 16, dtype=torch.bfloat16)
    moved = {k: (v.detach().to("cuda:1").requires_grad_(v.requires_grad) if v is not None else None)
             for k, v in t.items()}
    G = upstream((64, 384), torch.bfloat16).to("cuda:1")
    with torch.cuda.device(0):
        out, grads = run(kernel, moved, G)
    ref, ref_grads = run(oracle, as_f64(moved), G.double())
    assert_matches(out, grads, ref, ref_grads, moved, TOL[torch.bfloat16])


@pytest.mark.parametrize("M", [0, 3])
def test_backward_op_matches_its_fake_kernel_for_transposed_factors(M):
    """torch.compile checks the real outputs' strides against the fake kernel's: an empty batch
    returned zeros_like(A) with a transposed factor's strides, and the compiled backward failed."""
    if not triton_interpreting() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    from tiedlora_kernels.ops import tied_lora as T

    g = torch.Generator().manual_seed(0)
    K, N, r = 8, 6, 3
    x, G = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    A, B = torch.randn(K, r, generator=g).t(), torch.randn(r, N, generator=g).t()
    u, v = torch.randn(r, generator=g), torch.randn(N, generator=g)
    h = torch.randn(M, r, generator=g)
    args = (G, x, torch.randn(N, K, generator=g), A, B, u, v, None, h, None, None, 0.5, 0.0,
            [True, True, True, True, True, False, False])
    torch.library.opcheck(T._backward_op, args, test_utils=("test_faketensor",))
