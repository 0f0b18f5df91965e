"""save_adapter / load_adapter: round trips, what is written, and refusal of bad files."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

from helpers import randomize_adapters, tiny_gpt2, tiny_llama
from tiedlora_kernels import PRESETS, TiedLoRAConfig, adapted_layers, inject, load_adapter, save_adapter
from tiedlora_kernels.integrations.checkpoint import ADAPTER_FILE, CONFIG_FILE
from tiedlora_kernels.integrations.inject import adapter_named_parameters

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def trained(preset="tl6", family="llama", **kw):
    torch.manual_seed(0)
    model = tiny_gpt2() if family == "gpt2" else tiny_llama()
    inject(model, TiedLoRAConfig(rank=4, preset=preset, seed=5, **kw))
    randomize_adapters(model)
    return model


def base_of_trained(family="llama"):
    """The base model :func:`trained` starts from."""
    torch.manual_seed(0)
    return tiny_gpt2() if family == "gpt2" else tiny_llama()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_round_trip_into_fresh_model(tmp_path, preset):
    model = trained(preset)
    save_adapter(model, tmp_path)
    fresh = tiny_llama()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("tiedlora.")
                           and ".adapter_" not in k}, strict=False)
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def test_a_merged_model_refuses_a_new_adapter_and_a_reset(tmp_path):
    """Writing adapter tensors under a merged weight would leave it holding the old adapter (and
    unmerge would subtract the new one's delta from it): refused, nothing changed."""
    from tiedlora_kernels import merge, reset_adapters, unmerge

    other = trained()
    randomize_adapters(other, seed=4)
    save_adapter(other, tmp_path)
    model = trained()
    merge(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call, name in ((lambda: load_adapter(model, tmp_path), "load_adapter"),
                       (lambda: reset_adapters(model), "reset_adapters")):
        with pytest.raises(ValueError, match=name + r": \[.*\] and \d+ more are merged; call tiedlora_kernels.unmerge"):
            call()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    unmerge(model)
    load_adapter(model, tmp_path)
    assert torch.allclose(model(IDS).logits, other(IDS).logits, atol=1e-5)


def test_only_trainable_tensors_are_written(tmp_path):
    model = trained("tl4")  # A frozen random (rebuildable from the seed), B and u trained
    save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / ADAPTER_FILE), "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.endswith(".B") or k.endswith(".adapter_u") for k in keys)
    human = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert human["preset"] == "tl4" and human["layers"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_frozen_factor_that_seed_cannot_rebuild_is_saved(tmp_path):
    model = trained("tl4")
    with torch.no_grad():
        model.tiedlora["q_proj"].A.mul_(2)  # e.g. projections imported from PEFT
    save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / ADAPTER_FILE), "pt") as f:
        assert "tiedlora.q_proj.A" in f.keys() and "tiedlora.k_proj.A" not in f.keys()
    fresh = tiny_llama()
    fresh.load_state_dict(model.state_dict(), strict=False)
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.tiedlora["q_proj"].A, model.tiedlora["q_proj"].A)


def test_loading_over_an_adapter_resets_the_frozen_factors_the_file_leaves_out(tmp_path):
    """A file without a frozen factor (its seed rebuilds it) loaded into a model that holds another
    adapter's value of that factor: the loaded model computes what the file does in a fresh model."""
    edited, plain = trained("tl4"), trained("tl4")
    with torch.no_grad():
        edited.tiedlora["q_proj"].A.mul_(2)  # saved: the seed cannot rebuild it
    save_adapter(edited, tmp_path / "edited")
    save_adapter(plain, tmp_path / "plain")
    model = load_adapter(base_of_trained(), tmp_path / "edited")
    load_adapter(model, tmp_path / "plain")
    assert torch.equal(model.tiedlora["q_proj"].A, plain.tiedlora["q_proj"].A)
    assert torch.equal(model(IDS).logits, plain(IDS).logits)


