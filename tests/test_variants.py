"""The variants of the write-up "Parameter Efficient Fine Tuning Ideas" (docs/MATH.md): gamma,
partial tying, Tied-LoRA Extra, tensor embedding, DoRA, Simple DoRA.

Each variant is checked against an explicit formula or an equivalent known adapter; the generic
checks (identity at init, training, merge, save/load, counts) run over every preset elsewhere.
"""

import copy

import pytest
import torch

from helpers import randomize_adapters, rel_err, tiny_llama
from tiedlora_kernels import PRESETS, TiedLoRAConfig, adapted_layers, from_peft, inject

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "down_proj"]


def injected(preset, n_layer=3, **kw):
    torch.manual_seed(0)
    model = tiny_llama(n_layer=n_layer)
    return inject(model, TiedLoRAConfig(rank=4, preset=preset, target_modules=TARGETS, **kw))


def logits_and_loss(model):
    model.zero_grad()
    out = model(IDS, labels=IDS)
    out.loss.backward()
    return out.logits.detach()


@pytest.mark.parametrize("gamma", [4.0, 30.0])
def test_gamma_keeps_initial_function_and_scales_adam_step(gamma):
    plain, boosted = injected("tl6"), injected("tl6", gamma=gamma)
    with torch.no_grad():
        for m in (plain, boosted):  # the same non-zero B in both, so A gets a gradient
            for f in m.tiedlora.values():
                f.B.copy_(torch.randn(f.B.shape, generator=torch.Generator().manual_seed(9)) * 0.1)
    assert boosted.tiedlora.config.scaling == gamma * plain.tiedlora.config.scaling
    for kind in TARGETS:  # s * A is the same tensor, so the same function
        assert rel_err(boosted.tiedlora[kind].A * gamma, plain.tiedlora[kind].A) < 1e-6
    assert rel_err(logits_and_loss(boosted), logits_and_loss(plain)) < 1e-5
    steps = {}
    for name, m, s in (("plain", plain, 1.0), ("boosted", boosted, gamma)):
        a0 = m.tiedlora["q_proj"].A.detach().clone()
        logits_and_loss(m)
        opt = torch.optim.Adam([m.tiedlora["q_proj"].A], lr=1e-3)
        opt.step()
        steps[name] = ((m.tiedlora["q_proj"].A.detach() - a0) * s).norm()  # step of the effective factor s*A
    assert steps["boosted"] / steps["plain"] == pytest.approx(gamma, rel=1e-3)


def _copy_lora_into_partial(lora, partial, L):
    ll, lp = dict(adapted_layers(lora)), dict(adapted_layers(partial))
    with torch.no_grad():
        for kind in TARGETS:
            names = sorted(n for n in lp if n.endswith(kind))
            for i, n in enumerate(names):
                f = partial.tiedlora[kind]
                f.A[i].copy_(ll[n].factors.A)
                f.B[i].copy_(ll[n].factors.B)
                lp[n].adapter_wA.copy_(torch.eye(L)[i])
                lp[n].adapter_wB.copy_(torch.eye(L)[i])


def test_partial_tying_with_one_bank_equals_tied_lora():
    tl5, partial = injected("tl5"), injected("partial", banks=(1, 1))
    randomize_adapters(tl5)
    with torch.no_grad():
        for kind in TARGETS:
            partial.tiedlora[kind].A[0].copy_(tl5.tiedlora[kind].A)
            partial.tiedlora[kind].B[0].copy_(tl5.tiedlora[kind].B)
        for _, layer in adapted_layers(partial):
            layer.adapter_wA.fill_(1.0)
            layer.adapter_wB.fill_(1.0)
    assert rel_err(logits_and_loss(partial), logits_and_loss(tl5)) < 1e-6
    for kind in TARGETS:  # d LA[0] = sum_i wA_i dA_i = Tied-LoRA's dA when w = 1
        assert rel_err(partial.tiedlora[kind].A.grad[0], tl5.tiedlora[kind].A.grad) < 1e-5
        assert rel_err(partial.tiedlora[kind].B.grad[0], tl5.tiedlora[kind].B.grad) < 1e-5


