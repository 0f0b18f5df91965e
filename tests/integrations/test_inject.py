"""inject / merge / unmerge on real transformers models built from configs."""

import copy

import pytest
import torch

from helpers import randomize_adapters, rel_err, tiny_gpt2, tiny_llama
from tiedlora_kernels import (PRESETS, TiedLoRAConfig, TiedLoRALinear, adapted_layers, inject, merge,
                              trainable_parameters, unmerge)

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_inject_starts_as_identity_and_trains_only_adapters(family, preset):
    model = tiny_gpt2() if family == "gpt2" else tiny_llama(family=family)
    before = model(IDS).logits
    inject(model, TiedLoRAConfig(rank=4, preset=preset))
    assert torch.equal(model(IDS).logits, before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("tiedlora.") or ".adapter_" in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable_parameters(model)["total"]


def test_tied_factors_registered_once():
    model = tiny_llama(n_layer=3)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", target_modules=["q_proj", "v_proj"]))
    names = [n for n, _ in model.named_parameters() if n.startswith("tiedlora.")]
    assert sorted(names) == ["tiedlora.q_proj.A", "tiedlora.q_proj.B", "tiedlora.v_proj.A", "tiedlora.v_proj.B"]
    sd = model.state_dict()
    assert sum(k.startswith("tiedlora.") for k in sd) == 4
    assert not any(".factors" in k or "_factors" in k for k in sd)
    layers = dict(adapted_layers(model))
    assert len(layers) == 6
    assert len({id(m.factors.A) for n, m in layers.items() if n.endswith("q_proj")}) == 1
    # Base weights keep their state_dict keys (drop-in).
    assert "model.layers.0.self_attn.q_proj.weight" in sd


@pytest.mark.parametrize("target,expected", [
    (["q_proj"], {"q_proj"}),
    (r"model\.layers\.\d+\.mlp\.(up|down)_proj", {"up_proj", "down_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_target_module_forms(target, expected):
    model = tiny_llama()
    inject(model, TiedLoRAConfig(rank=2, target_modules=target))
    assert {m.kind for _, m in adapted_layers(model)} == expected
    assert not isinstance(model.lm_head, TiedLoRALinear)


def test_unknown_target_and_double_inject_and_big_rank_raise():
    with pytest.raises(ValueError, match="'qkv_proj' matches no nn.Linear"):
        inject(tiny_llama(), TiedLoRAConfig(rank=2, target_modules=["qkv_proj"]))
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        inject(tiny_llama(), TiedLoRAConfig(rank=2, target_modules=r"nothing\.here"))
    model = inject(tiny_llama(), TiedLoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has tiedlora adapters"):
        inject(model, TiedLoRAConfig(rank=2))
    with pytest.raises(ValueError, match="rank=40 is larger than layer"):
        inject(tiny_llama(), TiedLoRAConfig(rank=40))
    with pytest.raises(TypeError, match="wrap it in an nn.Module"):
        inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), TiedLoRAConfig(rank=2))
    with pytest.raises(TypeError, match="must be a TiedLoRAConfig"):
        inject(tiny_llama(), {"rank": 2})


def test_tied_gradient_equals_sum_of_untied_copies():
    """A tied model's dA/dB equal the sum of the per-layer grads of an untied model holding copies."""
    tied = tiny_llama(n_layer=3)
    untied = copy.deepcopy(tied)
    inject(tied, TiedLoRAConfig(rank=4, preset="tl6", target_modules=["q_proj", "down_proj"]))
    inject(untied, TiedLoRAConfig(rank=4, preset="tl6", target_modules=["q_proj", "down_proj"], tied=False))
    randomize_adapters(tied)
    with torch.no_grad():
        lt, lu = dict(adapted_layers(tied)), dict(adapted_layers(untied))
        for n in lt:
            lu[n].factors.A.copy_(lt[n].factors.A)
            lu[n].factors.B.copy_(lt[n].factors.B)
            lu[n].adapter_u.copy_(lt[n].adapter_u)
            lu[n].adapter_v.copy_(lt[n].adapter_v)
    for m in (tied, untied):
        m(IDS, labels=IDS).loss.backward()
    for kind in ("q_proj", "down_proj"):
        for t in ("A", "B"):
            summed = sum(getattr(lu[n].factors, t).grad for n in lu if n.endswith(kind))
            assert rel_err(getattr(tied.tiedlora[kind], t).grad, summed) < 1e-6


def test_shapes_differ_within_kind_use_leading_slices():
    """Layers of one kind with different sizes share one A (r, K_max), B (N_max, r) (PEFT VeRA's rule)."""
    model = torch.nn.ModuleDict({"a": torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 6)}),
                                 "b": torch.nn.ModuleDict({"proj": torch.nn.Linear(6, 10)})})
    inject(model, TiedLoRAConfig(rank=2, preset="tl6", target_modules=["proj"]))
    f = model.tiedlora["proj"]
    assert tuple(f.A.shape) == (2, 8) and tuple(f.B.shape) == (10, 2)
    randomize_adapters(model)
    x = torch.randn(3, 6)
    y = model["b"]["proj"](x)
    y.square().sum().backward()
    assert f.A.grad[:, 6:].abs().sum() == 0 and f.A.grad[:, :6].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_merge_unmerge_round_trip(family, dtype, preset):
    model = (tiny_gpt2() if family == "gpt2" else tiny_llama()).to(dtype)
    inject(model, TiedLoRAConfig(rank=4, preset=preset))
    randomize_adapters(model)
    w0 = {n: m.weight.detach().clone() for n, m in adapted_layers(model)}
    adapted = model(IDS).logits
    merge(model)
    assert all(m.merged for _, m in adapted_layers(model))
    merged_norm = {n: m.weight.double().norm() for n, m in adapted_layers(model)}
    merged = model(IDS).logits
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(merged, adapted) < tol
    unmerge(model)
    for n, m in adapted_layers(model):
        assert m.weight.dtype == dtype
        # Storing W' = W + dW in the weight dtype rounds it once: the round trip is exact up to that rounding.
        eps = torch.finfo(dtype).eps
        assert rel_err(m.weight, w0[n]) < 2 * eps * (1 + merged_norm[n] / w0[n].double().norm())
    assert rel_err(model(IDS).logits, adapted) < tol


def test_generate_and_gradient_checkpointing():
    model = tiny_llama(n_layer=2)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    randomize_adapters(model)
    out = model.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(IDS, labels=IDS).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, ref[n]) < 1e-6, n