def test_banked_frozen_factors_are_rebuilt_not_saved(tmp_path):
    """Partial tying's frozen banks (kA, r, K) are rebuilt from the seed like unbanked factors."""
    model = trained("partial", train_A=False)
    save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / ADAPTER_FILE), "pt") as f:
        assert not any(k.endswith(".A") for k in f.keys())
    assert torch.equal(load_adapter(base_of_trained(), tmp_path)(IDS).logits, model(IDS).logits)


def test_mismatched_model_is_refused_naming_the_layer(tmp_path):
    save_adapter(trained("tl6"), tmp_path)
    with pytest.raises(ValueError, match="rank=4 is larger|does not match"):
        load_adapter(tiny_llama(hidden=48), tmp_path)
    other = tiny_llama(hidden=48)
    inject(other, TiedLoRAConfig(rank=4, preset="tl6", seed=5))
    with pytest.raises(ValueError, match=r"saved layer 'model\.layers\.0\.self_attn\.q_proj'"):
        load_adapter(other, tmp_path)
    differs = tiny_llama()
    inject(differs, TiedLoRAConfig(rank=4, preset="lora", seed=5))
    with pytest.raises(ValueError, match="'preset': \\('lora', 'tl6'\\)"):
        load_adapter(differs, tmp_path)


def test_corrupted_and_truncated_files_are_refused(tmp_path):
    save_adapter(trained("tl6"), tmp_path)
    path = tmp_path / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_adapter(tiny_llama(), tmp_path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match=ADAPTER_FILE):
        load_adapter(tiny_llama(), tmp_path / "nowhere")


def _assert_the_next_steps_agree(original, resumed, ids):
    """One more step of each (model, optimizer): the resumed run takes exactly the original's."""
    for m, o in (original, resumed):
        o.zero_grad()
        m(ids, labels=ids).loss.backward()
        o.step()
    for (n, a), (_, b) in zip(original[0].named_parameters(), resumed[0].named_parameters()):
        assert torch.equal(a, b), n


def test_optimizer_state_round_trip_gives_the_same_next_step(tmp_path):
    model = trained("tl6")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    save_adapter(model, tmp_path, optimizer=opt)
    base_state = {k: v for k, v in model.state_dict().items() if not k.startswith("tiedlora.") and ".adapter_" not in k}

    resumed = tiny_llama()
    resumed.load_state_dict(base_state, strict=False)
    load_adapter(resumed, tmp_path)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    load_adapter(resumed, tmp_path, optimizer=opt2)
    _assert_the_next_steps_agree((model, opt), (resumed, opt2), IDS)


@pytest.mark.cuda
@pytest.mark.parametrize("flag", ["fused", "capturable"])
def test_a_fused_or_capturable_optimizer_resumes_on_the_gpu(flag, tmp_path):
    """A fused / capturable AdamW keeps its step as fp32 on the parameter's device (torch's load_state_dict
    puts it there); a resumed one left it on the CPU and its next step failed."""
    model = trained("tl6").cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, **{flag: True})
    ids = IDS.cuda()
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    save_adapter(model, tmp_path, optimizer=opt)
    resumed = copy.deepcopy(model)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2, **{flag: True})
    load_adapter(resumed, tmp_path, optimizer=opt2)
    _assert_the_next_steps_agree((model, opt), (resumed, opt2), ids)


def test_refused_load_leaves_a_plain_model_untouched(tmp_path):
    save_adapter(trained("tl6"), tmp_path)
    other = tiny_llama(hidden=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="load_adapter"):
        load_adapter(other, tmp_path)
    assert not hasattr(other, "tiedlora")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_a_file_refused_for_its_dtypes_leaves_a_plain_model_untouched(tmp_path):
    """adapter_dtype="auto" saved from an fp32 base, loaded into a bf16 one: refused before inject."""
    save_adapter(trained("tl6", adapter_dtype="auto"), tmp_path)
    other = tiny_llama().to(torch.bfloat16)
    flags = [p.requires_grad for p in other.parameters()]
    with pytest.raises(ValueError, match=r"has dtype torch.float32 in the file, torch.bfloat16 in the model"):
        load_adapter(other, tmp_path)
    assert not hasattr(other, "tiedlora") and not list(adapted_layers(other))
    assert [p.requires_grad for p in other.parameters()] == flags


