"""The backend switch (``tiedlora_kernels/ops/__init__.py``): what it picks, and that it is safe to
trace. torch 2.11's dynamo refuses ``importlib.util.find_spec`` (the first GPU run found
``torch.compile(fullgraph=True)`` of an injected model broken on CUDA by it); CI's torch traces
it, so these tests make every dynamo refuse it, and the dispatch must still compile whole.
"""

import importlib

import pytest
import torch
import torch._dynamo

import tiedlora_kernels
from tiedlora_kernels import ops, reference


@pytest.fixture
def find_spec_refused_by_dynamo(monkeypatch):
    """``importlib.util.find_spec`` as torch 2.11 sees it: a call dynamo will not trace (a graph
    break, an error under fullgraph). The triton lookup cache is cleared so the dispatch asks again."""
    original = importlib.util.find_spec

    def refused(*args, **kwargs):
        torch._dynamo.graph_break()  # a no-op when called eagerly
        return original(*args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", refused)
    ops.triton_available.cache_clear()
    yield
    ops.triton_available.cache_clear()


def _layer_inputs(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    W, b = torch.randn(12, 16, generator=g) / 4, torch.randn(12, generator=g)
    A = (torch.randn(3, 16, generator=g) / 4).requires_grad_(requires_grad)
    B = torch.randn(12, 3, generator=g).requires_grad_(requires_grad)
    return x, W, b, A, B


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_dispatch_compiles_whole_when_dynamo_refuses_find_spec(backend, monkeypatch, find_spec_refused_by_dynamo):
    if backend == "triton" and not (torch.cuda.is_available() or ops.triton_interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    x, W, b, A, B = _layer_inputs()

    def layer(x):
        return tiedlora_kernels.tied_lora_linear(x, W, b, A, B, scaling=0.5)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        out = compiled(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, layer(x))


def test_the_refusal_is_real(find_spec_refused_by_dynamo):
    """The fixture's stand-in does make a fullgraph compile fail when traced: the test above can fail."""
    def looks_up(x):
        return x + (1 if importlib.util.find_spec("torch") is not None else 0)

    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match="(?i)skip|disable|graph break"):
            torch.compile(looks_up, fullgraph=True, backend="eager")(torch.ones(2))
    finally:
        torch._dynamo.reset()


def test_auto_picks_the_gpu_path_only_where_it_runs(monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "auto")
    x, W, b, *_ = _layer_inputs()
    assert ops.resolve_backend(x, W, b) == "torch"  # CPU tensors
    if torch.cuda.is_available():
        xc, Wc = x.cuda(), W.cuda()
        assert ops.resolve_backend(xc, Wc) == "triton"
        assert ops.resolve_backend(xc.double(), Wc.double()) == "torch"
        for fp64 in range(3):  # any fp64 adapter tensor (A, B or v): fp64 math
            operands = [torch.ones(4, 16, device="cuda"), torch.ones(12, 4, device="cuda"), torch.ones(12, device="cuda")]
            operands[fp64] = operands[fp64].double()
            assert ops.resolve_backend(xc, Wc, None, 4, tuple(operands)) == "torch"
        assert ops.resolve_backend(xc, Wc.clone().requires_grad_()) == "torch"  # a base layer that trains
        with torch.no_grad():  # also under no_grad: a reentrant checkpoint's recompute must draw the same mask
            assert ops.resolve_backend(xc, Wc.clone().requires_grad_()) == "torch"
        with torch.autograd.forward_ad.dual_level():  # the kernels have no forward-mode derivative
            assert ops.resolve_backend(xc, Wc) == "torch"


@pytest.mark.parametrize("wide", ["A", "B", "v"])
def test_fp64_adapters_are_refused_by_the_kernels(monkeypatch, wide):
    """The kernels compute in fp32 at most: fp64 factors on fp32 activations would get fp32 gradients
    in fp64 tensors, silently. auto takes the torch route (above); a forced triton route refuses,
    whichever adapter tensor is fp64 (only A's dtype was looked at)."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    x, W, b, A, B = _layer_inputs()
    args = dict(A=A, B=B, v=torch.randn(B.shape[0]))
    args[wide] = args[wide].double()
    with pytest.raises(TypeError, match=r"adapter tensors \(A, B, u, v, row_scale\) must be float32, bfloat16"):
        ops.tied_lora_linear(x, W, b, args["A"], args["B"], None, args["v"])


@pytest.mark.skipif(not ops.triton_interpreting(), reason="CPU tensors on the kernels: the interpreter")
def test_forced_kernels_refuse_forward_mode_ad_and_torch_func(monkeypatch):
    """Forward-mode AD through the kernels dropped the adapter's tangent silently (only the base
    GEMM's survived); torch.func transforms failed inside Triton with storage errors."""
    from torch.autograd import forward_ad

    x, W, b, A, B = _layer_inputs()
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match=r"forward-mode AD .* have no Triton kernels"):
        ops.tied_lora_linear(forward_ad.make_dual(x, torch.randn_like(x)), W, b, A, B)
    with pytest.raises(RuntimeError, match=r"torch.func transforms \(grad, vmap, jvp\) have no Triton kernels"):
        torch.func.grad(lambda a: ops.tied_lora_linear(x, W, b, a, B).sum())(A)
    monkeypatch.setenv("TIEDLORA_BACKEND", "auto")  # auto: the torch route, right tangents
    tangent = torch.randn_like(A)
    with forward_ad.dual_level():
        out = ops.tied_lora_linear(x, W, b, forward_ad.make_dual(A, tangent), B + 1)
        got = forward_ad.unpack_dual(out).tangent
    want = torch.func.jvp(lambda a: reference.tied_lora_linear(x, W, b, a, B + 1), (A,), (tangent,))[1]
    assert got is not None and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value,interpreting", [("1", True), ("true", True), ("ON", True), ("y", True),
                                                ("0", False), ("false", False), ("off", False), ("no", False),
                                                ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, interpreting):
    """"false"/"off"/"no" were read as interpreting: on a GPU the compiled kernels would then take the
    interpreter's tiles and precision; on a CPU a forced triton route crashed in Triton."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert ops.triton_interpreting() is interpreting


@pytest.mark.skipif(not ops.triton_interpreting(), reason="CPU tensors on the kernels: the interpreter")
def test_forced_kernels_run_inference_with_an_unfrozen_base_weight(monkeypatch):
    """No gradient can reach the base weight under no_grad / inference_mode: a forced triton route
    refuses a base layer that trains only where one could (auto keeps such a layer on the torch route
    either way)."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    x, W, b, A, B = _layer_inputs()
    W = W.clone().requires_grad_()
    B = B + 1
    want = reference.tied_lora_linear(x, W.detach(), b, A, B)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            assert torch.allclose(ops.tied_lora_linear(x, W, b, A, B), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight requires grad"):
        ops.tied_lora_linear(x, W, b, A, B)


def test_numpy_scalars_are_accepted_and_tensors_refused():
    import numpy as np

    x, W, b, A, B = _layer_inputs()
    B = B + 1
    want = reference.tied_lora_linear(x, W, b, A, B, scaling=0.5)
    got = ops.tied_lora_linear(x, W, b, A, B, scaling=np.float32(0.5), dropout_p=np.float64(0.0))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="scaling must be a finite real number .* not a tensor"):
        ops.tied_lora_linear(x, W, b, A, B, scaling=torch.tensor(0.5))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.tied_lora_linear(x, W, b, A, B, dropout_p=np.float32(1.5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fractions_and_numpy_float32_scale_and_drop_on_every_route(backend, monkeypatch):
    """Validation takes any real number; the torch route handed a Fraction or a numpy float32 to torch
    as it was (TypeError from the product or F.dropout), the kernels' route converted it."""
    import numpy as np
    from fractions import Fraction

    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    x, W, b, A, B = _layer_inputs(requires_grad=False)
    B = B + 1
    want = reference.tied_lora_linear(x, W, b, A, B, scaling=0.7)
    for scaling in (Fraction(7, 10), np.float32(0.7)):
        got = ops.tied_lora_linear(x, W, b, A, B, scaling=scaling)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), scaling
    for p in (Fraction(3, 10), np.float32(0.3)):
        torch.manual_seed(0)
        got = ops.tied_lora_linear(x, W, b, A, B, scaling=0.7, dropout_p=p, training=True)
        torch.manual_seed(0)
        same = ops.tied_lora_linear(x, W, b, A, B, scaling=0.7, dropout_p=float(p), training=True)
        assert torch.equal(got, same) and not torch.allclose(got, want), p


def test_a_sparse_x_takes_the_torch_route_or_a_clear_error(monkeypatch):
    """A sparse x reached the kernels' reshape ('reshape is not implemented for sparse tensors'); on the
    torch route, with dropout, torch's bernoulli_ (no mask over a sparse tensor)."""
    x, W, b, A, B = _layer_inputs(requires_grad=False)
    sparse = x.reshape(-1, x.shape[-1]).to_sparse()
    want = reference.tied_lora_linear(sparse.to_dense(), W, b, A, B + 1)
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    assert torch.allclose(ops.tied_lora_linear(sparse, W, b, A, B + 1), want, rtol=1e-5, atol=1e-6)
    dense = sparse.to_dense()  # with dropout (torch draws no mask over a sparse tensor: it failed in bernoulli_)
    for layout in (sparse, sparse.to_sparse_csr()):
        torch.manual_seed(3)
        got = ops.tied_lora_linear(layout, W, b, A, B + 1, dropout_p=0.3, training=True)
        torch.manual_seed(3)
        same = ops.tied_lora_linear(dense, W, b, A, B + 1, dropout_p=0.3, training=True)  # (the same mask)
        assert torch.allclose(got, same, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, want)
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    with pytest.raises(TypeError, match=r"x must be a dense \(strided\) tensor on the Triton backend, got layout "
                       r"torch.sparse_coo"):
        ops.tied_lora_linear(sparse, W, b, A, B + 1)


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "cublas")
    x, W, *_ = _layer_inputs()
    with pytest.raises(ValueError, match="TIEDLORA_BACKEND must be one of"):
        ops.resolve_backend(x, W)