def test_partial_tying_with_L_banks_is_as_expressive_as_lora():
    L = 3
    lora, partial = injected("lora", n_layer=L), injected("partial", n_layer=L, banks=(L, L))
    randomize_adapters(lora)
    _copy_lora_into_partial(lora, partial, L)
    assert rel_err(logits_and_loss(partial), logits_and_loss(lora)) < 1e-6


def test_tl_extra_with_diagonal_core_equals_tl6():
    tl6, extra = injected("tl6", init_v="absent", train_v=False), injected("tl_extra")
    randomize_adapters(tl6)
    with torch.no_grad():
        for kind in TARGETS:
            extra.tiedlora[kind].A.copy_(tl6.tiedlora[kind].A)
            extra.tiedlora[kind].B.copy_(tl6.tiedlora[kind].B)
        lt = dict(adapted_layers(tl6))
        for n, layer in adapted_layers(extra):
            layer.adapter_M.copy_(torch.diag(lt[n].adapter_u))
    assert rel_err(logits_and_loss(extra), logits_and_loss(tl6)) < 1e-6
    for n, layer in adapted_layers(extra):  # dM's diagonal is TL6's du
        assert rel_err(torch.diagonal(layer.adapter_M.grad), lt[n].adapter_u.grad) < 1e-5


def test_tensor_embedding_with_one_hot_weights_equals_tl_extra():
    L = 3
    extra, tensor = injected("tl_extra", n_layer=L), injected("tensor_embed", n_layer=L, core_bank=L)
    randomize_adapters(extra)
    le = dict(adapted_layers(extra))
    with torch.no_grad():
        for kind in TARGETS:
            tensor.tiedlora[kind].A.copy_(extra.tiedlora[kind].A)
            tensor.tiedlora[kind].B.copy_(extra.tiedlora[kind].B)
            for i, n in enumerate(sorted(n for n in le if n.endswith(kind))):
                tensor.tiedlora[kind].core_bank[i].copy_(le[n].adapter_M)
                dict(adapted_layers(tensor))[n].adapter_wM.copy_(torch.eye(L)[i])
    assert rel_err(logits_and_loss(tensor), logits_and_loss(extra)) < 1e-6


@pytest.mark.parametrize("preset,kw", [("partial", dict(banks=(2, 3))), ("tl_extra", {}),
                                       ("tensor_embed", dict(core_bank=2))], ids=["partial", "tl_extra", "tensor_embed"])
def test_mixed_and_core_variants_match_their_formula_and_every_gradient(preset, kw):
    """Partial tying with its own mixing weights for A and B (kA != kB), and Tied-LoRA Extra / tensor
    embedding with a random, non-symmetric r x r core, against the formula written out here in
    float64 (docs/MATH.md): A_i = sum_k wA_i[k] LA[k], B_i = sum_k wB_i[k] LB[k], M_i = adapter_M_i
    or sum_k wM_i[k] LM[k]; out_i = x W_i^T + b_i + s ((x A_i^T) M_i^T B_i^T), two tied layers of
    different shapes (leading slices). The tests above compare with wA = wB and a diagonal M only,
    where a swap of the weights or a transposed core cannot show."""
    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(12, 10), torch.nn.Linear(10, 7)

        def forward(self, x):
            return self.second(torch.tanh(self.first(x)))

    torch.manual_seed(0)
    model = TwoLayers().double()
    inject(model, TiedLoRAConfig(rank=3, preset=preset, kinds={"first|second": "lin"}, adapter_dtype="float64", **kw))
    randomize_adapters(model, std=0.3)
    x = torch.randn(5, 12, dtype=torch.float64)
    G = torch.randn(5, 7, dtype=torch.float64)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model(x).backward(G)

    leaf = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}

    def layer(name, h):
        N, K = leaf[f"{name}.weight"].shape
        LA, LB = leaf["tiedlora.lin.A"], leaf["tiedlora.lin.B"]
        if preset == "partial":
            A = sum(w * LA[k, :, :K] for k, w in enumerate(leaf[f"{name}.adapter_wA"]))
            B = sum(w * LB[k, :N, :] for k, w in enumerate(leaf[f"{name}.adapter_wB"]))
            M = torch.eye(3, dtype=torch.float64)
        else:
            A, B = LA[:, :K], LB[:N, :]
            M = (leaf[f"{name}.adapter_M"] if preset == "tl_extra" else
                 sum(w * leaf["tiedlora.lin.core_bank"][k] for k, w in enumerate(leaf[f"{name}.adapter_wM"])))
        s = dict(adapted_layers(model))[name].scaling
        return h @ leaf[f"{name}.weight"].t() + leaf[f"{name}.bias"] + s * (h @ A.t()) @ M.t() @ B.t()

    out = layer("second", torch.tanh(layer("first", x)))
    assert rel_err(model(x), out) < 1e-12
    if preset != "partial":  # the core is what this test is about: random, not symmetric
        M0 = model.first.adapter_M if preset == "tl_extra" else model.tiedlora["lin"].core_bank[0]
        assert rel_err(M0.t(), M0) > 0.1
    else:
        assert model.first.adapter_wA.shape != model.first.adapter_wB.shape
    grads = torch.autograd.grad(out, [leaf[n] for n in trained], G)
    for (n, p), g in zip(trained.items(), grads):
        assert rel_err(p.grad, g) < 1e-10, n