@pytest.mark.parametrize("into", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tl6", "vera"])
def test_a_model_cast_to_bf16_after_inject_saves_a_file_a_fresh_model_loads(tmp_path, into, preset):
    """inject (fp32 adapters), model.to(bf16), train, save: the file holds bf16 tensors, which a fresh
    model injected from the same config holds as fp32. Widening is exact, so it loads (it used to be
    refused whatever the fresh model's dtype); VeRA's frozen factors, rounded draws of the seed, are
    saved, since the fresh model would rebuild them unrounded."""
    model = trained(preset).to(torch.bfloat16)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_llama().to(getattr(torch, into)), tmp_path)
    got = dict(adapter_named_parameters(fresh))
    for name, t in adapter_named_parameters(model):
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t.float()), name


def test_a_bf16_adapter_file_loads_into_an_injected_model_with_fp32_adapters(tmp_path):
    """A file saved with adapter_dtype="bfloat16" into a model injected with fp32 adapters: the tensors
    widen exactly, as a file of a model cast to bf16 after inject does (the config's adapter_dtype was
    compared as a field and refused it); the other way, narrowing, is refused per tensor."""
    saved = trained("tl6", adapter_dtype="bfloat16")
    opt = torch.optim.AdamW([p for p in saved.parameters() if p.requires_grad], lr=1e-2)
    saved(IDS, labels=IDS).loss.backward()
    opt.step()
    save_adapter(saved, tmp_path, optimizer=opt)
    fresh = inject(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", seed=5))
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    load_adapter(fresh, tmp_path, optimizer=opt2)  # the bf16 moments widen with their adapters
    assert all(st["exp_avg"].dtype == torch.float32 for st in opt2.state.values())
    fresh(IDS, labels=IDS).loss.backward()
    opt2.step()
    save_adapter(saved, tmp_path)
    load_adapter(fresh, tmp_path)
    got = dict(adapter_named_parameters(fresh))
    for name, t in adapter_named_parameters(saved):
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t.float()), name
    save_adapter(fresh, tmp_path / "fp32")
    with pytest.raises(ValueError, match=r"has dtype torch.float32 in the file, torch.bfloat16 in the model"):
        load_adapter(trained("tl6", adapter_dtype="bfloat16"), tmp_path / "fp32")


def test_an_injected_model_takes_a_file_whose_layers_it_adapts_however_it_selected_them(tmp_path):
    """The same layers selected by another spelling (a list in another order, a regex, longer names):
    refused as a config that differs, though only which layers are adapted matters (compared per
    layer, with their kinds); other layers are still refused."""
    saved = trained("tl6", target_modules=["q_proj", "v_proj"])
    save_adapter(saved, tmp_path)
    for targets in (["v_proj", "q_proj"], r".*\.(q|v)_proj", ["self_attn.q_proj", "self_attn.v_proj"]):
        fresh = inject(base_of_trained(), TiedLoRAConfig(rank=4, preset="tl6", seed=5, target_modules=targets))
        load_adapter(fresh, tmp_path)
        with torch.no_grad():
            assert torch.equal(fresh(IDS).logits, saved(IDS).logits), targets
    other = inject(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", seed=5, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match="load_adapter"):
        load_adapter(other, tmp_path)


def test_a_peft_directory_is_refused_pointing_to_from_peft(tmp_path):
    from tiedlora_kernels import export_peft

    export_peft(trained("tl6"), tmp_path / "peft")
    with pytest.raises(ValueError, match=r"not a tiedlora adapter file .*\(a PEFT adapter directory, as export_peft "
                       r"writes: load it with peft.PeftModel.from_pretrained, then convert with tiedlora_kernels.from_peft\)"):
        load_adapter(tiny_llama(), tmp_path / "peft")


def test_saved_files_get_the_usual_mode_and_unknown_format_versions_are_refused(tmp_path):
    import os

    from safetensors.torch import load_file, save_file

    save_adapter(trained("tl6"), tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / ADAPTER_FILE).stat().st_mode & 0o777 == 0o666 & ~mask
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "format_version": "99"})
    with pytest.raises(ValueError, match="format_version '99'; this version of tiedlora-kernels reads \\[.1., .2., .3., .4.\\]"):
        load_adapter(tiny_llama(), tmp_path)


