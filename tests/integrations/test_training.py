"""A few optimizer steps on a tiny model reduce the loss for every preset."""

import pytest
import torch

from helpers import tiny_gpt2, tiny_llama
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