def test_simple_dora_matches_its_formula():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10)
    model = torch.nn.ModuleDict({"proj": lin})
    inject(model, TiedLoRAConfig(rank=3, preset="simple_dora", target_modules=["proj"]))
    randomize_adapters(model, std=0.3)
    layer, f = model["proj"], model.tiedlora["proj"]
    x = torch.randn(5, 12, dtype=torch.float64)
    W = layer.weight.double()
    W0 = W / W.norm(dim=1, keepdim=True)
    expected = (x @ W0.T + layer.scaling * (x @ f.A.double().T) @ f.B.double().T) * layer.adapter_m.double() \
        + layer.bias.double()
    assert rel_err(layer(x.float()), expected) < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_dora_matches_its_formula(tied):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.ModuleDict({"proj": torch.nn.Linear(12, 10)})})
    inject(model, TiedLoRAConfig(rank=3, preset="dora", target_modules=["proj"], tied=tied))
    randomize_adapters(model, std=0.3)
    layer = model["a"]["proj"]
    A, B = layer.factors.A.double(), layer.factors.B.double()
    W = layer.weight.double()
    Wp = W + layer.scaling * B @ A
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = (x @ Wp.T) * (layer.adapter_m.double() / Wp.norm(dim=1)) + layer.bias.double()
    assert rel_err(layer(x.float()), expected) < 1e-5


def test_dora_matches_peft_use_dora():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                   use_dora=True, lora_dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.zero_grad()
    out_p = pm(IDS, labels=IDS)
    out_p.loss.backward()
    grads_p = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    ours = from_peft(pm)
    assert ours.tiedlora.config.preset == "dora"
    out_o = ours(IDS, labels=IDS)
    assert rel_err(out_o.logits, out_p.logits) < 1e-5
    out_o.loss.backward()
    layers = dict(adapted_layers(ours))
    for n, g in grads_p.items():
        lname = n.removeprefix("base_model.model.").split(".lora_")[0]
        mine = (layers[lname].adapter_m if "magnitude" in n else
                getattr(layers[lname].factors, "A" if ".lora_A." in n else "B"))
        assert rel_err(mine.grad, g) < 1e-4, n


@pytest.mark.parametrize("magnitude", ["dora", "simple_dora"])
def test_magnitude_combines_with_tying(magnitude):
    """Tied TL6 with a magnitude: the model starts as the base model, and once trained (random
    adapters) each layer is its formula with the tied factors and its own u, v, m (docs/MATH.md):
    DoRA c = m / ||W + dW||_row; Simple DoRA m * (x (W / ||W||_row)^T + s x dW^T)."""
    torch.manual_seed(0)
    base = tiny_llama(n_layer=3)
    model = inject(copy.deepcopy(base), TiedLoRAConfig(rank=4, preset="tl6", target_modules=TARGETS,
                                                         magnitude=magnitude))
    assert model.tiedlora.config.resolved().tied
    assert torch.equal(model(IDS).logits, base(IDS).logits)
    randomize_adapters(model, std=0.3)
    name, layer = next(iter(adapted_layers(model)))
    d = lambda t: t.detach().double()  # noqa: E731
    W, A, B = d(layer.weight), d(layer.factors.A), d(layer.factors.B)
    dW = d(layer.adapter_v)[:, None] * (B * d(layer.adapter_u)) @ A
    x = torch.randn(5, W.shape[1], dtype=torch.float64)
    s, m = layer.scaling, d(layer.adapter_m)
    if magnitude == "dora":
        Wp = W + s * dW
        expected = (x @ Wp.T) * (m / Wp.norm(dim=1))
    else:
        expected = m * (x @ (W / W.norm(dim=1, keepdim=True)).T + s * x @ dW.T)
    expected = expected + (d(layer.bias) if layer.bias is not None else 0)
    assert rel_err(layer(x.float()), expected) < 1e-5, name