def test_optimizer_hyperparameters_come_back(tmp_path):
    model = trained("tl6")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=(0.8, 0.9),
                            weight_decay=0.05)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    save_adapter(model, tmp_path, optimizer=opt)
    resumed = tiny_llama()
    resumed.load_state_dict(model.state_dict(), strict=False)
    load_adapter(resumed, tmp_path)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1.0)
    load_adapter(resumed, tmp_path, optimizer=opt2)
    g = opt2.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (3e-3, (0.8, 0.9), 0.05)


def _base_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("tiedlora.") and ".adapter_" not in k}


#: The config fields each older format's writer did not write, with the value a file saved today
#: needs to be that file (checked once against files written by the format-1 and format-2 code).
_FIELDS_LATER_THAN = {"1": {"alpha_pattern": {}, "kind_rule": "last", "kinds": {}, "exclude_rule": "name"},
                      "2": {"exclude_rule": "name"}}


def _rewrite_as_format(directory, version, **written_with):
    """Turn a file saved today into the file the format-``version`` writer wrote for the same model:
    the fields it lacked removed from the config, its format_version, its hash. ``written_with``:
    values those fields had for the writer instead (its code selected layers that way)."""
    from safetensors.torch import load_file, save_file

    from tiedlora_kernels.integrations.checkpoint import content_hash

    path = directory / ADAPTER_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    config = json.loads(meta["config"])
    for field, value in {**_FIELDS_LATER_THAN[version], **written_with}.items():
        assert config.pop(field) == value, field
    meta = {**meta, "format_version": version, "config": json.dumps(config)}
    meta["sha256"] = content_hash(tensors, meta["format_version"], meta["config"], meta["layers"])
    save_file(tensors, str(path), metadata=meta)


def test_format_2_files_select_the_layers_they_were_saved_with(tmp_path):
    """Format 2 predates exclude_rule="module": "all-linear" adapted BERT's MLM head then (its
    cls.predictions layers). Such a file loads into a fresh model with those layers, the same
    function; today's default leaves the head alone."""
    import transformers

    def bert():
        torch.manual_seed(0)
        return transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=32)).eval()

    model = inject(bert(), TiedLoRAConfig(rank=4, preset="tl6", seed=5, exclude_rule="name"))
    randomize_adapters(model)
    names = {n for n, _ in adapted_layers(model)}
    assert "cls.predictions.decoder" in names
    save_adapter(model, tmp_path)
    _rewrite_as_format(tmp_path, "2")
    fresh = load_adapter(bert(), tmp_path)
    assert {n for n, _ in adapted_layers(fresh)} == names
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    assert not any(n.startswith("cls.") for n, _ in adapted_layers(inject(bert(), TiedLoRAConfig(rank=4))))
    # A few commits wrote format 2 under the module rule already: the saved layer table tells
    today = inject(bert(), TiedLoRAConfig(rank=4, preset="tl6", seed=5, exclude_rule="module"))
    randomize_adapters(today)
    save_adapter(today, tmp_path / "module")
    _rewrite_as_format(tmp_path / "module", "2", exclude_rule="module")
    fresh = load_adapter(bert(), tmp_path / "module")
    assert {n for n, _ in adapted_layers(fresh)} == {n for n, _ in adapted_layers(today)}
    assert torch.equal(fresh(IDS).logits, today(IDS).logits)


