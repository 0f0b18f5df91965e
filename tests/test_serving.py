"""AdapterBank (``tiedlora_kernels/serving.py``): many adapters of one model in one batch.

The oracle for every row is the model with that row's adapter loaded the usual way
(``load_adapter`` into a copy of the base model, the single-adapter path, TIEDLORA_BACKEND=torch),
run on that row alone; rows with id -1 against the base model without adapters. The bank runs on
the torch route and on the Triton kernels (the interpreter without a GPU).
"""

import contextlib
import copy
import itertools

import pytest
import torch

from helpers import randomize_adapters, rel_err, tiny_gpt2, tiny_llama
from tiedlora_kernels import TiedLoRAConfig, adapted_layers, inject, load_adapter, merge, save_adapter
from tiedlora_kernels.ops import triton_interpreting
from tiedlora_kernels.serving import AdapterBank, LayerAdapter

TRITON = pytest.param("triton", marks=pytest.mark.interpreter) if not torch.cuda.is_available() else "triton"
BACKENDS = ["torch", TRITON]
TOL = 1e-5  # fp32 logits, relative to the single-adapter model's

#: name -> (config, randomization seed). vera_a / vera_b share their seeded frozen A and B (the
#: shared route); the others bring their own factors, ranks, alphas, targets and row scales.
ZOO = {
    "vera_a": (dict(preset="vera"), 1),
    "vera_b": (dict(preset="vera"), 2),
    "lora": (dict(preset="lora"), 3),
    "tl6_alpha": (dict(preset="tl6", alpha=8, alpha_pattern={"q_proj": 2.0}), 4),
    "tl3_r2_qv": (dict(preset="tl3", rank=2, target_modules=["q_proj", "v_proj"]), 5),
    "dora": (dict(preset="dora"), 6),
    "simple_dora": (dict(preset="simple_dora"), 7),
    "tl_extra": (dict(preset="tl_extra", init_u="absent"), 8),
    "partial": (dict(preset="partial"), 9),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(base model, {name: adapter directory}): every adapter of ZOO trained (randomized) on one base."""
    torch.manual_seed(0)
    base = tiny_llama()
    dirs, root = {}, tmp_path_factory.mktemp("zoo")
    for name, (cfg, seed) in ZOO.items():
        model = inject(copy.deepcopy(base), TiedLoRAConfig(**{"rank": 4, **cfg}))
        randomize_adapters(model, std=0.3, seed=seed)
        dirs[name] = root / name
        save_adapter(model, dirs[name])
    return base, dirs


def host_of(base, **cfg):
    """The served model: the base injected on every linear layer (its own adapter is never used)."""
    return inject(copy.deepcopy(base), TiedLoRAConfig(**{"rank": 4, "preset": "lora", **cfg}))


def alone(base, directory):
    """The single-adapter model of ``directory`` (None: the base model)."""
    model = copy.deepcopy(base)
    return load_adapter(model, directory) if directory is not None else model


def reference_logits(base, dirs, names, ids, monkeypatch):
    """Row i of ids through the model of adapter names[i] alone."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    rows = []
    with torch.no_grad():
        for i, n in enumerate(names):
            rows.append(alone(base, dirs[n] if n else None)(ids[i:i + 1]).logits)
    return torch.cat(rows)


def make_adapter(base, tmp_path, name, seed=1, **cfg):
    """A saved adapter of ``base`` (lora unless ``cfg`` says otherwise), randomized with ``seed``."""
    model = inject(copy.deepcopy(base), TiedLoRAConfig(**{"rank": 4, "preset": "lora", **cfg}))
    randomize_adapters(model, std=0.3, seed=seed)
    save_adapter(model, tmp_path / name)
    return tmp_path / name


def bank_of_two(base, tmp_path, **targets):
    """(bank over ``base``, {"a", "b": adapter directory}, {"a", "b": slot}): two lora adapters loaded."""
    dirs = {n: make_adapter(base, tmp_path, n, seed=seed, **targets) for n, seed in (("a", 1), ("b", 2))}
    bank = AdapterBank(host_of(base, **targets))
    return bank, dirs, {n: bank.add(d) for n, d in dirs.items()}


def snapshot(bank):
    return (bank.capacity, dict(bank.adapters), {
        ln: ({k: (t.clone() if t is not None else None) for k, t in s.tensors().items()}, list(s.present))
        for ln, s in bank._layers.items()})


def same_snapshot(a, b):
    if a[:2] != b[:2] or a[2].keys() != b[2].keys():
        return False
    for ln in a[2]:
        (ta, pa), (tb, pb) = a[2][ln], b[2][ln]
        if pa != pb:
            return False
        for k in ta:
            if (ta[k] is None) != (tb[k] is None) or (ta[k] is not None and not torch.equal(ta[k], tb[k])):
                return False
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_matches_each_adapter_alone(zoo, backend, monkeypatch):
    """Every preset in one bank, one forward: each row equals its adapter loaded normally."""
    base, dirs = zoo
    bank = AdapterBank(host_of(base), capacity=4)
    slots = {n: bank.add(d) for n, d in dirs.items()}
    names = ["vera_a", None, "lora", "tl6_alpha", "vera_b", "tl3_r2_qv", "dora", "vera_a", "simple_dora",
             "tl_extra", "partial"]
    ids = torch.randint(0, 97, (len(names), 7), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(base, dirs, names, ids, monkeypatch)
    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    adapter_ids = torch.tensor([slots[n] if n else -1 for n in names])
    with torch.no_grad(), bank.use(adapter_ids):
        out = bank.model(ids).logits
    for i, n in enumerate(names):
        assert rel_err(out[i], expected[i]) < TOL, f"row {i} ({n}): {rel_err(out[i], expected[i]):.2e}"
    # the rows differ from one another: the adapters matter
    assert rel_err(out[0], out[1]) > 1e-2 and rel_err(out[0], out[4]) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_each_prompt_with_its_adapter(zoo, backend, monkeypatch):
    """generate on a batch of prompts, each with its adapter, equals each prompt generated alone."""
    base, dirs = zoo
    names = ["lora", "vera_b", None, "tl6_alpha"]
    prompts = torch.randint(1, 97, (len(names), 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    expected = []
    with torch.no_grad():
        for i, n in enumerate(names):
            expected.append(alone(base, dirs[n] if n else None).generate(prompts[i:i + 1], **kw))
    expected = torch.cat(expected)
    bank = AdapterBank(host_of(base))
    slots = {n: bank.add(dirs[n]) for n in names if n}
    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    out = bank.generate(prompts, adapter_ids=[slots[n] if n else -1 for n in names], **kw)
    assert torch.equal(out, expected)
    assert len({tuple(r) for r in out[:, 5:].tolist()}) > 1  # the continuations differ


def test_generate_left_padded_prompts(zoo, monkeypatch):
    """Prompts of different lengths (left padding, attention mask): row i equals the same padded batch
    generated with adapter i loaded normally."""
    base, dirs = zoo
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    names = ["tl6_alpha", "vera_a", "lora"]
    ids = torch.randint(1, 97, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids = ids * mask
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    bank = AdapterBank(host_of(base))
    slots = [bank.add(dirs[n]) for n in names]
    out = bank.generate(ids, adapter_ids=torch.tensor(slots), **kw)
    with torch.no_grad():
        for i, n in enumerate(names):
            assert torch.equal(out[i], alone(base, dirs[n]).generate(ids, **kw)[i]), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_factors_take_the_shared_route(zoo, backend, monkeypatch):
    """Adapters with the same A and B (VeRA, one seed): one launch per layer, no segments; a lora
    added makes the layers segmented, removing it makes them shared again, and the VeRA rows are
    bitwise the same before and after (the others untouched)."""
    from tiedlora_kernels.ops import bank_segment_term, bank_term

    base, dirs = zoo
    bank = AdapterBank(host_of(base), capacity=2)
    a, b = bank.add(dirs["vera_a"]), bank.add(dirs["vera_b"])
    assert set(bank.routes().values()) == {"shared"}
    calls = []
    for mod, fn in ((bank_term, "bank_term"), (bank_segment_term, "bank_segment_term")):
        original = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *x, _f=original, _n=fn, **k: calls.append(_n) or _f(*x, **k))
    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(4))

    def run():
        with torch.no_grad(), bank.use([b, -1, a]):
            return bank.model(ids).logits

    before = run()
    n_layers = len(bank.routes())
    assert calls == (["bank_term"] * n_layers if backend == "triton" else [])
    lora = bank.add(dirs["lora"])
    assert set(bank.routes().values()) == {"segmented"} and bank.capacity == 4
    calls.clear()
    with torch.no_grad(), bank.use([b, lora, a]):
        mixed = bank.model(ids).logits
    assert calls == (["bank_segment_term"] * n_layers if backend == "triton" else [])
    assert rel_err(mixed[0], before[0]) < TOL and rel_err(mixed[2], before[2]) < TOL
    bank.remove(lora)
    assert set(bank.routes().values()) == {"shared"}
    assert torch.equal(run(), before)


def test_routes_follow_adds_and_removes(zoo, monkeypatch):
    """Each layer's route after any order of adds and removes: shared exactly when the loaded adapters'
    factors agree (a VeRA added after a LoRA made the layers per slot still counts as agreeing), and
    the outputs stay those of each adapter alone."""
    base, dirs = zoo
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    bank = AdapterBank(host_of(base), capacity=2)
    routes = lambda: set(bank.routes().values())  # noqa: E731
    va = bank.add(dirs["vera_a"])
    lora = bank.add(dirs["lora"])
    vb = bank.add(dirs["vera_b"])
    assert routes() == {"segmented"}
    factors = bank._layers["model.layers.0.self_attn.q_proj"]
    assert factors.fid["A"][va] == factors.fid["A"][vb] == 0 != factors.fid["A"][lora]
    bank.remove(lora)
    assert routes() == {"shared"}
    lora2 = bank.add(dirs["tl6_alpha"])
    bank.remove(va)
    bank.remove(vb)
    assert routes() == {"shared"}  # one adapter left: its factors are the shared ones
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), bank.use([lora2, -1]):
        out = bank.model(ids).logits
    expected = reference_logits(base, dirs, ["tl6_alpha", None], ids, monkeypatch)
    assert rel_err(out, expected) < TOL
    bank.remove(lora2)
    assert routes() == {"base"} and len(bank) == 0
    with torch.no_grad(), bank.use([-1, -1]):
        assert rel_err(bank.model(ids).logits, reference_logits(base, dirs, [None, None], ids, monkeypatch)) < TOL
    with pytest.raises(ValueError, match="empty slot"):
        with bank.use([lora2, -1]):
            pass


def test_a_compiled_model_is_refused_clearly(zoo):
    """A torch.compile wrapper prefixes every layer name (_orig_mod.): refused, naming the fix, not
    left to fail at the first add with a layer table that fits no file."""
    base, _ = zoo
    with pytest.raises(ValueError, match="the model is wrapped .OptimizedModule.; pass the plain model"):
        AdapterBank(torch.compile(host_of(base)))


@pytest.mark.parametrize("order", list(itertools.permutations(["lora", "vera_a", "vera_b"])), ids="-".join)
def test_route_depends_on_the_loaded_adapters_not_their_order(zoo, order, monkeypatch):
    """Whatever order a LoRA and two VeRA adapters of one seed came in, removing the LoRA leaves the
    bank a bank of the two VeRAs alone: every layer shared, the same bytes, each row its adapter's
    (equal factors that came after the LoRA are found equal on the remove)."""
    base, dirs = zoo
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    only_vera = AdapterBank(host_of(base), capacity=4)
    only_vera.add(dirs["vera_a"])
    only_vera.add(dirs["vera_b"])
    bank = AdapterBank(host_of(base), capacity=4)
    slot = {n: bank.add(dirs[n]) for n in order}
    bank.remove("lora")
    assert set(bank.routes().values()) == {"shared"} and bank.nbytes() == only_vera.nbytes()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), bank.use([slot["vera_b"], slot["vera_a"]]):
        out = bank.model(ids).logits
    assert rel_err(out, reference_logits(base, dirs, ["vera_b", "vera_a"], ids, monkeypatch)) < TOL


def test_equal_factors_are_shared_once_the_differing_ones_are_removed(zoo, monkeypatch):
    """Two factors besides the reference: with a LoRA and a TL6 loaded before the second VeRA, the
    layers stay per slot while the TL6 is left, and are shared once only the VeRAs are."""
    base, dirs = zoo
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    bank = AdapterBank(host_of(base), capacity=4)
    for name in ("lora", "vera_a", "tl6_alpha", "vera_b"):
        bank.add(dirs[name])
    bank.remove("lora")
    assert set(bank.routes().values()) == {"segmented"}  # the VeRAs' factors and TL6's differ
    bank.remove("tl6_alpha")
    assert set(bank.routes().values()) == {"shared"}
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(13))
    with torch.no_grad(), bank.use([bank.slot("vera_a"), bank.slot("vera_b")]):
        out = bank.model(ids).logits
    assert rel_err(out, reference_logits(base, dirs, ["vera_a", "vera_b"], ids, monkeypatch)) < TOL


