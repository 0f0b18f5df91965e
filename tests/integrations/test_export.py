"""export_peft: every exportable adapter becomes a PEFT LoRA directory that PEFT loads with our logits.

Each case builds a base model from a seed, keeps a copy of its weights, injects and randomizes an
adapter, exports it, and loads the directory with ``peft.PeftModel.from_pretrained`` onto a fresh
model holding the same base weights. Key names are checked against what ``peft.get_peft_model``
itself produces on that base, and ``from_peft`` of the loaded model must give our logits back.
"""

import copy
import json
import os
import warnings

import pytest
import torch

from helpers import load_quantized, randomize_adapters, rel_err, tiny_gpt2, tiny_llama
from tiedlora_kernels import (TiedFactors, TiedLoRAConfig, adapted_layers, adapter_named_parameters, export_peft,
                              from_peft, inject, load_adapter, merge, save_adapter)
from tiedlora_kernels.integrations import export as export_module

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
#: Every preset whose update is low-rank (all but simple_dora).
EXPORTABLE = ["lora", "vera", "tl1", "tl2", "tl3", "tl4", "tl5", "tl6", "partial", "tl_extra", "tensor_embed", "dora"]
#: What a PEFT user writes for "every linear layer but the head": the reference for key names.
PEFT_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "gpt2": ["c_attn", "c_proj", "c_fc"]}


def assert_exact(out, ours):
    """The house tolerance rule: ``out`` (fp32) is as close to our model's fp64 logits as our own fp32
    logits are (2x plus a floor). The folded products round differently, nothing else may differ."""
    logits, logits64 = ours
    assert rel_err(out, logits64) <= 2 * rel_err(logits, logits64) + 1e-7


def _base(family, n_layer=2):
    torch.manual_seed(0)
    return tiny_llama(n_layer=n_layer) if family == "llama" else tiny_gpt2(n_layer=n_layer)


def _prepared(family, preset, n_layer=2, **config):
    """(model with a random adapter, its (fp32, fp64) logits, a copy of the base weights)."""
    model = _base(family, n_layer)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = model(IDS).logits.detach()
    inject(model, TiedLoRAConfig(rank=4, preset=preset, alpha=8.0, **config))
    randomize_adapters(model, std=0.2)
    logits = model(IDS).logits.detach()
    assert rel_err(logits, base_logits) > 1e-2  # the adapter changes the output: the comparison has teeth
    logits64 = copy.deepcopy(model).double()(IDS).logits.detach()
    return model, (logits, logits64), base_state


def _fresh(family, base_state, n_layer=2):
    model = _base(family, n_layer)
    model.load_state_dict(base_state)
    return model


def _load_peft(family, directory, base_state, n_layer=2):
    pm = peft.PeftModel.from_pretrained(_fresh(family, base_state, n_layer), str(directory)).eval()
    return pm