@pytest.mark.parametrize("family", ["siglip", "musicgen"])
@pytest.mark.parametrize("exclude_rule", ["heads", "module"])
def test_models_with_layers_read_by_their_parent_or_a_head_container_load_what_they_saved(family, exclude_rule,
                                                                                          tmp_path):
    """SigLIP's pooling head holds an nn.MultiheadAttention (its out_proj's weight is read, never
    called) and MusicGen's output head is a ModuleList: a fresh model, seen through its shell, selects
    the layers the file was saved with, under today's rule and the one before it."""
    import transformers

    def build():
        torch.manual_seed(0)
        if family == "siglip":
            return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16,
                patch_size=8)).eval()
        return transformers.MusicgenForCausalLM(transformers.MusicgenDecoderConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=48,
            num_codebooks=4)).eval()

    model = inject(build(), TiedLoRAConfig(rank=4, preset="tl6", exclude_rule=exclude_rule))
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    fresh = load_adapter(build(), tmp_path)
    assert {n for n, _ in adapted_layers(fresh)} == {n for n, _ in adapted_layers(model)}
    for (name, a), (_, b) in zip(adapter_named_parameters(fresh), adapter_named_parameters(model)):
        assert torch.equal(a, b), name


def test_format_1_files_load_with_the_kinds_they_were_written_with(tmp_path):
    """Format-1 files tied GPT-2's attn.c_proj and mlp.c_proj as one kind "c_proj": they load into a
    fresh model with that grouping (the same function), and into a model injected under today's
    rule they are refused, naming the kind."""
    model = trained("tl6", family="gpt2", kind_rule="last", exclude_rule="name")
    save_adapter(model, tmp_path)
    _rewrite_as_format(tmp_path, "1")
    fresh = tiny_gpt2()
    fresh.load_state_dict(_base_state(model), strict=False)
    load_adapter(fresh, tmp_path)
    assert {m.kind for _, m in adapted_layers(fresh)} == {"c_attn", "c_proj", "c_fc"}
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    today = tiny_gpt2()
    inject(today, TiedLoRAConfig(rank=4, preset="tl6", seed=5))
    with pytest.raises(ValueError, match=r"\['c_proj', 32, 32\]\) does not match the model "
                                         r"\(\['attn\.c_proj', 32, 32\]\); only the kind differs.*kind_rule='last'"):
        load_adapter(today, tmp_path)


def test_format_1_llama_files_load_into_a_model_injected_today(tmp_path):
    """LLaMA's kinds are the same under both rules, so an old file also loads into an injected model."""
    model = trained("tl6", kind_rule="last", exclude_rule="name")
    save_adapter(model, tmp_path)
    _rewrite_as_format(tmp_path, "1")
    today = tiny_llama()
    today.load_state_dict(_base_state(model), strict=False)
    inject(today, TiedLoRAConfig(rank=4, preset="tl6", seed=5))
    load_adapter(today, tmp_path)
    assert torch.equal(today(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("preset", ["tl4", "tl6", "vera"])
def test_gpt2_round_trip_keeps_attention_and_mlp_kinds_apart(tmp_path, preset):
    model = trained(preset, family="gpt2")
    save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / ADAPTER_FILE), "pt") as f:
        keys = set(f.keys())
    if preset == "tl6":
        assert {"tiedlora.attn__c_proj.A", "tiedlora.mlp__c_proj.A"} <= keys
    else:  # the frozen random factors of the new kinds are rebuilt from the seed, not written
        assert not any(k.startswith("tiedlora.") and k.endswith(".A") for k in keys)
    fresh = tiny_gpt2()
    fresh.load_state_dict(_base_state(model), strict=False)
    load_adapter(fresh, tmp_path)
    assert {m.kind for _, m in adapted_layers(fresh)} == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def test_kinds_override_survives_save_and_load(tmp_path):
    kinds = {r"h\.0\.attn\.c_attn": "first_attn", "c_proj": "out"}
    model = trained("tl6", family="gpt2", kinds=kinds)
    save_adapter(model, tmp_path)
    fresh = tiny_gpt2()
    fresh.load_state_dict(_base_state(model), strict=False)
    load_adapter(fresh, tmp_path)
    assert {n: m.kind for n, m in adapted_layers(fresh)} == {n: m.kind for n, m in adapted_layers(model)}
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def test_per_layer_alphas_and_gamma_survive_save_and_load(tmp_path):
    alpha_pattern = {"q_proj": 2, r"^model\.layers\.1\.mlp\.down_proj": 24}
    model = trained("tl6", alpha=8, alpha_pattern=alpha_pattern, gamma=3.0)
    scaling = {n: m.scaling for n, m in adapted_layers(model)}
    assert scaling["model.layers.0.self_attn.q_proj"] == 2 / 4 * 3
    assert scaling["model.layers.1.mlp.down_proj"] == 24 / 4 * 3
    assert scaling["model.layers.0.mlp.down_proj"] == scaling["model.layers.1.self_attn.k_proj"] == 8 / 4 * 3
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["alpha_pattern"] == alpha_pattern
    fresh = tiny_llama()
    fresh.load_state_dict(_base_state(model), strict=False)
    load_adapter(fresh, tmp_path)
    assert {n: m.scaling for n, m in adapted_layers(fresh)} == scaling
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    other = tiny_llama()
    inject(other, TiedLoRAConfig(rank=4, preset="tl6", seed=5, alpha=8, gamma=3.0))
    with pytest.raises(ValueError, match="'alpha_pattern': \\({}, "):
        load_adapter(other, tmp_path)