def test_slots_are_stable_reused_and_grown(zoo, monkeypatch):
    """Removing one adapter leaves every other slot's id and output as they were; a freed slot is
    reused; a full bank doubles; reserve grows without an add."""
    base, dirs = zoo
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    bank = AdapterBank(host_of(base), capacity=1)
    slots = [bank.add(dirs[n]) for n in ("lora", "tl6_alpha", "vera_a")]
    assert slots == [0, 1, 2] and bank.capacity == 4 and len(bank) == 3
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), bank.use([0, 1, 2]):
        before = bank.model(ids).logits
    bank.remove("tl6_alpha")
    assert bank.adapters == {0: "lora", 2: "vera_a"} and "tl6_alpha" not in bank
    with torch.no_grad(), bank.use([0, -1, 2]):
        after = bank.model(ids).logits
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    # the freed slot is reused by an adapter of fewer layers: nothing of the removed one may remain
    assert bank.add(dirs["tl3_r2_qv"], name="qv") == 1 and bank.slot("qv") == 1
    bank.reserve(16)
    assert bank.capacity == 16 and bank.adapters == {0: "lora", 1: "qv", 2: "vera_a"}
    with torch.no_grad(), bank.use([0, 1, 2]):
        out = bank.model(ids).logits
    assert torch.equal(out[0], after[0]) and torch.equal(out[2], after[2])
    assert rel_err(out[1], reference_logits(base, dirs, ["tl3_r2_qv"], ids[1:2], monkeypatch)[0]) < TOL


def test_default_names_never_repeat_a_loaded_name(zoo):
    """An unnamed adapter is called adapter<slot>, made unique when an explicitly named one has that name."""
    base, dirs = zoo
    bank = AdapterBank(host_of(base))
    assert bank.add(dirs["lora"], name="adapter1") == 0
    assert bank.add(alone(base, dirs["vera_a"])) == 1  # a live model: no directory name
    assert bank.adapters == {0: "adapter1", 1: "adapter1_1"} and bank.slot("adapter1_1") == 1
    bank.remove("adapter1")
    assert bank.adapters == {1: "adapter1_1"}


def test_reused_slot_keeps_nothing_of_the_removed_adapter(zoo, monkeypatch):
    """A freed slot on shared layers, reused by an adapter of fewer layers (q and v only): the layers
    it leaves out must add nothing for its rows, not the removed adapter's u and v."""
    base, dirs = zoo
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    bank = AdapterBank(host_of(base))
    bank.add(dirs["vera_a"])
    bank.remove(bank.add(dirs["vera_b"]))
    slot = bank.add(dirs["tl3_r2_qv"])
    assert slot == 1 and bank.routes()["model.layers.0.self_attn.k_proj"] == "shared"
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(10))
    with torch.no_grad(), bank.use([slot]):
        out = bank.model(ids).logits
    assert rel_err(out, reference_logits(base, dirs, ["tl3_r2_qv"], ids, monkeypatch)) < TOL


def test_live_model_and_mapping_sources(zoo, monkeypatch):
    """An injected model (read live) and a {layer: LayerAdapter} mapping give what its file gives."""
    base, dirs = zoo
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    bank = AdapterBank(host_of(base))
    from_file = bank.add(dirs["tl6_alpha"])
    trained = alone(base, dirs["tl6_alpha"])
    live = bank.add(trained, name="live")
    mapping = {n: LayerAdapter(*layer.op_tensors(), layer.scaling) for n, layer in adapted_layers(trained)}
    by_hand = bank.add(mapping, name="mapping")
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(6)).repeat(3, 1)
    with torch.no_grad(), bank.use([from_file, live, by_hand]):
        out = bank.model(ids).logits
    # same adapter, same tokens: equal up to where a row sits in the batched matmul
    assert rel_err(out[1], out[0]) < 1e-6 and rel_err(out[2], out[0]) < 1e-6
    with torch.no_grad():  # and that adapter's, as the trained model alone computes it
        assert rel_err(out[0], trained(ids[:1]).logits[0]) < 1e-5
    assert set(bank.routes().values()) == {"shared"}  # identical factors stay shared