@pytest.mark.parametrize("kw,msg", [
    (dict(preset="partial", tied=False), "needs tied=True"),
    (dict(preset="tensor_embed", tied=False), "needs tied=True"),
    (dict(preset="tl_extra", init_u=1.0), "replaces u by a matrix"),
    (dict(preset="partial", banks=(0, 2)), "banks must be a pair"),
    (dict(core="cube"), "core must be one of"),
    (dict(magnitude="mora"), "magnitude must be one of"),
])
def test_invalid_variant_fields(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TiedLoRAConfig(**kw)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_on_the_kernels(monkeypatch, preset):
    """Each variant reduces to the fused op on effective tensors: an injected model gives the same
    logits and gradients on the Triton kernels (interpreter on CPU) as on the torch reference."""
    from tiedlora_kernels.ops import triton_interpreting

    if not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    model = injected(preset, n_layer=2)
    randomize_adapters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("TIEDLORA_BACKEND", backend)
        logits = logits_and_loss(model)
        results[backend] = (logits, [p.grad.clone() for p in params])
    assert rel_err(results["triton"][0], results["torch"][0]) < 1e-5
    for got, want in zip(results["triton"][1], results["torch"][1]):
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("preset", ["simple_dora", "dora"])
def test_magnitude_applied_in_the_kernel_epilogue(monkeypatch, preset):
    """On the kernels the magnitude is the op's row scale: in forward and backward, the only torch
    ops that produce an (M, N) tensor are the op's own base GEMM and its one b + y * c epilogue (no
    separate y * m, + b, or G * m pass), and dm still matches the torch path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tiedlora_kernels.ops import triton_interpreting

    if not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    M, K, N = 6, 12, 10
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(K, N)})
    inject(model, TiedLoRAConfig(rank=3, preset=preset, target_modules=["proj"]))
    randomize_adapters(model, std=0.3)
    layer = model["proj"]
    x = torch.randn(M, K)
    G = torch.randn(M, N)

    class FullSizeOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (list, tuple)) else [out]
            if any(isinstance(o, torch.Tensor) and o.shape == (M, N) for o in outs):
                self.seen.append(str(func))
            return out

    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("TIEDLORA_BACKEND", backend)
        layer.adapter_m.grad = None
        mode = FullSizeOps()
        with mode:
            layer(x).backward(G)
        grads[backend] = layer.adapter_m.grad.clone()
        if backend == "triton":
            # No data touched: views, allocations (and the interpreter's storage swaps, set_).
            free = ("aten.view.", "aten.detach.", "aten._unsafe_view.", "aten.reshape.", "aten.empty.",
                    "aten.empty_like.", "aten.set_.")
            # The op's own full-size torch work: the base GEMM with the adapter term as its C, and the
            # row scale's epilogue out = b + y * c; everything else runs in the Triton kernels.
            fused = ("aten.addmm_.", "aten.addcmul.out")
            outside = [f for f in mode.seen if not f.startswith(free + fused)]
            assert outside == [], f"(M, N) work outside the fused op: {outside}"
            assert sum(f.startswith("aten.addcmul") for f in mode.seen) == 1, mode.seen  # c applied once
        else:
            assert any("mul" in f for f in mode.seen)  # the check can see an unfused scale
    assert rel_err(grads["triton"], grads["torch"]) < 1e-5


def test_simple_dora_injected_on_meta_then_loaded_matches_direct(tmp_path):
    """Inject on the meta device, materialise, load the base weights and the adapter file: the same
    function as injecting into the loaded model (Simple DoRA's ||W||_row must come from the loaded
    weight, not from the meta or uninitialised one)."""
    from tiedlora_kernels import load_adapter, save_adapter

    def two_layers():
        return torch.nn.ModuleDict({f"l{i}": torch.nn.ModuleDict({"proj": torch.nn.Linear(12, 12)}) for i in (0, 1)})

    def forward(model, x):
        return model["l1"]["proj"](torch.tanh(model["l0"]["proj"](x)))

    config = TiedLoRAConfig(rank=3, preset="simple_dora", target_modules=["proj"])
    torch.manual_seed(0)
    direct = inject(two_layers(), config)
    randomize_adapters(direct, std=0.3)
    save_adapter(direct, tmp_path / "adapter.safetensors")
    base_state = {k: v for k, v in direct.state_dict().items() if "adapter_" not in k and "tiedlora" not in k}
    with torch.device("meta"):
        lazy = inject(two_layers(), config)
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(base_state, strict=False)
    load_adapter(lazy, tmp_path / "adapter.safetensors")
    x = torch.randn(5, 12)
    assert rel_err(forward(lazy, x), forward(direct, x)) < 1e-6


@pytest.mark.parametrize("preset", ["dora", "simple_dora", "partial", "tl_extra", "tensor_embed"])
def test_cached_adapters_computes_derived_tensors_once_inside_the_context_only(monkeypatch, preset):
    """Inside cached_adapters (no grad) the variants' derived tensors and DoRA's norm are computed
    once per layer and reused; outside it, and with grad inside it, every call recomputes, so writes
    the version counter cannot see (.data, fused optimizers) never leave a stale value."""
    from tiedlora_kernels import cached_adapters
    from tiedlora_kernels.modules import TiedLoRALinear

    model = injected(preset)
    randomize_adapters(model, std=0.3)
    computed = []
    derived = TiedLoRALinear._derived
    monkeypatch.setattr(TiedLoRALinear, "_derived", lambda self, slot, compute: derived(
        self, slot, lambda: computed.append(slot) or compute()))
    layers = [layer for _, layer in adapted_layers(model)]
    with torch.no_grad():
        plain = model(IDS).logits
        per_call = len(computed)
        assert per_call >= len(layers)
        with cached_adapters(model):
            computed.clear()
            first = model(IDS).logits
            assert len(computed) == per_call
            computed.clear()
            assert torch.equal(model(IDS).logits, first) and computed == []
        assert torch.equal(first, plain)
        assert all(layer._frozen_cache is None for layer in layers)
        for prm in layers[1].factors.parameters():
            prm.data.add_(0.05)  # a write the version counter does not see
        computed.clear()
        after = model(IDS).logits
        assert len(computed) == per_call
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(after, fresh(IDS).logits)
    assert not torch.equal(after, plain)
    with cached_adapters(model):  # grad enabled: recomputed every call
        computed.clear()
        model(IDS).logits.sum().backward()
        assert len(computed) == per_call


def test_simple_dora_trains_after_an_inference_mode_evaluation():
    """Lightning-style: validation under inference_mode, then a training step."""
    model = injected("simple_dora")
    with torch.inference_mode():
        model(IDS)
    logits_and_loss(model)
    assert all(layer.adapter_m.grad is not None for _, layer in adapted_layers(model))


@pytest.mark.parametrize("preset", ["dora", "simple_dora"])
def test_unmerge_inside_cached_adapters_recomputes_the_row_scale(preset):
    """unmerge derives DoRA's row scale from the merged weight on its way: inside cached_adapters that
    value must not outlive the unmerge."""
    from tiedlora_kernels import cached_adapters, merge, unmerge

    model = injected(preset)
    randomize_adapters(model)
    with torch.no_grad():
        want = model(IDS).logits
        merge(model)
        with cached_adapters(model):
            unmerge(model)
            got = model(IDS).logits
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("preset", ["dora", "simple_dora"])
def test_magnitude_over_a_zero_weight_row_starts_unchanged_and_trains_without_nan(preset):
    """A zero output row (pruned neuron, padding row) has norm 0: m / norm was 0/0 = NaN in every
    output of that row from the first call on."""
    torch.manual_seed(0)
    model = tiny_llama(n_layer=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3].zero_()
        want = model(IDS).logits
    inject(model, TiedLoRAConfig(rank=4, preset=preset, target_modules=TARGETS))
    got = logits_and_loss(model)
    assert rel_err(got, want) < 1e-6
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("preset", ["dora", "simple_dora"])
def test_unmerge_restores_rows_whose_row_scale_is_zero(preset):
    """A row with m = 0 merges to zero; W'/c cannot bring it back, so merge keeps those rows."""
    from tiedlora_kernels import merge, unmerge

    model = injected(preset)
    randomize_adapters(model)
    layer = next(adapted_layers(model))[1]
    with torch.no_grad():
        layer.adapter_m[[0, 5]] = 0.0
        before = layer.weight.clone()
        want = model(IDS).logits
        merge(model)
        assert rel_err(model(IDS).logits, want) < 1e-5
        unmerge(model)
        assert torch.isfinite(layer.weight).all()
        assert rel_err(layer.weight, before) < 1e-6
        assert rel_err(model(IDS).logits, want) < 1e-5


def test_simple_dora_merge_unmerge_keeps_a_pruned_row_pruned():
    """A zero (pruned) weight row under Simple DoRA: unmerge must give it back exactly zero. Rounding
    residue (~1e-8) left there made ||W||_row divide it up to a unit direction, and the row's output
    moved by m |x| after the round trip."""
    from tiedlora_kernels import merge, unmerge

    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        model = torch.nn.Module()
        model.proj = torch.nn.Linear(32, 32)
        with torch.no_grad():
            model.proj.weight[3].zero_()
        inject(model, TiedLoRAConfig(rank=4, preset="simple_dora", alpha=6, rslora=True, target_modules=["proj"]))
        randomize_adapters(model, std=0.2, seed=seed)
        x = torch.randn(3, 32)
        with torch.no_grad():
            before = model.proj(x)
            merge(model)
            unmerge(model)
            changed += rel_err(model.proj(x), before) > 1e-5
            assert torch.all(model.proj.weight[3] == 0)
    assert changed == 0


def test_simple_dora_over_a_zero_weight_row_keeps_its_adapter_term():
    """MATH.md: out = m (x W0^T + s x dW^T) + b, W0 = W / ||W||_row (0 on a zero row). v_i = v ||W||
    removed the adapter term from a zero row for good (its m and B rows got no gradient)."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(12, 6)
    with torch.no_grad():
        model.proj.weight[2].zero_()
    W, b = model.proj.weight.detach().clone(), model.proj.bias.detach().clone()
    inject(model, TiedLoRAConfig(rank=3, preset="simple_dora", target_modules=["proj"], alpha=6))
    randomize_adapters(model, std=0.3)
    layer = model.proj
    with torch.no_grad():
        layer.adapter_m[2] = 1.0
    A, B = (t.detach() for t in layer.factors.slices(12, 6))
    x = torch.randn(4, 12)
    norm = W.norm(dim=1)
    W0 = W / torch.where(norm == 0, torch.ones_like(norm), norm)[:, None]
    want = layer.adapter_m.detach() * (x @ W0.T + layer.scaling * (x @ A.T) @ B.T) + b
    out = layer(x)
    assert rel_err(out.detach(), want) < 1e-6
    out.sum().backward()
    assert layer.adapter_m.grad[2] != 0


@pytest.mark.parametrize("preset", ["partial", "tl_extra", "tensor_embed", "simple_dora", "dora"])
def test_bf16_adapters_derive_the_same_tensors_with_or_without_grad(preset):
    """What a layer derives from bf16 adapters (partial tying's mixtures, Extra's B M_i, Simple DoRA's
    v * ||W||, DoRA's row scale m / ||.||) is formed in fp32, in eval and generate too: without grad the
    raw bf16 factors were mixed in bf16, ~100x the error of the same forward with grad (4e-3 against
    3e-7); DoRA's c divided in bf16 was 3e-3 off with or without grad."""
    model = injected(preset, adapter_dtype="bfloat16").eval()
    randomize_adapters(model, std=0.3)
    exact = copy.deepcopy(model).double()(IDS).logits
    with torch.no_grad():
        no_grad = model(IDS).logits
    assert torch.equal(no_grad, model(IDS).logits.detach())
    assert rel_err(no_grad, exact) < 1e-5
