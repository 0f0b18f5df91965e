"""A few optimizer steps on a tiny model reduce the loss for every preset."""

import pytest
import torch

from helpers import randomize_adapters, tiny_gpt2, tiny_llama
from tiedlora_kernels import PRESETS, TiedLoRAConfig, inject


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_few_steps_reduce_loss(family, preset):
    torch.manual_seed(0)
    model = tiny_llama() if family == "llama" else tiny_gpt2()
    inject(model, TiedLoRAConfig(rank=4, preset=preset))
    model.train()
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("device,preset", [("cpu", p) for p in ("tl6", "lora", "vera", "simple_dora", "dora")]
                         + [pytest.param("cuda", p, marks=pytest.mark.cuda) for p in ("tl6", "dora")])
def test_injected_model_trains_with_the_kernels_under_torch_compile(monkeypatch, device, preset):
    """The Triton kernels (the interpreter on CPU, the GPU's compiler on CUDA: torch 2.11's dynamo
    refused what torch 2.13's traces, so both run) inside torch.compile(fullgraph=True): no graph
    break, the loss falls, and the first step's gradients equal the eager torch reference's."""
    from tiedlora_kernels.ops import triton_interpreting

    if device == "cpu" and not triton_interpreting():
        pytest.skip("the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    model = tiny_llama(n_layer=2).to(device)
    inject(model, TiedLoRAConfig(rank=4, preset=preset))
    # every factor non-zero (B, VeRA's v start at 0): otherwise dA, du and the adapter's part of dx
    # are zero on both sides and the gradient check below compares zeros
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    model(ids, labels=ids).loss.backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad()

    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    opt = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    for step in range(4):
        opt.zero_grad()
        loss = compiled(ids, labels=ids).loss
        loss.backward()
        if step == 0:
            for p, w in zip(params, want):
                assert w.abs().max() > 0 and torch.allclose(p.grad, w, rtol=1e-4, atol=1e-6)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
