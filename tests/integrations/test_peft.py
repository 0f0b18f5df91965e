"""from_peft: HF PEFT LoRA and VeRA models become ours with identical logits and gradients."""

import pytest
import torch

from helpers import rel_err, tiny_gpt2, tiny_llama
from tiedlora_kernels import adapted_layers, from_peft, trainable_parameters

peft = pytest.importorskip("peft")
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomize(model, names):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _loss_and_grads(model, key):
    model.zero_grad()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and key(n)}


def check_parity(pm, peft_key, ours_tensor):
    """PEFT model vs from_peft(PEFT model): logits, loss, and each PEFT gradient against ours.

    ``ours_tensor(layers, peft_param_name)`` names our tensor that a PEFT parameter became."""
    logits_p = pm(IDS).logits.detach()
    loss_p, grads_p = _loss_and_grads(pm, lambda n: peft_key in n)
    ours = from_peft(pm)
    assert rel_err(ours(IDS).logits, logits_p) < 1e-6
    loss_o, _ = _loss_and_grads(ours, lambda n: True)
    assert rel_err(loss_o, loss_p) < 1e-6
    layers = dict(adapted_layers(ours))
    for n, g in grads_p.items():
        assert rel_err(ours_tensor(layers, n).grad, g) < 1e-5, n
    assert trainable_parameters(ours)["total"] == sum(g.numel() for g in grads_p.values())


def _layer(layers, peft_name, sep):
    return layers[peft_name.removeprefix("base_model.model.").split(sep)[0]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_parity(family):
    base = tiny_llama() if family == "llama" else tiny_gpt2()
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "c_fc"]
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                   fan_in_fan_out=family == "gpt2"))
    _randomize(pm, ["lora_B"])
    check_parity(pm, "lora_", lambda layers, n: getattr(_layer(layers, n, ".lora_").factors,
                                                        "A" if ".lora_A." in n else "B"))


def test_vera_parity():
    base = tiny_llama()
    pm = peft.get_peft_model(base, peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj"],
                                                   vera_dropout=0.0))
    _randomize(pm, ["vera_lambda_b"])
    check_parity(pm, "vera_lambda", lambda layers, n: getattr(_layer(layers, n, ".vera_lambda"),
                                                              "adapter_u" if "lambda_d" in n else "adapter_v"))
