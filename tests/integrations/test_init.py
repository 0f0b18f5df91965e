"""Initialisation: each preset's draw (bounds, spread, fan-in per factor, the zero factor), and
VeRA's against PEFT's own.

The expected initialisers are written out here from the README's preset table, not read back from
``PRESETS``, so a changed table entry fails too. Fan-ins are given by the test: K for A (r, K), r for
B (N, r); the shapes are chosen so that K, N and r all differ (a swapped fan-in changes the bound
by 2x or more). Draws are seeded, so the statistical bounds below are deterministic, and they hold
with a wide margin (n >= 1024 samples: the relative standard error of a uniform's std is ~1.4%).
"""

import math

import pytest
import torch
import torch.nn as nn

from helpers import tiny_llama
from tiedlora_kernels import PRESETS, TiedLoRAConfig, adapted_layers, inject
from tiedlora_kernels.integrations.inject import init_factor

K, N, R, LAYERS = 256, 64, 16, 3

#: preset -> {tensor: initialiser}; "kaiming" = U(+-sqrt(6/fan_in)), "lora_kaiming" = U(+-1/sqrt(fan_in)),
#: a number = constant fill, None = absent.
INIT = {
    "lora": dict(A="lora_kaiming", B="zeros", u=None, v=None),
    "vera": dict(A="kaiming", B="kaiming", u=0.1, v=0.0),
    "tl1": dict(A="zeros", B="kaiming", u=None, v=None),
    "tl2": dict(A="zeros", B="kaiming", u=1.0, v=1.0),
    "tl3": dict(A="kaiming", B="zeros", u=None, v=None),
    "tl4": dict(A="kaiming", B="zeros", u=1.0, v=None),
    "tl5": dict(A="kaiming", B="zeros", u=None, v=None),
    "tl6": dict(A="kaiming", B="zeros", u=1.0, v=1.0),
    "partial": dict(A="kaiming", B="zeros", u=None, v=None),
    "tl_extra": dict(A="kaiming", B="zeros", u=None, v=None),
    "tensor_embed": dict(A="kaiming", B="zeros", u=None, v=None),
    "dora": dict(A="lora_kaiming", B="zeros", u=None, v=None),
    "simple_dora": dict(A="lora_kaiming", B="zeros", u=None, v=None),
}
#: Per-layer tensors besides u, v: mixing weights w ~ N(0, 1/k) (checked below), M = I, m = ||W||_row.
OWN = {"partial": {"adapter_wA", "adapter_wB"}, "tl_extra": {"adapter_M"}, "tensor_embed": {"adapter_wM"},
       "dora": {"adapter_m"}, "simple_dora": {"adapter_m"}}
#: The trained, randomly initialised factors: drawn divided by gamma (seed 003's multiply and divide).
GAMMA_DIVIDED = {"lora": "A", "tl5": "A", "tl6": "A", "partial": "A", "tl_extra": "A", "tensor_embed": "A",
                 "dora": "A", "simple_dora": "A"}