def test_dora_rows_follow_base_weights_changed_after_the_add(tmp_path, monkeypatch):
    """DoRA's row scale m / ||W + s B A|| and Simple DoRA's v ||W|| and m / ||W|| depend on the base
    weight W: the bank kept them as computed at the add, so a model built from its config, adapters
    added, then the base checkpoint loaded served DoRA rows 7e-2 off their adapter alone (LoRA rows
    followed). They are derived when use() starts, also after a write through ``.data``, which moves no
    tensor version a check could read."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    skeleton = tiny_llama()  # the model as built from its config
    checkpoint = tiny_llama()  # the base weights the adapters were trained on
    names = ["dora", "simple_dora", "lora", None]
    dirs = {n: make_adapter(checkpoint, tmp_path, n, seed=i, preset=n) for i, n in enumerate(names) if n}
    bank = AdapterBank(host_of(skeleton))
    adapter_ids = [bank.add(dirs[n]) if n else -1 for n in names]
    ids = torch.randint(0, 97, (len(names), 6), generator=torch.Generator().manual_seed(17))
    bank.model.load_state_dict(checkpoint.state_dict(), strict=False)
    with torch.no_grad(), bank.use(adapter_ids):
        out = bank.model(ids).logits
    expected = reference_logits(checkpoint, dirs, names, ids, monkeypatch)
    for i, n in enumerate(names):
        assert rel_err(out[i], expected[i]) < TOL, f"row {i} ({n}): {rel_err(out[i], expected[i]):.2e}"
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        # a new direction, not only new row norms (Simple DoRA's rows do not depend on W's row norms)
        shape = checkpoint.get_submodule(layer).weight.shape
        change = 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(18))
        for model in (bank.model, checkpoint):
            model.get_submodule(layer).weight.data.add_(change)
    with torch.no_grad(), bank.use(adapter_ids):
        out = bank.model(ids).logits
    expected = reference_logits(checkpoint, dirs, names, ids, monkeypatch)
    for i, n in enumerate(names):
        assert rel_err(out[i], expected[i]) < TOL, f"after .data: row {i} ({n}): {rel_err(out[i], expected[i]):.2e}"


def test_gpt2_conv1d_layers_and_kinds(monkeypatch, tmp_path):
    """GPT-2 (Conv1D layers; attn.c_proj and mlp.c_proj are different kinds): files load into the
    bank with the same kinds as into the model."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    base = tiny_gpt2()
    dirs = {}
    for name, cfg in (("tl6", dict(preset="tl6")), ("lora_cproj", dict(preset="lora", target_modules=["c_proj"]))):
        model = inject(copy.deepcopy(base), TiedLoRAConfig(rank=4, **cfg))
        randomize_adapters(model, std=0.3)
        dirs[name] = tmp_path / name
        save_adapter(model, dirs[name])
    bank = AdapterBank(inject(copy.deepcopy(base), TiedLoRAConfig(rank=4, preset="tl6")))
    slots = [bank.add(dirs["tl6"]), bank.add(dirs["lora_cproj"])]
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), bank.use([slots[1], slots[0], -1]):
        out = bank.model(ids).logits
        for row, d in ((0, dirs["lora_cproj"]), (1, dirs["tl6"]), (2, None)):
            assert rel_err(out[row], alone(base, d)(ids[row:row + 1]).logits[0]) < TOL


def test_kinds_of_a_partly_adapted_model(monkeypatch, tmp_path):
    """A file's layer kinds depend on every linear layer of the model, adapted or not (GPT-2's
    attn.c_proj is "attn.c_proj" only because mlp.c_proj exists): a bank over a model adapting
    fewer layers still reads it."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    base = tiny_gpt2()
    model = inject(copy.deepcopy(base), TiedLoRAConfig(rank=4, preset="tl6", target_modules=["attn.c_proj"]))
    randomize_adapters(model, std=0.3)
    save_adapter(model, tmp_path / "a")
    bank = AdapterBank(inject(copy.deepcopy(base), TiedLoRAConfig(rank=4, preset="lora",
                                                                   target_modules=["c_attn", "attn.c_proj"])))
    slot = bank.add(tmp_path / "a")
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), bank.use([slot]):
        assert rel_err(bank.model(ids).logits, model(ids).logits) < TOL


def test_opt_flattened_tokens(tmp_path, monkeypatch):
    """OPT runs fc1 / fc2 on (batch * seq, H) activations: each per-sequence id covers its sequence's
    seq consecutive rows, in a forward and in generate's decode steps."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    base = _tiny_opt()
    bank, dirs, slots = bank_of_two(base, tmp_path, target_modules=["q_proj", "v_proj", "fc1", "fc2"])
    names = ["a", None, "b"]
    ids = torch.randint(2, 97, (3, 5), generator=torch.Generator().manual_seed(11))
    adapter_ids = [slots[n] if n else -1 for n in names]
    with torch.no_grad(), bank.use(adapter_ids):
        out = bank.model(ids).logits
    assert rel_err(out, reference_logits(base, dirs, names, ids, monkeypatch)) < TOL
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None)
    tokens = bank.generate(ids, adapter_ids=adapter_ids, **kw)
    with torch.no_grad():
        for i, n in enumerate(names):
            assert torch.equal(tokens[i], alone(base, dirs[n] if n else None).generate(ids[i:i + 1], **kw)[0]), n


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    pad_token_id=1, bos_token_id=0, eos_token_id=0, dropout=0.0)).eval()


def test_generate_repeats_each_prompts_id_as_generate_expands_the_batch(tmp_path, monkeypatch):
    """generate makes max(num_beams, num_return_sequences) copies of each prompt (the product was
    used: OPT's flattened rows were refused), with the settings read as generate reads them (a passed
    GenerationConfig's unset num_beams is the model's)."""
    from transformers import GenerationConfig

    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    base = _tiny_opt()
    bank, dirs, slots = bank_of_two(base, tmp_path, target_modules=["q_proj", "fc1", "fc2"])
    src = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(num_beams=2, num_return_sequences=2, max_new_tokens=3, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = torch.cat([alone(base, dirs[n]).generate(src[i:i + 1], **kw) for i, n in enumerate("ab")])
    assert torch.equal(bank.generate(src, adapter_ids=[slots["a"], slots["b"]], **kw), expected)
    bank.model.generation_config.num_beams = 2
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None)
    kw.pop("num_beams")
    kw.pop("num_return_sequences")
    with torch.no_grad():
        expected = torch.cat([alone(base, dirs[n]).generate(src[i:i + 1], num_beams=2, **kw)
                              for i, n in enumerate("ab")])
    got = bank.generate(src, adapter_ids=[slots["a"], slots["b"]], generation_config=config)
    assert torch.equal(got, expected)


def test_a_model_called_inside_the_root_gets_its_own_frame(tmp_path, monkeypatch):
    """The frame (batch, seq) that OPT's flattened rows are matched with came from the root's call only:
    a root that calls its transformers model inside (a VLM's language model) got none, and was refused."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")

    class Wrapper(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, *, features):  # a call whose shape the root's arguments do not give
            return self.lm(inputs_embeds=features).logits

    base = Wrapper(_tiny_opt())
    bank, dirs, slots = bank_of_two(base, tmp_path, target_modules=["fc1", "fc2"])
    slots = list(slots.values())
    embeds = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), bank.use(slots):
        got = bank.model(features=embeds)
    with torch.no_grad():
        want = torch.cat([alone(base, d)(features=embeds[i:i + 1]) for i, d in enumerate(dirs.values())])
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("block", ["vision_tower", "multi_modal_projector", "audio_tower"])
def test_image_and_audio_layers_refused(block):
    """An image or audio encoder's (or projector's) rows are images' patches or clips' frames, any
    number per prompt: a prompt with two images had its second one run with the next prompt's adapter."""
    class Multimodal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module(block, torch.nn.Sequential(torch.nn.Linear(8, 8)))
            self.lm = torch.nn.Linear(8, 8)

    with pytest.raises(ValueError, match=rf"layer '{block}.0' sits inside an image or audio encoder or projector "
                                         rf"\('{block}'\).*exclude_modules=\['{block}'\]"):
        AdapterBank(inject(Multimodal(), TiedLoRAConfig(rank=2, preset="lora")))
    AdapterBank(inject(Multimodal(), TiedLoRAConfig(rank=2, preset="lora", exclude_modules=[block])))


