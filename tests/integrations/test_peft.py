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


def _peft_model(family, method, **kw):
    """(PEFT model with random non-zero adapter output, state of its base weights, a fresh-base builder)."""
    torch.manual_seed(0)
    base = tiny_llama() if family == "llama" else tiny_gpt2()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    if method == "vera":
        pcfg = peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj"], vera_dropout=0.0, **kw)
    else:
        targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "c_proj", "c_fc"]
        pcfg = peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=family == "gpt2", **kw)
    pm = peft.get_peft_model(base, pcfg)
    _randomize(pm, ["vera_lambda_b"] if method == "vera" else ["lora_B"])

    def fresh():
        model = tiny_llama() if family == "llama" else tiny_gpt2()
        model.load_state_dict(base_state)
        return model

    return pm, fresh


#: PEFT adapters whose scaling is not the paper's s = 1, and the variants from_peft converts.
ROUND_TRIPS = {
    "lora-alpha-ne-r": ("llama", "lora", dict(lora_alpha=8)),
    "lora-alpha-pattern-kind": ("llama", "lora", dict(lora_alpha=8, alpha_pattern={"q_proj": 16})),
    "lora-alpha-pattern-layer": ("llama", "lora", dict(lora_alpha=8, alpha_pattern={
        r"model\.layers\.1\.mlp\.down_proj": 2, "v_proj": 12})),
    "lora-rslora": ("llama", "lora", dict(lora_alpha=6, use_rslora=True)),
    "lora-rslora-alpha-pattern": ("llama", "lora", dict(lora_alpha=6, use_rslora=True, alpha_pattern={"q_proj": 3})),
    "dora-alpha-pattern": ("llama", "dora", dict(lora_alpha=8, use_dora=True, alpha_pattern={"v_proj": 2})),
    "vera": ("llama", "vera", {}),
    "gpt2-lora-alpha-pattern": ("gpt2", "lora", dict(lora_alpha=8, alpha_pattern={"attn.c_proj": 24})),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_from_peft_then_save_and_load_into_a_fresh_base_computes_peft_function(tmp_path, case):
    """from_peft -> save_adapter -> load_adapter into a fresh base model: PEFT's logits, every layer's
    scaling as PEFT has it (issue 18: alpha_pattern was lost in the config, silently)."""
    from tiedlora_kernels import load_adapter, save_adapter

    family, method, kw = ROUND_TRIPS[case]
    pm, fresh = _peft_model(family, method, **kw)
    logits_p = pm(IDS).logits.detach()
    peft_scaling = {n.removeprefix("base_model.model."): float(m.scaling["default"])
                    for n, m in pm.named_modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)}
    ours = from_peft(pm)
    assert rel_err(ours(IDS).logits, logits_p) < 1e-6
    save_adapter(ours, tmp_path)
    reloaded = load_adapter(fresh(), tmp_path)
    for n, layer in adapted_layers(reloaded):
        if method != "vera":
            assert layer.scaling == peft_scaling[n], n
    assert torch.equal(reloaded(IDS).logits, ours(IDS).logits)
    assert rel_err(reloaded(IDS).logits, logits_p) < 1e-6


def test_a_peft_scale_changed_after_creation_is_carried_exactly(tmp_path):
    """PEFT's ``scale_layer`` / ``set_scale`` move a layer's scaling away from its config: the
    conversion records each such layer as its own alpha_pattern entry, so the reload matches PEFT."""
    from tiedlora_kernels import load_adapter, save_adapter
    from tiedlora_kernels.integrations import adapter_config

    pm, fresh = _peft_model("llama", "lora", lora_alpha=8, alpha_pattern={"q_proj": 16})
    pm.base_model.model.model.layers[1].mlp.down_proj.scale_layer(0.75)
    pm.base_model.model.model.layers[0].self_attn.q_proj.set_scale("default", 0.5)
    logits_p = pm(IDS).logits.detach()
    ours = from_peft(pm)
    assert adapter_config(ours).alpha_pattern == {r"^model\.layers\.0\.self_attn\.q_proj": 8.0,
                                                  r"^model\.layers\.1\.mlp\.down_proj": 6.0, "q_proj": 16.0}
    save_adapter(ours, tmp_path)
    reloaded = load_adapter(fresh(), tmp_path)
    assert {n: m.scaling for n, m in adapted_layers(reloaded)}["model.layers.0.self_attn.q_proj"] == 2.0
    assert rel_err(reloaded(IDS).logits, logits_p) < 1e-6


