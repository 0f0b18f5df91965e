"""Mixed precision with torch.autocast over an fp32 model (HF Trainer's bf16=True): the adapted
layers compute as F.linear does under autocast (activations and base weight in the autocast
dtype), the adapters stay fp32 and train."""

import pytest
import torch

from helpers import randomize_adapters, rel_err, tiny_llama
from tiedlora_kernels import TiedLoRAConfig, adapter_named_parameters, inject, tied_lora_linear
from tiedlora_kernels.ops import triton_interpreting

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_under_autocast_equals_the_op_on_cast_operands(backend, device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if backend == "triton" and device == "cpu" and not triton_interpreting():
        pytest.skip("the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(5, 32, generator=g), torch.randn(24, 32, generator=g) / 6, torch.randn(24, generator=g)
    x, W, b = x.to(device), W.to(device), b.to(device)
    A = (torch.randn(4, 32, generator=g) / 6).to(device).requires_grad_()
    B = torch.randn(24, 4, generator=g).to(device).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = tied_lora_linear(x, W, b, A, B, scaling=0.5)
    want = tied_lora_linear(x.bfloat16(), W.bfloat16(), b.bfloat16(), A, B, scaling=0.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)
    out.float().square().sum().backward()
    assert A.grad is not None and A.grad.dtype == torch.float32


@pytest.mark.parametrize("preset", ["tl6", "dora"])
def test_fp32_model_trains_under_autocast(preset, monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    model = tiny_llama(n_layer=2, hidden=32)
    inject(model, TiedLoRAConfig(rank=4, preset=preset))
    randomize_adapters(model)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in adapter_named_parameters(model) if p.requires_grad}
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    fp32_loss = model(ids, labels=ids).loss  # the same model without autocast: close, not equal
    assert rel_err(loss.float(), fp32_loss) < 2e-2


@pytest.mark.parametrize("preset", ["tl_extra", "partial", "dora"])
def test_effective_tensors_stay_fp32_under_autocast(preset):
    torch.manual_seed(0)
    model = tiny_llama(n_layer=2, hidden=32)
    inject(model, TiedLoRAConfig(rank=4, preset=preset))
    randomize_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj
    want = layer.op_tensors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.op_tensors()
    for a, b in zip(got, want):
        if b is not None:
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