class Stack(nn.Module):
    """LAYERS blocks, each one ``proj`` (K -> N): one kind, every layer the same shape."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(K, N)}) for _ in range(LAYERS))


def check_uniform(t: torch.Tensor, bound: float, what: str) -> None:
    t = t.detach().double()
    assert t.numel() >= 1024, what
    top = float(t.abs().max())
    assert 0.97 * bound <= top <= bound, (what, top, bound)
    assert float(t.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05), what
    assert abs(float(t.mean())) < 0.05 * bound, what


def check_normal(t: torch.Tensor, std: float, rel: float, what: str) -> None:
    t = t.detach().double()
    assert float(t.std()) == pytest.approx(std, rel=rel), what
    assert abs(float(t.mean())) < 4 * std / math.sqrt(t.numel()), what


def check_factor(t: torch.Tensor, init: str, fan_in: int, divisor: float, what: str) -> None:
    if init == "zeros":
        assert t.numel() > 0 and torch.count_nonzero(t) == 0, what
    elif init == "kaiming":
        check_uniform(t, math.sqrt(6 / fan_in) / divisor, what)
    elif init == "lora_kaiming":
        check_uniform(t, 1 / math.sqrt(fan_in) / divisor, what)
    else:
        raise AssertionError(init)


def test_the_table_covers_every_preset():
    assert set(INIT) == set(PRESETS)


@pytest.mark.parametrize("gamma", [1.0, 4.0])
@pytest.mark.parametrize("preset", sorted(INIT))
def test_preset_init_statistics(preset, gamma):
    model = Stack()
    inject(model, TiedLoRAConfig(rank=R, preset=preset, gamma=gamma, seed=3))
    want = INIT[preset]
    layers = [m for _, m in adapted_layers(model)]
    # Each factor tensor once (tied: one per kind; untied: one per layer), bank slices one by one.
    factors = {id(m.factors): m.factors for m in layers}.values()
    for name, fan_in in (("A", K), ("B", R)):
        divisor = gamma if GAMMA_DIVIDED.get(preset) == name else 1.0
        for f in factors:
            t = getattr(f, name)
            for i, draw in enumerate(t if f.banked else [t]):
                check_factor(draw, want[name], fan_in, divisor, f"{preset}.{name}[{i}]")
            if f.banked and want[name] != "zeros":  # each bank slice its own draw
                assert not torch.equal(t[0], t[1])
    if len(factors) > 1:  # untied layers draw independently
        a = [f.A for f in factors]
        assert not torch.equal(a[0], a[1])
    for m in layers:
        for name in ("u", "v"):
            t = getattr(m, f"adapter_{name}")
            if want[name] is None:
                assert t is None, (preset, name)
            else:
                assert torch.equal(t, torch.full_like(t, want[name])), (preset, name)
        own = {n for n in ("adapter_wA", "adapter_wB", "adapter_M", "adapter_wM", "adapter_m")
               if getattr(m, n) is not None}
        assert own == OWN.get(preset, set()), preset
        if m.adapter_M is not None:
            assert torch.equal(m.adapter_M, torch.eye(R))
        if m.adapter_m is not None:
            assert torch.allclose(m.adapter_m, m.weight.detach().norm(dim=1), rtol=1e-6, atol=0)


def test_mixing_weights_and_the_tensor_core_draws():
    """Partial tying's wA, wB and tensor embedding's w ~ N(0, 1/k); its tied LM ~ N(0, 1/r)."""
    k = 64
    partial = Stack()
    inject(partial, TiedLoRAConfig(rank=R, preset="partial", banks=(k, k)))
    tensor = Stack()
    inject(tensor, TiedLoRAConfig(rank=R, preset="tensor_embed", core_bank=k))
    for model, names in ((partial, ("adapter_wA", "adapter_wB")), (tensor, ("adapter_wM",))):
        for name in names:
            w = torch.cat([getattr(m, name) for _, m in adapted_layers(model)])
            check_normal(w, 1 / math.sqrt(k), rel=0.2, what=name)
    check_normal(tensor.tiedlora["proj"].core_bank, 1 / math.sqrt(R), rel=0.05, what="LM")


def test_draws_are_seeded_per_kind_and_tensor():
    """The same config draws the same adapter (what save_adapter relies on to skip frozen factors);
    another seed or another kind draws another one."""
    a, b, c = Stack(), Stack(), Stack()
    for model, seed in ((a, 0), (b, 0), (c, 1)):
        inject(model, TiedLoRAConfig(rank=R, preset="vera", seed=seed))
    assert torch.equal(a.tiedlora["proj"].A, b.tiedlora["proj"].A)
    assert not torch.equal(a.tiedlora["proj"].A, c.tiedlora["proj"].A)
    llama = tiny_llama()
    inject(llama, TiedLoRAConfig(rank=4, preset="vera", target_modules=["q_proj", "o_proj"]))
    assert not torch.equal(llama.tiedlora["q_proj"].A, llama.tiedlora["o_proj"].A)


def test_factor_initialisers_match_peft_and_torch_draws():
    """Our kaiming_uniform is PEFT VeRA's ``_kaiming_init`` (A then B from one generator), and our
    lora_kaiming is ``nn.init.kaiming_uniform_(a=sqrt(5))``, PEFT LoRA's A: value for value."""
    from peft.tuners.vera.model import _kaiming_init

    key = 0xFFFF
    g_peft, g_ours = torch.Generator().manual_seed(key), torch.Generator().manual_seed(key)
    for shape in ((R, K), (N, R)):
        want = _kaiming_init(shape, generator=g_peft)
        got = init_factor(shape, "kaiming_uniform", g_ours)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    want = nn.init.kaiming_uniform_(torch.empty(R, K), a=math.sqrt(5), generator=torch.Generator().manual_seed(1))
    got = init_factor((R, K), "lora_kaiming", torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_vera_init_against_peft_vera_model():
    """A PEFT VeRA model and ours on the same base: projections from the same distribution (same
    bound and spread for the same fan-in), u = lambda_d = d_initial, v = lambda_b = 0."""
    peft = pytest.importorskip("peft")
    r, hidden = 16, 256
    targets = ["q_proj", "o_proj"]  # every target reads `hidden` inputs: one fan-in for PEFT's and ours
    pm = peft.get_peft_model(tiny_llama(hidden=hidden), peft.VeraConfig(r=r, target_modules=targets))
    ours = tiny_llama(hidden=hidden)
    inject(ours, TiedLoRAConfig(rank=r, preset="vera", target_modules=targets))
    peft_A, peft_B = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    assert peft_A.shape[1] == hidden
    for kind in targets:
        f = ours.tiedlora[kind]
        for mine, theirs in ((f.A, peft_A), (f.B, peft_B)):
            fan_in = theirs.shape[1]
            assert mine.shape[1] == fan_in
            for t in (mine, theirs):  # the same law for both: U(+-sqrt(6 / fan_in))
                check_uniform(t, math.sqrt(6 / fan_in), f"{kind} {tuple(t.shape)}")
            assert float(mine.std()) == pytest.approx(float(theirs.std()), rel=0.06)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "vera_lambda_d")}
    for n, m in adapted_layers(ours):
        assert torch.equal(m.adapter_u, peft_layers[n].vera_lambda_d["default"].detach())
        assert torch.equal(m.adapter_v, peft_layers[n].vera_lambda_b["default"].detach())