@pytest.mark.parametrize("kw,msg", [
    (dict(lora_bias=True), r"lora_B \(LoraConfig\.lora_bias=True\)"),
    (dict(alora_invocation_tokens=[5, 6]), "uses PEFT's ALoraLinearVariant"),
    (dict(rank_pattern={"q_proj": 2}), r"rank 2 != r=4 \(per-layer ranks, LoraConfig\.rank_pattern"),
    (dict(bias="lora_only"), r"LoraConfig\.bias='lora_only' trains base-model tensors"),
    (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' rewrites the base model's weights"),
    (dict(init_lora_weights="olora"), r"init_lora_weights='olora' rewrites the base model's weights"),
], ids=["lora_bias", "alora", "rank_pattern", "bias", "pissa", "olora"])
def test_peft_options_without_an_equivalent_are_refused(kw, msg):
    pm, _ = _peft_model("llama", "lora", lora_alpha=8, **kw)
    with pytest.raises(ValueError, match=msg):
        from_peft(pm)


def test_a_merged_peft_model_is_refused():
    """A merged PEFT adapter lives in its base weights already: converting it would apply it twice."""
    pm, _ = _peft_model("llama", "lora", lora_alpha=8)
    _randomize(pm, ["lora_B"])
    pm.merge_adapter()
    with pytest.raises(ValueError, match=r"are merged into their base weights; call peft_model.unmerge_adapter\(\)"):
        from_peft(pm)
    pm.unmerge_adapter()
    logits = pm(IDS).logits.detach()
    assert rel_err(from_peft(pm)(IDS).logits, logits) < 1e-6


@pytest.mark.parametrize("case", ["target_parameters", "rank_too_large", "read_by_parent"])
def test_a_refusal_leaves_the_peft_model_whole(case):
    """PEFT's target_parameters adds B A to a Conv1D weight as stored, (in, out): converted as a layer's
    update it gave wrong logits (square) or crashed; and a refusal raised by inject came after
    peft_model.unload(), which had already stripped the user's adapter."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    if case == "target_parameters":
        pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=[],
                                                              target_parameters=["attn.c_proj.weight"]))
        msg = r"adapts the parameter 'weight' \(LoraConfig.target_parameters\)"
    elif case == "rank_too_large":
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=20, target_modules=["k_proj"]))
        msg = r"from_peft: rank=20 is larger than layer 'model.layers.0.self_attn.k_proj'"
    else:  # SigLIP's pooling head: nn.MultiheadAttention reads out_proj.weight, never calls out_proj
        import transformers

        siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16,
            patch_size=8))
        pm = peft.get_peft_model(siglip, peft.LoraConfig(r=4, target_modules=["out_proj"]))
        msg = r"from_peft: layer '.*head\.attention\.out_proj' is read by its parent MultiheadAttention"
    before = sum(isinstance(m, LoraLayer) for m in pm.modules())
    with pytest.raises(ValueError, match=msg):
        from_peft(pm)
    assert before > 0 and sum(isinstance(m, LoraLayer) for m in pm.modules()) == before


def test_several_adapters_are_refused():
    """from_peft converts one adapter: unload() would silently drop the others."""
    pm, _ = _peft_model("llama", "lora", lora_alpha=8)
    pm.add_adapter("second", peft.LoraConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"exactly one adapter is supported, the model has \['default', 'second'\]"):
        from_peft(pm)


def test_a_peft_model_with_its_adapters_disabled_converts_them_on_with_a_warning():
    """disable_adapter_layers() makes PEFT compute the base model: the conversion (the adapter, on) no
    longer matched the PEFT model's outputs, silently."""
    pm, _ = _peft_model("llama", "lora", lora_alpha=8)
    logits_on = pm(IDS).logits.detach()
    pm.base_model.disable_adapter_layers()
    assert rel_err(pm(IDS).logits, logits_on) > 1e-2
    with pytest.warns(UserWarning, match=r"have their adapters disabled \(disable_adapter_layers\), so the PEFT model "
                      r"computes the base model there; they are converted with their adapters on"):
        ours = from_peft(pm)
    assert rel_err(ours(IDS).logits, logits_on) < 1e-6


@pytest.mark.parametrize("peft_model_from", ["get_peft_model", "from_pretrained"])
def test_a_sequence_classifier_converts_with_its_trained_head(peft_model_from, tmp_path):
    """PEFT's SEQ_CLS models train their head as a module to save: from_peft refused every one. The
    head becomes a trained module of ours (PEFT's trained copy): the same logits and head gradients,
    and export_peft writes it back, so PEFT loads the export with the same logits. Also from a PEFT
    model loaded for inference (PeftModel.from_pretrained: its head copy frozen), whose head was
    otherwise left frozen and out of the export."""
    import copy

    import transformers

    from tiedlora_kernels import export_peft

    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=3))
    pristine = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                   task_type="SEQ_CLS"))
    _randomize(pm, ["lora_B", "modules_to_save"])
    if peft_model_from == "from_pretrained":
        pm.save_pretrained(tmp_path / "peft")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "peft"))
        assert not any(p.requires_grad for p in pm.parameters())
    labels = torch.tensor([0, 2])
    for n, p in pm.named_parameters():  # (the head's gradients in PEFT, whichever way it was made)
        p.requires_grad_("modules_to_save" in n or "lora_" in n)
    want = pm.eval()(IDS, labels=labels)
    want.loss.backward()
    want_head = {n.split("modules_to_save.default.")[1]: p.grad.clone() for n, p in pm.named_parameters()
                 if "modules_to_save" in n}
    if peft_model_from == "from_pretrained":  # frozen as PeftModel.from_pretrained leaves it
        for p in pm.parameters():
            p.requires_grad_(False)
    ours = from_peft(pm)
    ours.zero_grad()  # (the head is PEFT's parameter, its gradient from PEFT's backward above)
    got = ours(IDS, labels=labels)
    got.loss.backward()
    assert rel_err(want.logits, pristine.eval()(IDS).logits) > 1e-2
    assert rel_err(got.logits, want.logits) < 1e-6
    assert set(want_head) == {"weight", "bias"}
    for n, g in want_head.items():
        assert rel_err(getattr(ours.classifier, n).grad, g) < 1e-6, n
    export_peft(ours, tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(pristine, str(tmp_path / "out")).eval()
    assert rel_err(loaded(IDS).logits, want.logits) < 1e-6


def test_a_head_untied_by_modules_to_save_stays_untied():
    """PEFT's trained copy of a tied lm_head is its own tensor once converted, but the config still said
    tie_word_embeddings=True: tie_weights() (save_pretrained + from_pretrained, resize_token_embeddings)
    tied it back to the input embedding, silently (logits 1.0 off)."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(tie_word_embeddings=True), peft.LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    _randomize(pm, ["lora_B", "modules_to_save"])
    want = pm.eval()(IDS).logits.detach()
    with pytest.warns(UserWarning, match=r"untied the output head from the input embedding: the model's config now "
                                         r"says tie_word_embeddings=False"):
        ours = from_peft(pm)
    assert ours.config.tie_word_embeddings is False and ours.lm_head.weight is not ours.model.embed_tokens.weight
    ours.tie_weights()
    assert rel_err(ours(IDS).logits, want) < 1e-6


def test_dora_with_dropout_warns_that_training_steps_differ():
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                           lora_dropout=0.1))
    _randomize(pm, ["lora_B"])
    logits = pm.eval()(IDS).logits.detach()
    with pytest.warns(UserWarning, match=r"DoRA with lora_dropout=0.1: in training mode PEFT applies"):
        ours = from_peft(pm)
    assert rel_err(ours.eval()(IDS).logits, logits) < 1e-6  # eval mode: identical


@pytest.mark.parametrize("given", ["plain model", "None", "LoraModel"])
def test_anything_but_a_peft_model_is_refused_naming_what_was_given(given):
    """A plain model or None gave AttributeError 'active_adapter'; a PeftModel's base_model (a LoraModel)
    gave a misleading "exactly one adapter is supported, the model has ['default']"."""
    pm, _ = _peft_model("llama", "lora", lora_alpha=8)
    arg, msg = {"plain model": (tiny_llama(), r"got LlamaForCausalLM$"), "None": (None, r"got NoneType$"),
                "LoraModel": (pm.base_model, r"got LoraModel; a LoraModel is the tuner inside a PeftModel: pass the "
                                             r"PeftModel that holds it")}[given]
    with pytest.raises(TypeError, match=r"from_peft: peft_model must be a peft\.PeftModel holding one LoRA or VeRA "
                                        r"adapter \(from get_peft_model or PeftModel\.from_pretrained\), " + msg):
        from_peft(arg)