def test_meta_device_inject_then_materialize():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=70, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    assert model.tiedlora["q_proj"].A.is_meta
    assert trainable_parameters(model)["total"] > 0
    model.to_empty(device="cpu")
    assert not model.tiedlora["q_proj"].A.is_meta


@pytest.mark.parametrize("preset", ["tl6", "lora", "vera", "partial", "tensor_embed", "dora"])
def test_meta_inject_then_reset_adapters_equals_inject_on_loaded_model(preset):
    """inject on meta -> to_empty -> load base weights -> reset_adapters: every adapter tensor equals
    what inject draws on the loaded model, bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiedlora_kernels import adapter_named_parameters, reset_adapters

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=70, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    config = TiedLoRAConfig(rank=4, preset=preset)
    torch.manual_seed(0)
    loaded = LlamaForCausalLM(cfg)
    base_state = loaded.state_dict()
    inject(loaded, config)
    with torch.device("meta"):
        lazy = LlamaForCausalLM(cfg)
    inject(lazy, config)
    with pytest.raises(RuntimeError, match="meta device"):
        reset_adapters(lazy)
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(base_state, strict=False)
    reset_adapters(lazy)
    want = dict(adapter_named_parameters(loaded))
    got = dict(adapter_named_parameters(lazy))
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
        assert got[n].requires_grad == want[n].requires_grad, n


def test_bf16_tied_gradients_are_summed_in_fp32():
    """bf16 tied factors: the per-layer gradients are added in fp32 and rounded once, so dA is the
    exact sum correctly rounded to bf16 almost everywhere (a bf16 running sum: about half the entries)."""
    torch.manual_seed(0)
    model = tiny_llama(n_layer=8, hidden=64)
    inject(model, TiedLoRAConfig(rank=8, preset="tl6", adapter_dtype="bfloat16", target_modules=["q_proj"]))
    randomize_adapters(model)
    model(IDS, labels=IDS).loss.backward()
    A = model.tiedlora["q_proj"].A
    assert A.grad.dtype == torch.bfloat16
    # The exact sum, from a float64 copy of the same model (same bf16 values, computed in fp64).
    ref = copy.deepcopy(model).double()
    for p in ref.parameters():
        p.grad = None
    ref(IDS, labels=IDS).loss.backward()
    exact = ref.tiedlora["q_proj"].A.grad
    assert (A.grad == exact.to(torch.bfloat16)).float().mean() > 0.95
    copy.deepcopy(model)  # the shared fp32 casts are not part of the module's state


@pytest.mark.parametrize("call", ["root", "submodule"])
def test_bf16_tied_factors_train_with_fused_optimizers(call):
    """Fused optimizer kernels write parameters without moving their version counter: the shared
    fp32 casts of bf16 tied factors must still be refreshed every step (by the root's forward
    pre-hook, and by the optimizer-step count when a submodule is called directly), so fused AdamW
    follows foreach AdamW's trajectory instead of training on the first step's factors forever."""
    losses = {}
    for impl in ("fused", "foreach"):
        torch.manual_seed(0)
        model = tiny_llama(n_layer=2, hidden=32)
        inject(model, TiedLoRAConfig(rank=4, preset="tl5", adapter_dtype="bfloat16", target_modules=["q_proj", "o_proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-2, **{impl: True})
        run = (lambda: model(IDS, labels=IDS).loss) if call == "root" else \
            (lambda: model.lm_head(model.model(IDS).last_hidden_state).float().pow(2).mean())
        losses[impl] = []
        for _ in range(4):
            opt.zero_grad()
            loss = run()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    assert losses["fused"][-1] < losses["fused"][0] - 1e-3, losses
    for a, b in zip(losses["fused"], losses["foreach"]):
        assert abs(a - b) <= 1e-2 * abs(b), losses


def test_bf16_tied_factors_under_torch_compile_follow_eager(monkeypatch):
    """torch.compile(fullgraph=True) with bf16 tied factors and fused AdamW: the same losses as eager
    (the shared fp32 casts are refreshed by the root's pre-hook inside the compiled graph too)."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    losses = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = tiny_llama(n_layer=2)
        inject(model, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype="bfloat16"))
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if mode == "compiled" else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, fused=True)
        losses[mode] = []
        for _ in range(3):
            opt.zero_grad()
            loss = run(IDS, labels=IDS).loss
            loss.backward()
            opt.step()
            losses[mode].append(loss.item())
    assert losses["eager"][-1] < losses["eager"][0]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