@pytest.mark.parametrize("attr,value", [("scaling", 5.0), ("dropout", 0.25)])
def test_save_refuses_a_layer_that_its_config_would_not_rebuild(tmp_path, attr, value):
    """The file holds the config, not each layer's scaling: a layer changed by hand would load as
    another function, so it is refused at save time (issue 18's silent reload)."""
    model = trained("tl6")
    setattr(dict(adapted_layers(model))["model.layers.1.self_attn.v_proj"], attr, value)
    with pytest.raises(ValueError, match=f"layer 'model.layers.1.self_attn.v_proj' has {attr} {value}"):
        save_adapter(model, tmp_path)
    assert not (tmp_path / ADAPTER_FILE).exists()


def test_tensor_hyperparameters_come_back_as_tensors(tmp_path):
    """Adam with a tensor lr and betas: saved as numbers, restored in the optimizer's own form, and the
    next step runs (they came back as strings)."""
    model = trained("tl6")
    make = lambda m: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=torch.tensor(1e-3),  # noqa: E731
                                      betas=(torch.tensor(0.8), torch.tensor(0.9)))
    opt = make(model)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    save_adapter(model, tmp_path, optimizer=opt)
    fresh = load_adapter(base_of_trained(), tmp_path)
    opt2 = make(fresh)
    load_adapter(fresh, tmp_path, optimizer=opt2)
    g = opt2.param_groups[0]
    assert isinstance(g["lr"], torch.Tensor) and g["lr"].item() == pytest.approx(1e-3)
    assert all(isinstance(b, torch.Tensor) for b in g["betas"]) and g["betas"][0].item() == pytest.approx(0.8)
    fresh(IDS, labels=IDS).loss.backward()
    opt2.step()


def _step(model, opt):
    opt.zero_grad()
    model(IDS, labels=IDS).loss.backward()
    opt.step()


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, enough to build a real DistributedDataParallel on the CPU."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["compile", "ddp"])
def test_a_compiled_or_ddp_wrapped_model_saves_and_loads_as_the_plain_model(tmp_path, request, wrapper):
    """torch.compile and DDP hold the model as a submodule (_orig_mod, module): names read through them
    carried that prefix, so the file fitted no plain model. Saved and loaded through either, the files
    are the plain model's and a plain model resumes from them."""
    from torch.nn.parallel import DistributedDataParallel

    if wrapper == "ddp":
        request.getfixturevalue("process_group")
    wrap = {"compile": lambda m: torch.compile(m, backend="eager"), "ddp": DistributedDataParallel}[wrapper]
    model = trained("tl6")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _step(model, opt)
    save_adapter(model, tmp_path / "plain", optimizer=opt)
    save_adapter(wrap(model), tmp_path / "wrapped", optimizer=opt)
    for name in (ADAPTER_FILE, "optimizer.safetensors"):
        assert _keys(tmp_path / "wrapped" / name) == _keys(tmp_path / "plain" / name), name
    fresh = base_of_trained()
    load_adapter(fresh, tmp_path / "wrapped")
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    into = load_adapter(base_of_trained(), tmp_path / "plain")  # has adapters: DDP may wrap it
    opt2 = torch.optim.AdamW([p for p in into.parameters() if p.requires_grad], lr=1.0)
    wrapped = wrap(into)
    assert load_adapter(wrapped, tmp_path / "wrapped", optimizer=opt2) is wrapped
    _step(model, opt)
    _step(into, opt2)
    for (n, a), (_, b) in zip(model.named_parameters(), into.named_parameters()):
        assert torch.equal(a, b), n