def _peft_adapted(pm):
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def _shapes(tensors):
    return {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("preset", EXPORTABLE)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_loads_in_peft_with_our_logits(family, preset, tmp_path):
    model, logits, base_state = _prepared(family, preset)
    export_peft(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing left beside it
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] / cfg["r"] == 1 and not cfg["use_rslora"]  # the one scale vLLM reads
    assert cfg["fan_in_fan_out"] == (family == "gpt2") and cfg["use_dora"] == (preset == "dora")
    assert sorted(cfg["target_modules"]) == sorted(PEFT_TARGETS[family])

    # Key names and shapes: exactly what PEFT itself makes for these targets on this base.
    ref = peft.get_peft_model(_fresh(family, base_state), peft.LoraConfig(
        r=4, target_modules=PEFT_TARGETS[family], use_dora=preset == "dora", fan_in_fan_out=family == "gpt2"))
    assert _shapes(load_file(tmp_path / "out" / "adapter_model.safetensors")) == \
        _shapes(get_peft_model_state_dict(ref))

    pm = _load_peft(family, tmp_path / "out", base_state)
    assert _peft_adapted(pm) == {n for n, _ in adapted_layers(model)}
    assert_exact(pm(IDS).logits, logits)
    back = from_peft(pm)
    assert_exact(back(IDS).logits, logits)


def test_simple_dora_refused_pointing_to_merge(tmp_path):
    model, _, _ = _prepared("llama", "simple_dora")
    with pytest.raises(ValueError, match=r"Simple DoRA.*merge"):
        export_peft(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bits", [4, 8])
def test_simple_dora_over_a_quantized_base_points_to_a_dense_copy(bits, tmp_path):
    """The advice for a dense base, "merge(model), then model.save_pretrained", gave over a quantized base a
    checkpoint that does not load back (the quantized weights sit under ``base_layer.``) with rounded merged
    weights. The error names a dense copy instead, and following it gives a saved model that loads back and
    computes what the adapted quantized model does."""
    import transformers

    pytest.importorskip("bitsandbytes")

    _base("llama").save_pretrained(tmp_path / "base")
    model = load_quantized(tmp_path / "base", bits).train()  # train mode: an eval forward may repack 4-bit weights
    inject(model, TiedLoRAConfig(rank=4, preset="simple_dora", alpha=8.0, target_modules="all-linear"))
    randomize_adapters(model, std=0.2)
    with pytest.raises(ValueError, match=r"Simple DoRA.*merged into a dense copy of the model.*dequantize") as refused:
        export_peft(model, tmp_path / "out")
    assert "model.save_pretrained" not in str(refused.value)
    assert not (tmp_path / "out").exists()

    save_adapter(model, tmp_path / "adapter")  # the advice, step by step
    dense = load_quantized(tmp_path / "base", bits).dequantize().train()
    load_adapter(dense, tmp_path / "adapter")
    merge(dense)
    dense.save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).train()
    with torch.no_grad():
        assert rel_err(back(IDS).logits, model(IDS).logits) < 1e-5


@pytest.mark.parametrize("change, message", [("magnitude", "differ in DoRA"), ("dropout", "different adapter dropout")])
def test_settings_peft_holds_once_per_adapter_must_agree(change, message, tmp_path):
    """PEFT's use_dora and lora_dropout are one value per adapter: layers that differ are refused."""
    model, _, _ = _prepared("llama", "dora")
    _, layer = list(adapted_layers(model))[-1]
    if change == "magnitude":
        layer.magnitude = "none"
    else:
        layer.dropout = 0.3
    with pytest.raises(ValueError, match=message):
        export_peft(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_per_layer_scaling_ranks_and_dropout(tmp_path):
    """Per-layer s (from_peft, gamma) folds into lora_B; kinds of another rank get rank/alpha patterns."""
    model, _, base_state = _prepared("llama", "lora", dropout=0.1)
    g = torch.Generator().manual_seed(3)
    for i, (name, layer) in enumerate(adapted_layers(model)):
        layer.scaling = 0.5 + 0.25 * i
        if name.endswith("q_proj"):  # rank 2 for this kind
            A = torch.randn(2, layer.in_features, generator=g) * 0.2
            B = torch.randn(layer.out_features, 2, generator=g) * 0.2
            object.__setattr__(layer, "_factors", TiedFactors(A, B, True, True))
    model.eval()
    logits = (model(IDS).logits.detach(), copy.deepcopy(model).double()(IDS).logits.detach())
    export_peft(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"], cfg["lora_dropout"]) == \
        (4, 4, {"q_proj": 2}, {"q_proj": 2}, 0.1)
    pm = _load_peft("llama", tmp_path / "out", base_state)
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 2
    assert_exact(pm(IDS).logits, logits)


def test_gpt2_targets_select_only_adapted_layers(tmp_path):
    """Adapting attn.c_proj but not mlp.c_proj: the suffix "c_proj" would make PEFT adapt both."""
    model, logits, base_state = _prepared(
        "gpt2", "tl6", target_modules=r"transformer\.h\.\d+\.(attn\.c_proj|mlp\.c_fc)")
    export_peft(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["attn.c_proj", "c_fc"]
    pm = _load_peft("gpt2", tmp_path / "out", base_state)
    assert _peft_adapted(pm) == {n for n, _ in adapted_layers(model)}
    assert_exact(pm(IDS).logits, logits)


@pytest.mark.parametrize("preset", ["tl6", "dora"])
def test_merged_model_exports_the_same_files(preset, tmp_path):
    """merge changes the base weights, never the adapter: the export of a merged model is identical."""
    model, _, _ = _prepared("gpt2", preset)
    export_peft(model, tmp_path / "unmerged")
    merge(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    export_peft(model, tmp_path / "merged")
    assert all(layer.merged for _, layer in adapted_layers(model))  # the model is left as it was
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("unmerged", "merged"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "unmerged" / "adapter_config.json").read_text() == \
        (tmp_path / "merged" / "adapter_config.json").read_text()


def test_file_sizes_tied_export_is_up_to_L_times_larger(tmp_path):
    """The export holds one (lora_A, lora_B) pair per layer, the tensors of a LoRA of the same rank and
    targets, whatever the preset: up to L times the adapter's own tensors (TL5, one tied pair per
    kind: exactly L). Our saved file stores frozen factors as a seed, so against it TL1..TL4 and VeRA
    grow more. Measured here (4 layers, hidden 32, rank 4, all linear layers, fp32): TL5 11,944 bytes
    saved -> 40,840 exported (tensors 8,480 -> 33,920 bytes); TL1 7,104 -> 40,840; LoRA 42,264 -> 40,840."""
    L = 4
    for preset in EXPORTABLE:
        model, _, _ = _prepared("llama", preset, n_layer=L)
        export_peft(model, tmp_path / preset)
        exported = sum(t.numel() for t in load_file(tmp_path / preset / "adapter_model.safetensors").values())
        lora = sum(layer.rank * (layer.in_features + layer.out_features) + layer.out_features * (preset == "dora")
                   for _, layer in adapted_layers(model))
        ours = sum(t.numel() for _, t in adapter_named_parameters(model))
        assert exported == lora, preset
        assert exported == L * ours if preset == "tl5" else exported <= L * ours, preset
    model, _, _ = _prepared("llama", "tl5", n_layer=L)
    saved = os.path.getsize(save_adapter(model, tmp_path / "tl5_saved"))
    assert (L - 1) * saved < os.path.getsize(tmp_path / "tl5" / "adapter_model.safetensors") <= L * saved


def test_base_model_name(tmp_path):
    model, _, _ = _prepared("llama", "tl6")
    export_peft(model, tmp_path / "none")
    model.config._name_or_path = "org/base-model"
    export_peft(model, tmp_path / "config")
    export_peft(model, tmp_path / "arg", base_model_name_or_path="/models/base")
    names = [json.loads((tmp_path / d / "adapter_config.json").read_text())["base_model_name_or_path"]
             for d in ("none", "config", "arg")]
    assert names == [None, "org/base-model", "/models/base"]


def test_rewrite_is_atomic(tmp_path, monkeypatch):
    """A second export replaces the first as a whole; one that fails midway leaves the first intact
    and no temporary files; a directory holding other files is refused untouched."""
    out = tmp_path / "out"
    model, _, _ = _prepared("llama", "tl6")
    export_peft(model, out)
    first = {f: (out / f).read_bytes() for f in os.listdir(out)}
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        layer = next(layer for _, layer in adapted_layers(model))
        layer.scaling = 3.0

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_peft(model, out)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == first

    export_peft(model, out)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (out / "adapter_model.safetensors").read_bytes() != first["adapter_model.safetensors"]

    (out / "notes.txt").write_text("mine")
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(ValueError, match="other files"):
        export_peft(model, out)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_exported_files_get_the_usual_mode(tmp_path):
    """safetensors and tempfile create 0600 files; a serving process running as another user must
    be able to read an export, as it can read a plain file."""
    import os
    import stat

    model = tiny_llama()
    inject(model, TiedLoRAConfig(rank=2, preset="tl6"))
    export_peft(model, tmp_path / "exp")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "exp" / name).st_mode) == 0o666 & ~mask, name


def test_a_compiled_model_exports_the_plain_models_keys(tmp_path):
    """torch.compile holds the model as ``_orig_mod``: its keys carried that prefix, PEFT matched none
    of them and served the bare base model (with only a warning)."""
    model, logits, base_state = _prepared("llama", "tl6")
    export_peft(model, tmp_path / "plain")
    export_peft(torch.compile(model, backend="eager"), tmp_path / "compiled")
    assert load_file(tmp_path / "compiled" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()
    assert_exact(_load_peft("llama", tmp_path / "compiled", base_state)(IDS).logits, logits)


@pytest.mark.parametrize("first,then,msg", [
    (save_adapter, export_peft, r"export_peft: .*out holds a tiedlora checkpoint \(save_adapter writes "
                                r"adapter_model\.safetensors too\)"),
    (export_peft, save_adapter, r"save_adapter: .*out holds an adapter_model\.safetensors that is no tiedlora "
                                r"checkpoint")], ids=["export-over-checkpoint", "checkpoint-over-export"])
def test_a_directory_holding_the_other_format_is_refused(first, then, msg, tmp_path):
    """save_adapter and PEFT use the same file names: each silently replaced the other's files."""
    model, _, _ = _prepared("llama", "tl6")
    first(model, tmp_path / "out")
    before = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")}
    with pytest.raises(ValueError, match=msg):
        then(model, tmp_path / "out")
    assert {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]
    then(model, tmp_path / "again")
    then(model, tmp_path / "again")  # its own format is replaced, as before


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_adapter_is_refused_naming_the_tensor(value, tmp_path):
    """A diverged adapter was exported without complaint: PEFT and serving engines would serve NaN."""
    model, _, _ = _prepared("llama", "tl6")
    with torch.no_grad():
        model.tiedlora["q_proj"].B[0, 0] = value
    with pytest.raises(ValueError, match=r"export_peft: tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj"
                                         r"\.lora_B\.weight' holds non-finite values"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("directory", [None, 5], ids=["None", "int"])
def test_a_directory_that_is_no_path_is_refused_naming_it(directory):
    model, _, _ = _prepared("llama", "tl6")
    with pytest.raises(TypeError, match=rf"export_peft: directory must be a path \(str or os.PathLike\), got "
                                        rf"{type(directory).__name__}"):
        export_peft(model, directory)


def _tiny_transformers(config_cls, model_cls, **kw):
    import transformers
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))


_ROBERTA = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                num_labels=3, max_position_embeddings=40)


@pytest.mark.parametrize("head", ["trained", "frozen"])
@pytest.mark.parametrize("loader", ["PeftModel", "AutoPeftModel"])
def test_a_trained_task_head_exports_as_a_module_to_save(loader, head, tmp_path):
    """A sequence classifier trains its head with the adapter: the export left the head out (no warning,
    no modules_to_save), so PEFT served the base model's untrained head (logits 0.7 off). It goes in as
    PEFT's modules_to_save with task_type SEQ_CLS (AutoPeftModelForSequenceClassification loads it).
    A frozen head too: PEFT's SEQ_CLS copies the classifier and demands its state from the file."""
    base = _tiny_transformers("RobertaConfig", "RobertaForSequenceClassification", **_ROBERTA)
    base.save_pretrained(tmp_path / "base")
    model = inject(copy.deepcopy(base), TiedLoRAConfig(rank=4, preset="tl6"))
    randomize_adapters(model, std=0.2)
    if head == "trained":
        model.classifier.requires_grad_(True)
        with torch.no_grad():
            for p in model.classifier.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    model.eval()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits.detach()
    logits64 = copy.deepcopy(model).double()(ids).logits.detach()
    export_peft(model, tmp_path / "out", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]  # (the head, whole)
    if loader == "PeftModel":
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    else:
        pm = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert rel_err(base(ids).logits, logits) > 1e-2
        assert_exact(pm(ids).logits, (logits, logits64))


def test_seq2seq_lm_exports_for_auto_peft(tmp_path):
    """An encoder-decoder LM's export named no task type, so AutoPeftModelForSeq2SeqLM refused it
    ('Cannot infer the auto class')."""
    base = _tiny_transformers("T5Config", "T5ForConditionalGeneration", vocab_size=97, d_model=32, d_kv=8, d_ff=48,
                              num_layers=1, num_heads=4, decoder_start_token_id=0)
    base.save_pretrained(tmp_path / "base")
    model = inject(copy.deepcopy(base), TiedLoRAConfig(rank=4, preset="vera"))
    randomize_adapters(model, std=0.2)
    export_peft(model.eval(), tmp_path / "out", base_model_name_or_path=str(tmp_path / "base"))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    pm = peft.AutoPeftModelForSeq2SeqLM.from_pretrained(str(tmp_path / "out")).eval()
    inputs = dict(input_ids=IDS, decoder_input_ids=IDS[:, :4])
    with torch.no_grad():
        logits, logits64 = model(**inputs).logits, copy.deepcopy(model).double()(**inputs).logits
        assert rel_err(base(**inputs).logits, logits) > 1e-3
        assert_exact(pm(**inputs).logits, (logits, logits64))


def test_an_adapted_classifier_exports_without_the_task_type(tmp_path):
    """PEFT's SEQ_CLS copies the head as a module to save and keeps LoRA off it: a model whose adapter
    adapts the classifier exports as a plain PeftModel directory instead."""
    base = _tiny_transformers("BertConfig", "BertForSequenceClassification", **_ROBERTA)
    model = inject(copy.deepcopy(base), TiedLoRAConfig(rank=2, preset="lora", exclude_modules=[]))
    assert "classifier" in {n for n, _ in adapted_layers(model)}
    randomize_adapters(model, std=0.2)
    model.eval()
    export_peft(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["task_type"] is None and cfg["modules_to_save"] is None
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert_exact(pm(IDS).logits, (model(IDS).logits, copy.deepcopy(model).double()(IDS).logits))


def test_a_trained_parameter_peft_cannot_hold_is_refused(tmp_path):
    """An adapted layer's own base weight, or a weight two modules share (not the embedding tied to the
    head, which exports tied; it came first here and let the shared norm through): refused naming the
    parameter, nothing written."""
    model = tiny_llama(n_layer=1, tie_word_embeddings=True)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    model.get_parameter("model.layers.0.self_attn.q_proj.weight").requires_grad_(True)
    with pytest.raises(ValueError, match=r"belongs to the adapted layer 'model.layers.0.self_attn.q_proj' itself "
                                         r"\(its base weight or bias\)"):
        export_peft(model, tmp_path / "out")
    model = tiny_llama(n_layer=2, tie_word_embeddings=True)
    model.model.layers[1].input_layernorm.weight = model.model.layers[0].input_layernorm.weight
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        model.get_parameter(name).requires_grad_(True)
    with pytest.raises(ValueError, match=r"'model.layers.0.input_layernorm.weight' is shared with "
                                         r"'model.layers.1.input_layernorm.weight' \(tied weights, not the model's"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_trained_embedding_tied_to_the_head_exports_with_weight_tying(tmp_path):
    """A trained input embedding that is also the output head (tie_word_embeddings): exported as PEFT
    does it (modules_to_save of the embedding, ensure_weight_tying, both modules' states in the file);
    PEFT loads it tied, with our logits (refused before, as a copy that PEFT would untie)."""
    torch.manual_seed(0)
    base = tiny_llama(n_layer=1, tie_word_embeddings=True)
    model = inject(copy.deepcopy(base), TiedLoRAConfig(rank=4, preset="tl6"))
    randomize_adapters(model, std=0.2)
    embedding = model.get_parameter("model.embed_tokens.weight")
    embedding.requires_grad_(True)
    with torch.no_grad():
        embedding.add_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(4)) * 0.3)
    logits, logits64 = model(IDS).logits.detach(), copy.deepcopy(model).double()(IDS).logits.detach()
    export_peft(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["model.embed_tokens"] and cfg["ensure_weight_tying"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert rel_err(base(IDS).logits, logits) > 1e-2
        assert_exact(pm(IDS).logits, (logits, logits64))


def test_a_trained_head_whose_name_ends_another_adapted_layers_is_refused_saying_so(tmp_path):
    """DistilBERT's classifier: PEFT copies every module whose name ends with 'classifier', the adapted
    pre_classifier too; refused saying to leave that layer out, and exported once it is."""
    def distilbert():
        return _tiny_transformers("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=97, dim=32,
                                  n_layers=1, n_heads=4, hidden_dim=48, num_labels=3)

    for exclude, refused in (([], True), (["pre_classifier"], False)):
        model = inject(distilbert(), TiedLoRAConfig(rank=4, preset="tl6",
                                                    exclude_modules=[*TiedLoRAConfig().exclude_modules, *exclude]))
        model.classifier.requires_grad_(True)
        if refused:
            with pytest.raises(ValueError, match=r"PEFT copies every module whose name ends with 'classifier'\) would "
                               r"hold the adapted layer 'pre_classifier'; inject without adapting 'pre_classifier'"):
                export_peft(model, tmp_path / "out")
        else:
            export_peft(model, tmp_path / "out")
            assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"] == \
                ["classifier"]