def test_encoder_decoder_beams(tmp_path, monkeypatch):
    """T5 with num_beams (and num_return_sequences) 2: the encoder sees the batch, the decoder each
    prompt's beams consecutively. bank.generate repeats one id per prompt for the copies; under use(),
    ids repeated by the caller serve the decoder and, every 2nd, the encoder; each prompt's sequences
    are its adapter's alone. Ids that do not fit the expanded batch (per prompt, or repeated 4 times:
    num_beams times num_return_sequences, where generate makes the larger of the two) are refused, not
    guessed, and so are repeated ids on a forward of the whole model, whose encoder sees the batch."""
    from transformers import T5Config, T5ForConditionalGeneration

    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_decoder_layers=1, num_heads=4, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1, dropout_rate=0.0)).eval()
    bank, dirs, slots = bank_of_two(base, tmp_path, target_modules=["q", "v", "wi", "wo"])
    names = ["b", None, "a"]
    src = torch.randint(2, 50, (3, 5), generator=torch.Generator().manual_seed(12))
    kw = dict(num_beams=2, num_return_sequences=2, max_new_tokens=4, do_sample=False, eos_token_id=None)
    out = bank.generate(src, adapter_ids=[slots[n] if n else -1 for n in names], **kw)
    with torch.no_grad():
        expected = torch.cat([alone(base, dirs[n] if n else None).generate(src[i:i + 1], **kw)
                              for i, n in enumerate(names)])
    assert torch.equal(out, expected)
    per_prompt = torch.tensor([slots[n] if n else -1 for n in names])
    with torch.no_grad(), bank.use(per_prompt.repeat_interleave(2)):
        assert torch.equal(bank.model.generate(src, **kw), expected)
    for wrong in (per_prompt, per_prompt.repeat_interleave(4)):
        with torch.no_grad(), bank.use(wrong), pytest.raises(ValueError, match=r"repeat_interleave the ids"):
            bank.model.generate(src, **kw)
    # a forward of the whole model runs its encoder inside the call, on the batch the ids are for
    with torch.no_grad(), bank.use(per_prompt.repeat_interleave(2)), \
            pytest.raises(ValueError, match=r"layer 'encoder\..*adapter_ids has 6 entries .*\(first dim 3\)"):
        bank.model(input_ids=src, decoder_input_ids=src[:, :2])


def test_ids_short_of_the_batch_are_refused_not_broadcast(tmp_path, monkeypatch):
    """Two ids for four prompts used to be read as each id covering two prompts: prompt 1 silently got
    adapter a. One id for four prompts, or per-token ids one token short, all equal, are refused too
    (equal ids cover any rows only where they are the call's), blaming the ids, not the layer."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    bank, _, slots = bank_of_two(tiny_llama(), tmp_path)
    a, b = slots["a"], slots["b"]
    ids = torch.randint(2, 97, (4, 5), generator=torch.Generator().manual_seed(3))
    for short, message in (([a, b], r"give one id per sequence"), ([a], r"give one id per sequence"),
                           (torch.full((4, 4), a), r"adapter_ids has shape \(4, 4\) \(one slot per token\) but "
                                                   r"the activations have leading shape \(4, 5\)")):
        with torch.no_grad(), bank.use(short), pytest.raises(ValueError, match=message) as refused:
            bank.model(ids)
        assert "rows are not the batch's sequences" not in str(refused.value)


def test_ids_repeated_beyond_the_batch_are_refused_on_a_decoder_only_model(tmp_path, monkeypatch):
    """Ids a whole multiple of the batch, each repeated (4 ids [a, a, b, b] for 2 prompts, 2 for 1 prompt,
    4 for generate's 2 prompts without beams), ran with every other id: the rule that an encoder run
    before generate expands the batch takes every e-th id applied to every model call."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    bank, _, slots = bank_of_two(tiny_llama(), tmp_path)
    a, b = slots["a"], slots["b"]
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(19))
    for adapter_ids, prompts in (([a, a, b, b], ids), ([b, b], ids[:1])):
        n, batch = len(adapter_ids), len(prompts)
        with torch.no_grad(), bank.use(adapter_ids), \
                pytest.raises(ValueError, match=rf"adapter_ids has {n} entries .*\(first dim {batch}\)"):
            bank.model(prompts)
    with pytest.raises(ValueError, match=r"adapter_ids has 4 entries .*\(first dim 2\)"):
        bank.generate(ids, adapter_ids=[a] * 4, attention_mask=torch.ones_like(ids), max_new_tokens=2)


def test_per_token_ids_on_a_pooled_layer(tmp_path, monkeypatch):
    """BERT's pooler reads each sequence's first token: (batch, H) activations under (batch, seq) ids
    were refused even when every token of a sequence had one adapter. Such a layer takes one id per
    sequence; a sequence whose tokens name several adapters is refused there, naming the layer."""
    from transformers import BertConfig, BertForSequenceClassification

    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=40)).eval()
    directory = make_adapter(base, tmp_path, "bert")
    bank = AdapterBank(host_of(base))
    slot = bank.add(directory)
    assert "bert.pooler.dense" in bank.routes()
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(20))
    per_token = torch.tensor([[slot] * 5, [-1] * 5])
    with torch.no_grad(), bank.use(per_token):
        out = bank.model(ids).logits
    with torch.no_grad():
        expected = torch.cat([alone(base, directory)(ids[:1]).logits, base(ids[1:]).logits])
    assert rel_err(out, expected) < TOL
    per_token[1, 3] = slot
    with torch.no_grad(), bank.use(per_token), \
            pytest.raises(ValueError, match=r"layer 'bert.pooler.dense': adapter_ids has shape \(2, 5\) \(one slot "
                                            r"per token\) .*one row per sequence \(a pooled layer.*sequence 1 has "
                                            rf"tokens of several \(\[-1, {slot}\]\)"):
        bank.model(ids)


def test_mixture_of_experts_layers_refused(tmp_path):
    """An expert's rows are the tokens routed to it, from every sequence: adapted expert layers are
    refused when the bank is made, naming the layer; the attention layers of the same model are served."""
    from transformers import SwitchTransformersConfig, SwitchTransformersEncoderModel

    base = SwitchTransformersEncoderModel(SwitchTransformersConfig(
        vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, num_experts=2, expert_capacity=64,
        encoder_sparse_step=1, dropout_rate=0.0, router_jitter_noise=0.0)).eval()
    with pytest.raises(ValueError, match=r"layer 'encoder.block.0.layer.1.mlp.experts.expert_0.wi' sits inside a "
                                         "mixture-of-experts block"):
        AdapterBank(host_of(base, target_modules=["q", "wi", "wo"]))
    bank = AdapterBank(host_of(base, target_modules=["q", "v"]))
    assert bank.add(make_adapter(base, tmp_path, "attention", target_modules=["q", "v"])) == 0