def test_a_ddp_wrapped_model_without_adapters_is_refused(tmp_path, process_group):
    """inject under DDP adds parameters its reducer does not know: their gradients would never be
    averaged across ranks, so each rank would train its own adapter."""
    from torch.nn.parallel import DistributedDataParallel

    save_adapter(trained("tl6"), tmp_path)
    plain = base_of_trained()
    with pytest.raises(ValueError, match="wrapped in DistributedDataParallel and has no adapters"):
        load_adapter(DistributedDataParallel(plain), tmp_path)
    assert not hasattr(plain, "tiedlora")


def test_a_bitsandbytes_8bit_optimizer_saves_and_resumes_bit_for_bit(tmp_path):
    """bitsandbytes' 8-bit AdamW gives every parameter the same qmap1 / qmap2 tensors, which
    safetensors refused to write ("Some tensors share memory"): they are written as copies."""
    bnb = pytest.importorskip("bitsandbytes")

    def with_optimizer(model):
        # min_8bit_size=1: the tiny model's factors get 8-bit state too (the default needs 4096 elements)
        return model, bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                          min_8bit_size=1)

    model, opt = with_optimizer(trained("tl6"))
    for _ in range(2):
        _step(model, opt)
    states = list(opt.state.values())
    assert states[0]["qmap1"].data_ptr() == states[1]["qmap1"].data_ptr()  # shared: the case at hand
    save_adapter(model, tmp_path, optimizer=opt)
    resumed, opt2 = with_optimizer(load_adapter(base_of_trained(), tmp_path))
    load_adapter(resumed, tmp_path, optimizer=opt2)
    _step(model, opt)
    _step(resumed, opt2)
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_restored_optimizer_holds_exactly_the_files_state(tmp_path):
    """Rolling back to a checkpoint saved before the first step: the moments gathered since are dropped
    (they were kept, and the next step differed from a fresh resume's)."""
    model = trained("tl6")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    save_adapter(model, tmp_path, optimizer=opt)
    for _ in range(3):
        _step(model, opt)
    load_adapter(model, tmp_path, optimizer=opt)
    assert not opt.state
    fresh = load_adapter(base_of_trained(), tmp_path)
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    load_adapter(fresh, tmp_path, optimizer=opt2)
    _step(model, opt)
    _step(fresh, opt2)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("injected", [True, False])
def test_loading_into_tensors_on_the_meta_device_is_refused(tmp_path, injected):
    """Copying into a meta tensor does nothing: the load succeeded and loaded nothing. Refused, the
    model untouched; materialised (to_empty, base weights loaded), the same model loads the file."""
    source = trained("tl6")
    save_adapter(source, tmp_path)
    with torch.device("meta"):
        model = base_of_trained()
    if injected:
        inject(model, TiedLoRAConfig(rank=4, preset="tl6", seed=5))
    with pytest.raises(ValueError, match=r"load_adapter: model\.layers\.0\.self_attn\.q_proj\.weight is on the meta "
                                         r"device; materialise the model first \(model\.to_empty"):
        load_adapter(model, tmp_path)
    assert hasattr(model, "tiedlora") == injected
    model.to_empty(device="cpu")  # (rotary buffers too, left uninitialised: adapter tensors are compared)
    model.load_state_dict(_base_state(source), strict=False)
    load_adapter(model, tmp_path)
    loaded = dict(adapter_named_parameters(model))
    for name, t in adapter_named_parameters(source):
        assert torch.equal(loaded[name], t), name