def test_gpu_rank_limits_follow_shared_memory(monkeypatch):
    """Ranks the kernels fit: 128 on sm_80/sm_90 (163/227 KiB of shared memory per block), 64 on
    sm_86/89 (99 KiB), 32 below; from torch's reported opt-in limit, else the capability table."""
    from types import SimpleNamespace

    devices = [SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=232448),
               SimpleNamespace(major=8, minor=6),  # no reported limit: the table's 99 KiB
               SimpleNamespace(major=7, minor=5, shared_memory_per_block_optin=65536)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(devices))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: devices[i])
    ops.gpu_rank_limits.cache_clear()
    try:
        assert ops.gpu_rank_limits() == (128, 64, 32)
    finally:
        ops.gpu_rank_limits.cache_clear()


@pytest.mark.cuda
def test_a_rank_the_kernels_do_not_fit_takes_the_torch_path_or_a_clear_error(monkeypatch):
    limit = ops.gpu_rank_limits()[torch.cuda.current_device()]
    x, W = torch.randn(4, 16, device="cuda"), torch.randn(12, 16, device="cuda")
    monkeypatch.setenv("TIEDLORA_BACKEND", "auto")
    assert ops.resolve_backend(x, W, None, limit) == "triton"
    assert ops.resolve_backend(x, W, None, limit + 1) == "torch"
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    with pytest.raises(ValueError, match=rf"rank r = A.shape\[0\] = {limit + 1} is above {limit}"):
        ops.resolve_backend(x, W, None, limit + 1)