def test_quantized_layers(tmp_path):
    """A quantized layer the model does not adapt still names kinds (GPT-2's attn.c_proj is
    "attn.c_proj" because an mlp.c_proj exists, quantized or not), so files load; a model whose
    adapted layers are quantized is refused, naming the layer."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = tiny_gpt2()
    quantized = copy.deepcopy(base)
    for block in quantized.transformer.h:
        K, N = block.mlp.c_proj.weight.shape  # Conv1D: (in, out)
        block.mlp.c_proj = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False)
    config = TiedLoRAConfig(rank=4, preset="lora", target_modules=["attn.c_proj"])
    trained = inject(copy.deepcopy(base), config)
    randomize_adapters(trained)
    save_adapter(trained, tmp_path / "attn_out")
    bank = AdapterBank(inject(copy.deepcopy(quantized), config))
    assert bank.add(tmp_path / "attn_out") == 0 and set(bank.routes().values()) == {"shared"}
    with pytest.raises(ValueError, match=r"layer 'transformer.h.0.mlp.c_proj' has a quantized base"):
        AdapterBank(inject(quantized, TiedLoRAConfig(rank=4, preset="lora", target_modules=["c_proj"])))


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_adapter_ids_name_the_argument(zoo):
    base, dirs = zoo
    bank = AdapterBank(host_of(base), capacity=4)
    bank.add(dirs["lora"])
    bank.add(dirs["vera_a"])
    bank.remove(0)
    ids = torch.randint(0, 97, (2, 5))
    cases = [(torch.tensor([1.0, 1.0]), TypeError, "adapter_ids must be an integer tensor"),
             (torch.tensor([1, 4]), ValueError, r"adapter_ids\[1\] = 4 is out of range.*capacity is 4"),
             (torch.tensor([1, 0]), ValueError, r"adapter_ids\[1\] = 0 names an empty slot.*\{1: 'vera_a'\}"),
             (torch.tensor([1, 1], device="meta"), ValueError, "adapter_ids is on meta but the model runs on cpu"),
             ("1", TypeError, "adapter_ids must be an integer tensor")]
    for adapter_ids, err, msg in cases:
        with pytest.raises(err, match=msg):
            with bank.use(adapter_ids):
                pass
    with pytest.raises(ValueError, match=r"adapter_ids has 3 entries.*\(first dim 2\); give one id per sequence"):
        with torch.no_grad(), bank.use([1, -1, 1]):
            bank.model(ids)
    assert all(layer.bank_route is None for _, layer in adapted_layers(bank.model))  # reset after the error


def test_to_a_device_the_model_is_not_on_is_refused(zoo, monkeypatch):
    """bank.to(device) follows the model: a device its adapted layers are not on (meta, while the model
    is on cpu) is refused before anything moves, and the bank keeps its adapters and keeps serving."""
    base, dirs = zoo
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    bank = AdapterBank(host_of(base), capacity=2)
    slot = bank.add(dirs["lora"])
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(15))
    with torch.no_grad(), bank.use([slot]):
        expected = bank.model(ids).logits
    before = snapshot(bank)
    with pytest.raises(ValueError, match=r"AdapterBank.to: device must be the device the model's adapted layers are "
                                         r"on now \(cpu\), got meta; move the model first"):
        bank.to("meta")
    assert bank.device == torch.device("cpu") and same_snapshot(snapshot(bank), before)
    with torch.no_grad(), bank.use([slot]):
        assert torch.equal(bank.model(ids).logits, expected)


def test_to_a_dtype_is_refused_clearly(zoo):
    """bank.to(torch.bfloat16) failed inside torch.empty ("argument 'device' must be torch.device, not
    torch.dtype"): the bank moves between devices only, its factor_dtype fixed when it is made."""
    base, dirs = zoo
    bank = AdapterBank(host_of(base))
    bank.add(dirs["lora"])
    before = snapshot(bank)
    with pytest.raises(TypeError, match=r"AdapterBank.to: device must be a device, got the dtype torch.bfloat16; the "
                                        r"bank moves between devices only: its factor_dtype \(torch.float32\) is fixed"):
        bank.to(torch.bfloat16)
    assert same_snapshot(snapshot(bank), before)


def _q_proj_adapter(bank, **fields):
    """(layer name, a {layer: LayerAdapter} mapping for the bank's first q_proj with ``fields`` replaced)."""
    name = "model.layers.0.self_attn.q_proj"
    layer = bank.model.get_submodule(name)
    K, N = layer.in_features, layer.out_features
    gen = torch.Generator().manual_seed(16)
    adapter = LayerAdapter(torch.randn(4, K, generator=gen), torch.randn(N, 4, generator=gen),
                           torch.randn(4, generator=gen), torch.randn(N, generator=gen), None, 0.5)
    return name, {name: adapter._replace(**fields)}


@pytest.mark.parametrize("field, bad, err, msg", [
    ("A", lambda a: a.to(torch.complex64), TypeError, r"A must be a floating tensor \(fp16/bf16/fp32/fp64\)"),
    ("B", lambda b: b.to(torch.int64), TypeError, r"B must be a floating tensor"),
    ("u", lambda u: u > 0, TypeError, r"u must be a floating tensor"),
    ("A", lambda a: a.to("meta"), ValueError, r"A must hold values, got a tensor on the meta device"),
    ("A", lambda a: None, ValueError, r"A must be a 2-D tensor \(r, K=32\), got NoneType"),
    ("scaling", lambda s: True, ValueError, r"scaling must be a finite real number .*got True"),
    ("scaling", lambda s: torch.tensor(s), ValueError, r"scaling must be a finite real number"),
    ("magnitude", lambda m: "lora", ValueError, r"magnitude must be one of none, dora, simple_dora, got 'lora'"),
    ("m", lambda m: torch.ones(32), ValueError, r"m is given but magnitude is 'none'"),
], ids=["complex-A", "int-B", "bool-u", "meta-A", "no-A", "bool-scaling", "tensor-scaling", "unknown-magnitude",
        "m-without-magnitude"])
def test_mapping_source_takes_the_ops_tensor_and_scalar_checks(zoo, field, bad, err, msg):
    """A {layer: LayerAdapter} mapping is checked field by field as tied_lora_linear checks its
    arguments (not cast: a complex A would lose its imaginary part, scaling=True would read as 1), the
    error naming the layer and the field, and a refused add leaves the bank unchanged."""
    base, dirs = zoo
    bank = AdapterBank(host_of(base), capacity=1)
    bank.add(dirs["lora"])
    name, good = _q_proj_adapter(bank)
    _, mapping = _q_proj_adapter(bank, **{field: bad(getattr(good[name], field))})
    before = snapshot(bank)
    with pytest.raises(err, match=rf"AdapterBank.add: layer '{name}': {msg}"):
        bank.add(mapping)
    assert same_snapshot(snapshot(bank), before)


def test_mapping_source_takes_a_numpy_scaling(zoo):
    """A numpy float scaling (as tied_lora_linear takes it) is the number it holds."""
    import numpy as np

    base, _ = zoo
    bank = AdapterBank(host_of(base))
    name, given = _q_proj_adapter(bank, scaling=np.float32(0.5))
    slot = bank.add(given)
    assert torch.equal(bank._layers[name].U[slot], 0.5 * given[name].u)


def test_reserve_refuses_a_capacity_that_is_not_an_int(zoo):
    base, _ = zoo
    bank = AdapterBank(host_of(base), capacity=2)
    for bad in (10.5, "16", True, 0):
        with pytest.raises(ValueError, match=rf"AdapterBank.reserve: capacity must be an int >= 1, got {bad!r}"):
            bank.reserve(bad)
    assert bank.capacity == 2


@pytest.mark.parametrize("factor_dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, "float16"], ids=str)
def test_factor_dtype_outside_the_kernels_dtypes_is_refused(zoo, factor_dtype):
    """float8 factors (or a non-dtype) are refused when the bank is made, naming the dtypes it takes,
    not by an add's checks or a forward later."""
    base, _ = zoo
    with pytest.raises(ValueError, match=r"factor_dtype must be one of torch.float16, torch.bfloat16, "
                                         r"torch.float32, torch.float64, got"):
        AdapterBank(host_of(base), factor_dtype=factor_dtype)


def test_remove_takes_any_integer_id(zoo):
    """An adapter id as the integer tensor or numpy integer it came in (a row of a request's ids) removes
    that adapter; a bool or a float is refused as not an id, not reported as an empty slot."""
    import numpy as np

    base, dirs = zoo
    bank = AdapterBank(host_of(base))
    ids = torch.tensor([bank.add(dirs["lora"]), bank.add(dirs["vera_a"]), bank.add(dirs["tl6_alpha"])])
    bank.remove(ids[0])
    bank.remove(np.int64(ids[1]))
    assert bank.adapters == {2: "tl6_alpha"}
    for bad in (True, torch.tensor(True), 2.0, torch.tensor(2.0), ids[1:]):
        with pytest.raises(TypeError, match="adapter must be an adapter id \\(an integer\\) or a name"):
            bank.remove(bad)
    with pytest.raises(KeyError, match="no adapter in slot 1"):
        bank.remove(torch.tensor(1))
    assert bank.adapters == {2: "tl6_alpha"}


def test_failure_while_staging_leaves_the_bank_unchanged(zoo, monkeypatch):
    """An allocation failing half-way through an add (out of memory, simulated on the 5th layer):
    nothing is installed, so the bank is as it was and keeps working."""
    from tiedlora_kernels import serving

    base, dirs = zoo
    bank = AdapterBank(host_of(base), capacity=2)
    bank.add(dirs["vera_a"])
    bank.add(dirs["vera_b"])  # full: the next add grows it and makes the layers per slot
    before = snapshot(bank)
    original, calls = serving._Slots.stage, []

    def failing(self, *args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("simulated")
        return original(self, *args, **kw)

    monkeypatch.setattr(serving._Slots, "stage", failing)
    with pytest.raises(torch.OutOfMemoryError):
        bank.add(dirs["lora"])
    assert same_snapshot(snapshot(bank), before)
    assert all(s.fid == {"A": [0, 0], "B": [0, 0]} for s in bank._layers.values())
    monkeypatch.setattr(serving._Slots, "stage", original)
    assert bank.add(dirs["lora"]) == 2 and set(bank.routes().values()) == {"segmented"}


def test_failed_load_leaves_the_bank_unchanged(zoo, tmp_path):
    base, dirs = zoo
    bank = AdapterBank(host_of(base), capacity=2)
    bank.add(dirs["vera_a"])
    bank.add(dirs["lora"])  # full: a successful add would grow it
    other_model = make_adapter(tiny_llama(hidden=48), tmp_path, "wider")
    rank8 = make_adapter(base, tmp_path, "rank8", rank=8)
    head = make_adapter(base, tmp_path, "head", target_modules=["q_proj", "lm_head"], exclude_modules=[])
    corrupt = make_adapter(base, tmp_path, "corrupt")
    f = corrupt / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    lora = alone(base, dirs["lora"])
    nan = {n: LayerAdapter(*layer.op_tensors(), layer.scaling) for n, layer in adapted_layers(lora)}
    name = next(iter(nan))
    nan[name] = nan[name]._replace(u=torch.full((4,), float("nan")))
    wrong_shape = dict(nan)
    wrong_shape[name] = wrong_shape[name]._replace(u=None, B=torch.zeros(5, 4))
    before = snapshot(bank)
    flags = [p.requires_grad for p in bank.model.parameters()]
    cases = [(other_model, ValueError, "does not fit the bank's model"),
             (rank8, ValueError, "has rank 8, above the bank's rank 4"),
             (head, ValueError, "adapts layers the bank's model does not adapt: \\['lm_head'\\]"),
             (corrupt, ValueError, "corrupted"),
             (tmp_path / "missing", FileNotFoundError, "no adapter_model.safetensors"),
             (nan, ValueError, "u holds inf or NaN"),
             (wrong_shape, ValueError, r"B must have shape \(\d+, 4\)"),
             (42, TypeError, "source must be")]
    for source, err, msg in cases:
        with pytest.raises(err, match=msg):
            bank.add(source)
        assert same_snapshot(snapshot(bank), before), f"bank changed by a failed add ({msg})"
    with pytest.raises(ValueError, match="already loaded"):
        bank.add(dirs["tl6_alpha"], name="lora")
    assert same_snapshot(snapshot(bank), before)
    assert [p.requires_grad for p in bank.model.parameters()] == flags  # the shell's inject froze nothing of it


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_matches_each_adapter_alone_under_autocast(zoo, backend, monkeypatch):
    """A mixed batch under torch.autocast (fp32 model, bf16): each row equals its adapter's model
    alone under the same autocast and backend (x and the base layer in bf16, the adapter term in
    fp32; the backends round differently, each by its own scheme)."""
    base, dirs = zoo
    names = ["lora", None, "vera_a", "dora", "simple_dora", "tl6_alpha"]
    ids = torch.randint(0, 97, (len(names), 6), generator=torch.Generator().manual_seed(13))
    monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    bank = AdapterBank(host_of(base))
    slots = {n: bank.add(dirs[n]) for n in names if n}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.cat([alone(base, dirs[n] if n else None)(ids[i:i + 1]).logits for i, n in enumerate(names)])
        with bank.use([slots[n] if n else -1 for n in names]):
            out = bank.model(ids).logits
    assert out.dtype == expected.dtype == torch.bfloat16
    for i, n in enumerate(names):
        assert rel_err(out[i], expected[i]) < 5e-3, f"row {i} ({n}): {rel_err(out[i], expected[i]):.2e}"
    assert rel_err(out[0], out[1]) > 0.1  # the adapters matter more than bf16's rounding


@pytest.mark.parametrize("made_in_inference_mode", [True, False], ids=["made-in-inference-mode", "made-outside"])
def test_changes_in_and_out_of_inference_mode(zoo, made_in_inference_mode, monkeypatch):
    """A model and bank made and filled under torch.inference_mode, then changed outside it, or the
    reverse (a request handler loading an adapter on demand): every add and remove completes (the
    bank's tensors are never inference tensors, which refuse in-place writes outside that mode,
    half-way through the layers) and the rows are each adapter's alone."""
    base, dirs = zoo
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    inside, outside = torch.inference_mode, contextlib.nullcontext
    first, then = (inside, outside) if made_in_inference_mode else (outside, inside)
    with first():
        bank = AdapterBank(host_of(base), capacity=1)
        lora = bank.add(dirs["lora"])
    with then():
        tl6 = bank.add(dirs["tl6_alpha"])  # grows the bank, makes every layer's factors per slot
        bank.remove(lora)
    with first():
        vera = bank.add(dirs["vera_a"])  # into the slot freed, tensors made in the other mode
    tensors = [t for s in bank._layers.values() for t in (*s.tensors().values(), *s.ref.values()) if t is not None]
    assert not any(t.is_inference() for t in tensors)
    assert bank.adapters == {0: "vera_a", 1: "tl6_alpha"}
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(14))
    with torch.inference_mode(), bank.use([tl6, vera, -1]):
        out = bank.model(ids).logits
    assert rel_err(out, reference_logits(base, dirs, ["tl6_alpha", "vera_a", None], ids, monkeypatch)) < TOL


def test_inference_only(zoo):
    base, dirs = zoo
    bank = AdapterBank(host_of(base))
    bank.add(dirs["lora"])
    emb = bank.model.get_input_embeddings()(torch.randint(0, 97, (1, 4))).detach().requires_grad_()
    with pytest.raises(RuntimeError, match="inference only"):
        with bank.use([0]):
            bank.model(inputs_embeds=emb)
    with torch.no_grad(), bank.use([0]):
        bank.model(inputs_embeds=emb)


def test_bank_refuses_changes_in_use_nesting_and_merged_models(zoo):
    base, dirs = zoo
    bank = AdapterBank(host_of(base))
    bank.add(dirs["lora"])
    with bank.use([0]):
        with pytest.raises(RuntimeError, match="already in use"):
            with bank.use([0]):
                pass
        # a second bank on the same model: its exit would switch this context's routes off
        other = AdapterBank(bank.model)
        with pytest.raises(RuntimeError, match="already routed by another bank's use"):
            with other.use([-1]):
                pass
        assert all(layer.bank_route is not None for layer in bank._modules.values())
        for fn in (lambda: bank.add(dirs["vera_a"]), lambda: bank.remove(0), lambda: bank.reserve(32)):
            with pytest.raises(RuntimeError, match="in use"):
                fn()
    with pytest.raises(KeyError, match="no adapter in slot 3"):
        bank.remove(3)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        bank.remove("nope")
    # names are strings: None names no adapter (it would find a free slot)
    assert None not in bank and "lora" in bank
    with pytest.raises(TypeError, match="name must be a string, got NoneType"):
        bank.slot(None)
    # a device named without its index is the one the model's tensors report with it ("cuda" is cuda:0)
    assert bank.to("cpu:0").device == torch.device("cpu")
    with torch.no_grad(), bank.use([0]):
        bank.model(torch.randint(0, 97, (1, 4)))
    moved = AdapterBank(host_of(base))
    moved.model.to("meta")  # the model moved elsewhere after the bank was made
    with pytest.raises(RuntimeError, match=r"now on meta but the bank is on cpu; call bank.to\(device\)"):
        with moved.use([-1]):
            pass
    merged = merge(host_of(base))
    with pytest.raises(ValueError, match="is merged; unmerge"):
        AdapterBank(merged)
    with pytest.raises(ValueError, match="has no tiedlora adapters"):
        AdapterBank(copy.deepcopy(base))
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        AdapterBank(host_of(base), capacity=0)


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=pytest.mark.interpreter)],
                         ids=["default-backend", "kernels"])