def test_saving_warns_of_trained_parameters_outside_the_adapter(tmp_path):
    """A classifier head trained with the adapter is not in the file (the reloaded model computed
    another function, silently): a warning names it. Nothing trained outside the adapter: no warning."""
    import warnings

    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, num_labels=3))
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", seed=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path / "adapter_only")
    model.classifier.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"save_adapter: trained parameters outside the adapter are not saved: "
                                         r"\['classifier\.weight', 'classifier\.bias'\];"):
        save_adapter(model, tmp_path / "head")
    model.bert.embeddings.requires_grad_(True)  # 5 more tensors
    with pytest.warns(UserWarning, match=r"'bert\.embeddings\.token_type_embeddings\.weight'\] and 4 more;"):
        save_adapter(model, tmp_path / "more")


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_non_finite_adapter_or_optimizer_state_is_refused_before_anything_is_written(tmp_path):
    """A diverged adapter (NaN, inf) was written over a good checkpoint, which load_adapter then refused:
    save_adapter refuses it with load's own check, naming the tensor, and writes nothing, not even a directory."""
    model = trained("tl6")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    save_adapter(model, tmp_path / "good", optimizer=opt)
    before = _files(tmp_path / "good")
    with torch.no_grad():
        model.tiedlora["q_proj"].A[0, 0] = float("nan")
    for directory in (tmp_path / "good", tmp_path / "new"):
        with pytest.raises(ValueError, match=r"save_adapter: tensor 'tiedlora\.q_proj\.A' holds non-finite values"):
            save_adapter(model, directory, optimizer=opt)
    with torch.no_grad():
        model.tiedlora["q_proj"].A[0, 0] = 0.0
    opt.state[model.tiedlora["q_proj"].A]["exp_avg"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"save_adapter: optimizer state 'tiedlora\.q_proj\.A/exp_avg' holds "
                                         r"non-finite values"):
        save_adapter(model, tmp_path / "good", optimizer=opt)
    assert _files(tmp_path / "good") == before and not (tmp_path / "new").exists()
    load_adapter(base_of_trained(), tmp_path / "good")  # the good checkpoint is still there


def test_an_optimizer_holding_parameters_outside_the_model_is_refused(tmp_path):
    """An optimizer over parameters the model does not have raised a bare KeyError of an id."""
    model = trained("tl6")
    adapter = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([*adapter, torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 5))],
                          lr=0.1)
    with pytest.raises(ValueError, match=r"save_adapter: 2 of the optimizer's parameters are not parameters of the "
                                         r"model \(shapes \[\(3,\), \(2, 5\)\]\)"):
        save_adapter(model, tmp_path / "out", optimizer=opt)
    assert not (tmp_path / "out").exists()


def test_an_optimizer_with_other_parameter_groups_is_refused_naming_the_difference(tmp_path):
    """Groups built in another order (no-decay first) or another number of groups: refused, saying which
    group differs and how (the message named nothing: the user could not tell what to change)."""
    model = trained("tl6")
    factors = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("tiedlora.")]
    per_layer = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("tiedlora.")]
    opt = torch.optim.AdamW([{"params": factors}, {"params": per_layer, "weight_decay": 0.0}], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    save_adapter(model, tmp_path, optimizer=opt)
    for groups, message in (
            ([{"params": per_layer, "weight_decay": 0.0}, {"params": factors}],
             r"group 0 holds \d+ parameters \['model\.layers\.0\..*', \.\.\.\], the saved one \d+ "
             r"\['tiedlora\..*build its parameter groups as they were saved"),
            ([{"params": factors + per_layer}], r"it has 1 parameter groups, the saved optimizer 2")):
        with pytest.raises(ValueError, match=message):
            load_adapter(model, tmp_path, optimizer=torch.optim.AdamW(groups, lr=1e-2))


@pytest.mark.parametrize("directory", [None, 5], ids=["None", "int"])
def test_a_directory_that_is_no_path_is_refused_naming_it(directory):
    for op, call in (("save_adapter", lambda: save_adapter(trained("tl6"), directory)),
                     ("load_adapter", lambda: load_adapter(tiny_llama(), directory))):
        with pytest.raises(TypeError, match=rf"{op}: directory must be a path \(str or os.PathLike\), got "
                                            rf"{type(directory).__name__}"):
            call()