def test_wide_dot_rule():
    """fp32 (or any other-dtype) factors on 16-bit activations take the fp32 dot; a scaled factor on
    fp16 too (fp16's range); bf16 factors on bf16 activations stay narrow, scaled by a bf16 v or not,
    and go wide under an fp32 v (B v is formed in fp32, as the reference forms it)."""
    from tiedlora_kernels.ops.common import wide_dot

    t = lambda dt: torch.empty(2, 2, dtype=dt)  # noqa: E731
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    v = torch.empty(2)
    assert wide_dot(t(bf16), t(fp32)) and wide_dot(t(fp16), t(fp32)) and wide_dot(t(fp16), t(bf16))
    assert wide_dot(t(fp16), t(fp16), v) and not wide_dot(t(fp16), t(fp16))
    assert not wide_dot(t(bf16), t(bf16)) and not wide_dot(t(bf16), t(bf16), v.bfloat16())
    assert wide_dot(t(bf16), t(bf16), v)
    assert not wide_dot(t(fp32), t(fp32), v) and not wide_dot(t(fp32), t(bf16))


@pytest.mark.parametrize("op", ["linear", "add"])
def test_a_training_flag_that_is_no_bool_is_refused(op):
    """training="False" is truthy: the triton route applied dropout with it, the torch route failed
    inside dropout(). The public op and the reference refuse it, naming the argument, before any
    route is chosen."""
    g = torch.Generator().manual_seed(0)
    x, W, A, B = (torch.randn(*s, generator=g) for s in ((3, 8), (6, 8), (2, 8), (6, 2)))
    for fn in (getattr(tiedlora_kernels, f"tied_lora_{op}"), getattr(reference, f"tied_lora_{op}")):
        second = W if op == "linear" else x @ W.t()
        with pytest.raises(TypeError, match=r"training must be a bool"):
            fn(x, second, None, A, B, None, None, 1.0, 0.5, "False")


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_jit_trace_takes_the_torch_route_or_refuses_clearly(backend, monkeypatch):
    """torch.jit.trace records ops as they run, with sizes as tensors: auto takes the torch route there
    (on a GPU it took the kernels, whose launchers failed on a tensor size with an AttributeError), and
    a forced triton route says what to do."""
    if backend == "triton" and not (torch.cuda.is_available() or ops.triton_interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, W, b, A, B = (t.detach().to(device) for t in _layer_inputs())

    def layer(x):
        return tiedlora_kernels.tied_lora_linear(x, W, b, A, B, scaling=0.5)

    with torch.no_grad():
        if backend == "triton":
            with pytest.raises(RuntimeError, match="torch.jit.trace cannot record the Triton kernels; use "
                                                   "TIEDLORA_BACKEND=auto or torch"):
                torch.jit.trace(layer, (x,))
            return
        traced = torch.jit.trace(layer, (x,))
        x2 = torch.randn_like(x)
        want = reference.tied_lora_linear(x2, W, b, A, B, None, None, 0.5)
        assert torch.allclose(traced(x2), want, rtol=1e-5, atol=1e-6)