def test_serve_command_tiny(kernels, tmp_path, capsys):
    """``python -m tiedlora_kernels serve --tiny``: trains small adapters on its tasks, answers one mixed
    batch, and every row matches its adapter alone (exit status 0)."""
    from tiedlora_kernels.__main__ import main

    if kernels and not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    argv = ["serve", "--tiny", "--no-progress", "--out", str(tmp_path)] + (["--kernels"] if kernels else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "every row matches its adapter run alone" in out
    assert "routes ['segmented']" in out and "routes ['shared']" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opposite", "plural", "pronoun", "sum"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "sum,nope"], r"unknown tasks \['nope'\]"),
    (["--tasks", "sum,plural,sum"], r"--tasks names \['sum'\] more than once"),
    (["--rows", "0"], "--rows must be >= 1, got 0"),
    (["--rows", "-2"], "--rows must be >= 1, got -2"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
], ids=["unknown-task", "repeated-task", "no-rows", "negative-rows", "no-new-tokens"])
def test_serve_command_refuses_bad_arguments_before_training(argv, message, tmp_path, monkeypatch):
    """A usage error, before the base model is trained (training would take the run's minutes)."""
    from tiedlora_kernels.__main__ import main
    from tiedlora_kernels.demo import train

    monkeypatch.setattr(train, "pretrain", lambda *a, **k: pytest.fail("trained before refusing the arguments"))
    with pytest.raises(SystemExit, match=message):
        main(["serve", "--tiny", "--no-progress", "--out", str(tmp_path), *argv])


def test_serve_command_reports_a_mismatch(tmp_path, monkeypatch, capsys):
    """The command's check has teeth: a bank that drops every adapter term is reported, exit status 1."""
    from tiedlora_kernels import serving
    from tiedlora_kernels.__main__ import main

    real = serving.bank_linear_unchecked
    monkeypatch.setattr(serving, "bank_linear_unchecked",
                        lambda x, w, b, rows, A, B, U, *rest: real(x, w, b, rows, A, B, U * 0, *rest))
    assert main(["serve", "--tiny", "--no-progress", "--out", str(tmp_path)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU path")
def test_bench_serving_smoke(tmp_path, monkeypatch, capsys):
    """``python -m bench.serving`` on a CPU: the harness runs, checks the bank against the loop, writes
    a labelled JSON without speed claims."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from bench.serving import main as bench_main

    assert bench_main(["--out", str(tmp_path), "--phases", "decode"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["meta"]
    assert meta["mode"] == "smoke-cpu" and meta["speed_claims"] is False and not data["targets"]
    assert {"device", "torch", "triton", "transformers", "command", "commit"} <= set(meta)
    assert meta["routes"] == {"shared": ["shared"], "full": ["segmented"]}
    assert data["checks"] and all(c["ok"] for c in data["checks"])
    configs = {(r["config"], r.get("kind"), r.get("distinct")) for r in data["records"] if "median_ms" in r}
    assert {("base", None, None), ("one", "shared", None), ("bank", "full", 4), ("loop", "shared", 2)} <= configs
    assert data["ratios"]["decode"]["full"]["4"]["loop / bank"] > 0
    # more adapters than the phase's sequences: as many sequences, and base / one timed on that shape
    eight = [r for r in data["records"] if r.get("distinct") == 8 and r["config"] == "bank"]
    assert eight and all(r["sequences"] == 8 and r["in_batch"] == 8 for r in eight)
    assert any(r["config"] == "one" and r["sequences"] == 8 for r in data["records"])
    # fewest distinct first: the bank is filled as far as each count needs
    assert data["records"].index(eight[0]) > max(i for i, r in enumerate(data["records"])
                                                 if r.get("distinct") == 1 and r.get("kind") == eight[0]["kind"])
    assert "No speed claims" in capsys.readouterr().out


@pytest.mark.cuda
def test_gpu_mixed_batch_bf16(zoo, monkeypatch):
    """On CUDA in bf16: the Triton route against the torch route on the same bank."""
    base, dirs = zoo
    bank = AdapterBank(host_of(base).to("cuda", torch.bfloat16), factor_dtype=torch.bfloat16)
    slots = [bank.add(d) for d in dirs.values()]
    ids = torch.randint(0, 97, (len(slots) + 1, 33), device="cuda")
    adapter_ids = torch.tensor(slots + [-1], device="cuda")
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("TIEDLORA_BACKEND", backend)
        with torch.no_grad(), bank.use(adapter_ids):
            out[backend] = bank.model(ids).logits.float()
    assert rel_err(out["triton"], out["torch"]) < 2e-2


def test_a_bf16_simple_dora_adapter_serves_its_rows_as_the_adapter_alone(tmp_path, monkeypatch):
    """Simple DoRA's v_i = v ||W|| is formed in fp32 by the layer; the bank formed it in the file's bf16
    (||W|| rounded to bf16, the product rounded again): rows ~1e-3 off the adapter alone."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    base = tiny_llama()
    names = ["simple_dora", None]
    dirs = {"simple_dora": make_adapter(base, tmp_path, "simple_dora", preset="simple_dora",
                                        adapter_dtype="bfloat16")}
    bank = AdapterBank(host_of(base))
    adapter_ids = [bank.add(dirs["simple_dora"]), -1]
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(17))
    with torch.no_grad(), bank.use(adapter_ids):
        out = bank.model(ids).logits
    expected = reference_logits(base, dirs, names, ids, monkeypatch)
    assert rel_err(expected[0], expected[1]) > 1e-2  # the adapter changes the row
    for i, n in enumerate(names):
        assert rel_err(out[i], expected[i]) < TOL, f"row {i} ({n}): {rel_err(out[i], expected[i]):.2e}"


def _tiny_transformers(config_cls, model_cls, **kw):
    import transformers
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()


_ENC_DEC = dict(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, pad_token_id=1,
                decoder_start_token_id=2)
_BROS_HEADS = ["bbox_projection", "initial_token_classifier.1", "initial_token_classifier.3",
               "subsequent_token_classifier.query", "subsequent_token_classifier.key"]
#: name -> (base model, inject config fields beyond rank 4 lora, the batch's extra inputs given its
#: ids, the outputs compared). Each has layers that see the batch on another axis than the first.
TIME_FIRST_MODELS = {
    "longformer": (lambda: _tiny_transformers(
        "LongformerConfig", "LongformerForMaskedLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, vocab_size=64, attention_window=4, max_position_embeddings=64, pad_token_id=1),
        {}, lambda ids, g: {}, lambda out: [out.logits]),
    "led": (lambda: _tiny_transformers("LEDConfig", "LEDForConditionalGeneration", attention_window=4,
                                       max_encoder_position_embeddings=64, max_decoder_position_embeddings=64,
                                       **_ENC_DEC),
            {}, lambda ids, g: {"decoder_input_ids": torch.randint(3, 60, (len(ids), 3), generator=g)},
            lambda out: [out.logits]),
    "fsmt": (lambda: _tiny_transformers("FSMTConfig", "FSMTForConditionalGeneration", langs=["en", "de"],
                                        src_vocab_size=64, tgt_vocab_size=64, max_position_embeddings=64,
                                        **{k: v for k, v in _ENC_DEC.items() if k != "vocab_size"}),
             {}, lambda ids, g: {"decoder_input_ids": torch.randint(3, 60, (len(ids), 3), generator=g)},
             lambda out: [out.logits]),
    "xlnet": (lambda: _tiny_transformers("XLNetConfig", "XLNetLMHeadModel", vocab_size=64, d_model=32, n_layer=1,
                                         n_head=4, d_inner=48),
              {}, lambda ids, g: {}, lambda out: [out.logits]),
    "dab_detr": (lambda: _tiny_transformers(
        "DabDetrConfig", "DabDetrForObjectDetection", hidden_size=32, num_queries=4, encoder_layers=1,
        decoder_layers=4, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, use_timm_backbone=False, use_pretrained_backbone=False, num_labels=3,
        backbone_config={"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 16, 32],
                         "depths": [1, 1, 1, 1], "out_features": ["stage1", "stage2", "stage3", "stage4"]}),
        {"rank": 2}, lambda ids, g: {"pixel_values": torch.rand(len(ids), 3, 32, 32, generator=g)},
        lambda out: [out.logits, out.pred_boxes]),
    "bros": (lambda: _tiny_transformers("BrosConfig", "BrosSpadeEEForTokenClassification", hidden_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                                        vocab_size=64, num_labels=6, classifier_dropout=0.0),
             {"target_modules": _BROS_HEADS}, lambda ids, g: {"bbox": torch.rand(*ids.shape, 8, generator=g),
                                          "attention_mask": torch.ones_like(ids)},
             lambda out: [out.initial_token_logits,  # (its masked entries, the dtype's min, left out)
                          out.subsequent_token_logits.masked_fill(out.subsequent_token_logits < -1e30, 0)]),
}


@pytest.mark.parametrize("arch", list(TIME_FIRST_MODELS))
def test_time_first_layers_serve_each_sequence_its_adapter(arch, tmp_path, monkeypatch):
    """Layers that see the batch on another axis: Longformer's and LED's self-attention, FSMT's layers and
    XLNet's feed-forward (seq, batch, H), DAB-DETR's box head (layers, batch, queries, H), BROS's heads
    (the root's Sequential too) and bbox projection (seq, seq, batch, H). Taken as batch-first, with seq = batch every row silently got other
    sequences' adapters (Longformer's logits ~1e-1 off), otherwise the ids were refused. They are
    served with the batch's axis moved first; FSMT's encoder, named by both the model and its inner
    model, under generate's beams too."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    make, cfg, extra, outputs = TIME_FIRST_MODELS[arch]
    base = make()
    dirs = {n: make_adapter(base, tmp_path, n, seed=seed, **cfg) for n, seed in (("a", 1), ("b", 2))}
    bank = AdapterBank(host_of(base, **cfg))
    slots = {n: bank.add(d) for n, d in dirs.items()}
    names = ["a", "b", None, "a"]
    ids = torch.randint(3, 60, (4, 4), generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, **extra(ids, torch.Generator().manual_seed(6))}
    if "pixel_values" in inputs:  # (4 images; the decoder's 4 layers stacked are what equals the batch)
        del inputs["input_ids"]
    with torch.no_grad(), bank.use([slots[n] if n else -1 for n in names]):
        got = outputs(bank.model(**inputs))
    alone = {n: load_adapter(copy.deepcopy(base), d) for n, d in dirs.items()}
    alone[None] = base
    for i, n in enumerate(names):
        with torch.no_grad():
            expected = outputs(alone[n](**{k: v[i:i + 1] for k, v in inputs.items()}))
            plain = outputs(base(**{k: v[i:i + 1] for k, v in inputs.items()}))
        for out, want, without in zip(got, expected, plain):
            assert n is None or rel_err(want, without) > 1e-5  # the adapter changes the row: the check can fail
            assert rel_err(out[i:i + 1], want) < TOL, f"row {i} ({n}): {rel_err(out[i:i + 1], want):.2e}"
    if arch == "fsmt":
        with torch.no_grad():
            got = bank.generate(ids[:2], [slots["a"], slots["b"]], num_beams=2, max_new_tokens=3, do_sample=False)
            for i, n in enumerate(["a", "b"]):
                assert torch.equal(got[i], alone[n].generate(ids[i:i + 1], num_beams=2, max_new_tokens=3,
                                                             do_sample=False)[0])


def test_a_layer_whose_rows_are_not_the_sequences_serves_batches_of_one_adapter(tmp_path, monkeypatch):
    """DeBERTa-v2 projects its relative position embeddings, (1, 2 * span, H) for the whole batch, through
    the adapted query_proj / key_proj: every batch of more than one sequence was refused, blaming the ids.
    A batch whose sequences all use one adapter is served; a mixed one is refused saying why; ids short
    of the batch are still refused, never broadcast."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    base = _tiny_transformers("DebertaV2Config", "DebertaV2ForMaskedLM", hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=48, vocab_size=64, relative_attention=True,
                              pos_att_type=["p2c", "c2p"], max_relative_positions=16, position_buckets=8)
    dirs = {n: make_adapter(base, tmp_path, n, seed=seed) for n, seed in (("a", 1), ("b", 2))}
    bank = AdapterBank(host_of(base))
    slots = {n: bank.add(d) for n, d in dirs.items()}
    ids = torch.randint(3, 60, (3, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), bank.use([slots["b"]] * 3):
        out = bank.model(input_ids=ids).logits
    with torch.no_grad():
        expected = load_adapter(copy.deepcopy(base), dirs["b"])(input_ids=ids).logits
        assert rel_err(expected, base(input_ids=ids).logits) > 1e-3
    assert rel_err(out, expected) < TOL
    for adapter_ids, message in (([slots["a"], slots["b"], slots["a"]], r"this layer's rows are not the batch's "
                                  r"sequences \(position embeddings shared by the batch"),
                                 ([slots["b"]], r"adapter_ids has 1 entries .*\(first dim 3\); give one id per sequence of the "
                                  r"batch \(with num_beams [^;]*$")):
        with torch.no_grad(), bank.use(adapter_ids), pytest.raises(ValueError, match=message):
            bank.model(input_ids=ids)


def _swin_classifier():
    return _tiny_transformers("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=4, embed_dim=16,
                              depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=3)


def test_images_of_one_adapter_are_served_by_window_layers(tmp_path, monkeypatch):
    """Swin's attention sees windows, several per image, (batch * windows, tokens, H): a batch of
    images was refused even with one adapter for all of them (a call of images gave no batch to check
    the ids against). Images that all use one adapter are served as that adapter alone; a mixed batch
    is refused, saying the layer's rows are not the images; ids short of the batch are still refused."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    base = _swin_classifier()
    bank, dirs, slots = bank_of_two(base, tmp_path)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), bank.use([slots["b"]] * 3):
        out = bank.model(pixel_values=pixels).logits
    with torch.no_grad():
        expected = alone(base, dirs["b"])(pixel_values=pixels).logits
        assert rel_err(expected, base(pixel_values=pixels).logits) > 1e-3
    assert rel_err(out, expected) < TOL
    for adapter_ids, message in (([slots["a"], slots["b"], -1], r"rows are not the batch's sequences .*windows"),
                                 ([slots["b"]] * 2, r"adapter_ids has 2 entries .*\(first dim 12\)")):
        with torch.no_grad(), bank.use(adapter_ids), pytest.raises(ValueError, match=message):
            bank.model(pixel_values=pixels)


@pytest.mark.parametrize("encoder", ["vit", "swin"])
def test_an_image_encoder_with_a_text_decoder_generates_each_image_with_its_adapter(encoder, tmp_path, monkeypatch):
    """A vision encoder-decoder (TrOCR's, Donut's shape) under bank.generate(None, ids, pixel_values=...):
    with beams, the ids were not repeated for the copies (the prompts' count was read from token ids
    or audio only) and every call was refused. Each image is answered as by its adapter alone: a ViT
    encoder with mixed ids, a Swin one (windows) with one adapter for all images, beams or not."""
    import transformers
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    enc = (transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=48) if encoder == "vit" else
           transformers.DonutSwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                        window_size=4))
    dec = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, add_cross_attention=True,
                                  is_decoder=True, bos_token_id=1, eos_token_id=2)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    base = transformers.VisionEncoderDecoderModel(config).eval()
    base.generation_config.decoder_start_token_id, base.generation_config.pad_token_id = 1, 0
    bank, dirs, slots = bank_of_two(base, tmp_path)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    names = ["a", "b"] if encoder == "vit" else ["b", "b"]
    single = {n: alone(base, dirs[n]) for n in set(names)}
    for beams in (1, 2):
        settings = dict(num_beams=beams, max_new_tokens=4, do_sample=False)
        got = bank.generate(None, [slots[n] for n in names], pixel_values=pixels, **settings)
        for i, n in enumerate(names):
            with torch.no_grad():
                expected = single[n].generate(pixel_values=pixels[i:i + 1], **settings)[0]
            assert torch.equal(got[i], expected), f"image {i} ({n}), beams {beams}"
    with torch.no_grad():  # the adapters change the answers: the check can fail
        assert not torch.equal(single["b"].generate(pixel_values=pixels, max_new_tokens=4, do_sample=False),
                               base.generate(pixel_values=pixels, max_new_tokens=4, do_sample=False))


def test_a_call_frame_is_the_token_ids_when_a_call_has_both():
    """A multimodal call gives token ids (positional or keyword) and images: the ids decide its batch
    (the images' count is not the prompts'); images or audio alone give their own batch."""
    from tiedlora_kernels.serving import _call_frame

    ids, pixels, audio = torch.zeros(2, 10, dtype=torch.long), torch.rand(1, 3, 8, 8), torch.rand(3, 80)
    assert _call_frame((ids,), {"pixel_values": pixels}) == (2, 10, False)
    assert _call_frame((), {"input_ids": ids, "pixel_values": pixels}) == (2, 10, False)
    assert _call_frame((), {"pixel_values": pixels}) == (1, None, False)
    assert _call_frame((pixels,), {}) == (1, None, False)
    assert _call_frame((), {"input_values": audio}) == (3, None, False)
