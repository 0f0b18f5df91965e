"""inject / merge / unmerge on real transformers models built from configs."""

import copy
import gc
import re
import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.utils.checkpoint

from helpers import randomize_adapters, rel_err, tiny_gpt2, tiny_llama
from tiedlora_kernels import (PRESETS, TiedLoRAConfig, TiedLoRALinear, adapted_layers, adapter_named_parameters,
                              inject, merge, trainable_parameters, unmerge)

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["dora", "simple_dora", "tl6"])
def test_inject_starts_as_identity_on_a_16_bit_model(preset, dtype):
    """DoRA's row scale m / ||W + dW||_row is exactly 1 at init on a bf16 / fp16 model too: m and the
    norm come from the same unrounded fp32 row norm (a norm rounded to the weight's dtype moved
    the logits by ~2e-3)."""
    model = tiny_llama().to(dtype)
    before = model(IDS).logits
    inject(model, TiedLoRAConfig(rank=4, preset=preset))
    assert torch.equal(model(IDS).logits, before)


def test_exclude_modules_applies_to_every_form_of_target_modules():
    """A list of targets is filtered by exclude_modules as "all-linear" and a regex are (PEFT's rule);
    a listed name that only excluded layers match is refused, not silently dropped."""
    for target in (["q_proj", "v_proj"], r".*\.(q|v)_proj", "all-linear"):
        model = tiny_llama(n_layer=2)
        inject(model, TiedLoRAConfig(rank=2, target_modules=target, exclude_modules=["layers.0.self_attn.q_proj"]))
        names = {n for n, _ in adapted_layers(model)}
        assert "model.layers.0.self_attn.q_proj" not in names and "model.layers.1.self_attn.q_proj" in names
    with pytest.raises(ValueError, match=r"entry 'lm_head' matches only layers that exclude_modules="):
        inject(tiny_llama(), TiedLoRAConfig(rank=2, target_modules=["q_proj", "lm_head"]))
    model = tiny_llama()
    inject(model, TiedLoRAConfig(rank=2, target_modules=["q_proj", "lm_head"], exclude_modules=[]))
    assert isinstance(model.lm_head, TiedLoRALinear)


def _tiny_bert_family(cls_name, **kw):
    import transformers
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, **kw)
    if cls_name.startswith("Roberta"):
        config = transformers.RobertaConfig(**config.to_dict())
    if cls_name.startswith("Electra"):
        config = transformers.ElectraConfig(**{**config.to_dict(), "embedding_size": 32})
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config)


@pytest.mark.parametrize("cls_name,heads", [
    ("BertForMaskedLM", ["cls.predictions.transform.dense", "cls.predictions.decoder"]),
    ("BertForPreTraining", ["cls.predictions.decoder", "cls.seq_relationship"]),
    ("RobertaForSequenceClassification", ["classifier.dense", "classifier.out_proj"]),
    ("BertForQuestionAnswering", ["qa_outputs"]),
    ("ElectraForMaskedLM", ["generator_lm_head"]),  # left out only as get_output_embeddings()
])
def test_all_linear_leaves_output_and_task_heads_alone(cls_name, heads, tmp_path):
    """"all-linear" used to adapt BERT's tied MLM decoder (merge then refused it, DoRA made its zero
    padding row NaN) and the layers inside a head module (a 2-label classifier.out_proj crashed at
    rank 4)."""
    from tiedlora_kernels import load_adapter, save_adapter

    model = _tiny_bert_family(cls_name)
    inject(model, TiedLoRAConfig(rank=4, preset="dora"))
    names = {n for n, _ in adapted_layers(model)}
    assert any(".layer.0." in n for n in names)  # the encoder is adapted
    assert not names & set(heads), names & set(heads)
    model.eval()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(model(ids)[0]).all()
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(_tiny_bert_family(cls_name).eval(), tmp_path / "a")
    assert {n for n, _ in adapted_layers(fresh)} == names
    assert torch.equal(fresh(ids)[0], model(ids)[0])


def _tiny(config_cls, model_cls, **kw):
    import transformers
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()


_MOE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.mark.parametrize("make,left_out", [
    (lambda: _tiny_bert_family("ElectraForPreTraining"), ["discriminator_predictions.dense_prediction"]),
    (lambda: _tiny("GPT2Config", "GPT2DoubleHeadsModel", vocab_size=97, n_embd=32, n_layer=1, n_head=4),
     ["multiple_choice_head.summary"]),
    (lambda: _tiny("XLNetConfig", "XLNetForSequenceClassification", vocab_size=97, d_model=32, n_layer=1, n_head=4,
                   d_inner=48, num_labels=2), ["sequence_summary.summary", "logits_proj"]),
    (lambda: _tiny("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_MOE, moe_intermediate_size=16,
                   shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2),
     ["model.layers.0.mlp.shared_expert_gate"]),
    (lambda: _tiny("PhimoeConfig", "PhimoeForCausalLM", **_MOE, num_local_experts=16), ["model.layers.0.mlp.router"]),
    (lambda: _tiny("JetMoeConfig", "JetMoeForCausalLM", **_MOE, num_local_experts=8, kv_channels=8),
     ["model.layers.0.mlp.router.layer", "model.layers.0.self_attention.experts.router.layer"]),
    (lambda: _tiny("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", **_MOE, num_experts=4, moe_topk=2, head_dim=8),
     ["model.layers.0.mlp.gate.wg"]),
    (lambda: _tiny("DogeConfig", "DogeForCausalLM", **{**_MOE, "num_attention_heads": 8, "num_key_value_heads": 8},
                   is_moe=True, num_experts=16, num_experts_per_tok=2),
     ["model.layers.0.mlp.router_gate"]),
    (lambda: _tiny("EsmConfig", "EsmForMaskedLM", vocab_size=33, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=48, max_position_embeddings=64, pad_token_id=1),
     ["esm.contact_head.regression"]),
], ids=["electra-discriminator", "gpt2-multiple-choice", "xlnet-summary", "qwen2moe-shared-gate", "phimoe-router",
        "jetmoe-routers", "hunyuan-moe-gate", "doge-router-gate", "esm-contact-head"])
def test_all_linear_leaves_task_heads_and_routers_alone(make, left_out):
    """These heads and routers used to be adapted: a 1- or 2-output head crashed at rank 8, a router was
    silently adapted (changing which experts see a token). The model's linear shell (what a bank reads
    files into, and load_adapter checks a file against) has the same targets: it lost the router's
    class (HunYuan's gate), so a bank refused every HunYuan-MoE adapter."""
    from tiedlora_kernels.integrations.inject import find_targets
    from tiedlora_kernels.integrations.shell import linear_shell

    config = TiedLoRAConfig(rank=8, preset="tl6")
    model = make()
    in_shell = {t.name for t in find_targets(linear_shell(model, meta=True), config)}
    inject(model, config)
    names = {n for n, _ in adapted_layers(model)}
    assert names  # the body is adapted
    assert not names & set(left_out), names & set(left_out)
    assert in_shell == names


def test_all_linear_keeps_the_gate_projection_and_expert_layers_of_a_moe_model():
    """The routers' names do not catch ordinary layers: LLaMA-style gate_proj and the experts stay adapted."""
    model = _tiny("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_MOE, moe_intermediate_size=16,
                  shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    names = {n for n, _ in adapted_layers(model)}
    assert {"model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.down_proj"} <= names


def test_a_file_saved_under_the_older_default_heads_loads_with_the_layers_it_was_saved_with(tmp_path):
    """Files saved before the routers joined the default exclude_modules (format 3, rule "module")
    list the older names in their config, so they load into the layers they adapted: the routers."""
    from tiedlora_kernels import load_adapter, save_adapter

    older = ["lm_head", "score", "classifier", "classification_head", "qa_outputs", "cls"]
    make = lambda: _tiny("JetMoeConfig", "JetMoeForCausalLM", **_MOE, num_local_experts=8, kv_channels=8)  # noqa: E731
    model = inject(make(), TiedLoRAConfig(rank=4, preset="tl6", exclude_modules=older, exclude_rule="module"))
    names = {n for n, _ in adapted_layers(model)}
    assert "model.layers.0.mlp.router.layer" in names
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(make(), tmp_path / "a")
    assert {n for n, _ in adapted_layers(fresh)} == names
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def _tiny_musicgen():
    return _tiny("MusicgenDecoderConfig", "MusicgenForCausalLM", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=4, ffn_dim=48, num_codebooks=4)


def test_all_linear_leaves_out_every_layer_of_an_output_head_container():
    """MusicGen's get_output_embeddings() is a ModuleList of per-codebook heads: none of them is adapted
    (under the "module" rule of older files each was)."""
    model = inject(_tiny_musicgen(), TiedLoRAConfig(rank=4, preset="tl6"))
    names = {n for n, _ in adapted_layers(model)}
    assert any(n.endswith("self_attn.q_proj") for n in names)
    assert not [n for n in names if n.startswith("lm_heads.")]
    older = inject(_tiny_musicgen(), TiedLoRAConfig(rank=4, preset="tl6", exclude_rule="module"))
    assert {f"lm_heads.{i}" for i in range(4)} <= {n for n, _ in adapted_layers(older)}


def _tiny_siglip():
    return _tiny("SiglipVisionConfig", "SiglipVisionModel", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=48, image_size=16, patch_size=8)


def test_the_out_proj_of_a_torch_multihead_attention_is_left_out_or_refused():
    """nn.MultiheadAttention reads out_proj.weight directly and never calls out_proj: an adapter there got
    no gradient and changed nothing, and merge() then changed the output. "all-linear" leaves it out; a
    list or regex that selects it is refused, naming it."""
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    model = inject(_tiny_siglip(), TiedLoRAConfig(rank=4, preset="lora"))
    names = {n for n, _ in adapted_layers(model)}
    assert "encoder.layers.0.self_attn.out_proj" in names and "head.attention.out_proj" not in names
    randomize_adapters(model)
    adapted = model(pixel_values=pixels).pooler_output
    merge(model)
    assert rel_err(model(pixel_values=pixels).pooler_output, adapted) < 1e-5
    for target in (["out_proj"], r".*out_proj"):
        with pytest.raises(ValueError, match=r"selects layer 'head\.attention\.out_proj', whose parent "
                                             r"MultiheadAttention reads its weight and bias directly"):
            inject(_tiny_siglip(), TiedLoRAConfig(rank=4, target_modules=target))
    model = inject(_tiny_siglip(), TiedLoRAConfig(rank=4, target_modules=["out_proj"], exclude_modules=["head"]))
    assert {n for n, _ in adapted_layers(model)} == {"encoder.layers.0.self_attn.out_proj"}


@pytest.mark.parametrize("make,read", [
    (lambda: _tiny("WavLMConfig", "WavLMModel", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                   num_attention_heads=4, conv_dim=(16, 16), conv_stride=(4, 2), conv_kernel=(8, 4),
                   num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, num_buckets=8, max_bucket_distance=16),
     ["encoder.layers.0.attention.q_proj", "encoder.layers.0.attention.out_proj"]),
    (lambda: _tiny("MambaConfig", "MambaForCausalLM", hidden_size=32, num_hidden_layers=1, vocab_size=64, state_size=4,
                   expand=2, time_step_rank=4, use_mambapy=False),
     ["backbone.layers.0.mixer.dt_proj", "backbone.layers.0.mixer.x_proj", "backbone.layers.0.mixer.out_proj"]),
    (lambda: _tiny("Mamba2Config", "Mamba2ForCausalLM", hidden_size=32, num_hidden_layers=1, vocab_size=64,
                   state_size=4, expand=2, num_heads=4, head_dim=16, n_groups=1, chunk_size=8),
     ["backbone.layers.0.mixer.out_proj"]),
    (lambda: _tiny("NeoMMEConfig", "NeoMMEForMaskedLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, embedding_rank=16),
     ["unembedding_projection"]),
], ids=["wavlm-attention", "mamba-mixer", "mamba2-mixer", "neomme-unembedding"])
def test_layers_a_transformers_parent_reads_directly_are_left_out_or_refused(make, read):
    """WavLM's attention passes q/k/v/out_proj's weights to F.multi_head_attention_forward; a Mamba mixer
    multiplies by dt_proj.weight (and mamba-ssm's CUDA kernels take x_proj and out_proj's too; a Mamba-2
    mixer's, out_proj's); NeoMME's masked LM multiplies by unembedding_projection.weight: adapters
    there got no gradient and changed nothing, and merge() then changed the output. "all-linear" leaves
    them out; naming one is refused."""
    model = inject(make(), TiedLoRAConfig(rank=2, preset="lora"))
    names = {n for n, _ in adapted_layers(model)}
    assert names and not names & set(read)
    with pytest.raises(ValueError, match=f"selects layer '{re.escape(read[0])}', whose parent .* reads its weight"):
        inject(make(), TiedLoRAConfig(rank=2, target_modules=[read[0].rsplit(".", 1)[-1]]))


def test_the_feed_forward_of_a_torch_transformer_encoder_layer_is_left_out():
    """nn.TransformerEncoderLayer's inference fast path (eval, batch_first) reads linear1 / linear2's
    weights without calling them: an adapter there trained, then changed nothing in eval. "all-linear"
    leaves them out (and its attention's out_proj), naming them is refused."""

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 16)
            self.layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)

        def forward(self, x):
            return self.layer(self.proj(x))

    torch.manual_seed(0)
    model = inject(Encoder(), TiedLoRAConfig(rank=2, preset="lora"))
    assert {n for n, _ in adapted_layers(model)} == {"proj"}
    with pytest.raises(ValueError, match=r"selects layer 'layer\.linear1', whose parent TransformerEncoderLayer"):
        inject(Encoder(), TiedLoRAConfig(rank=2, target_modules=["linear1"]))


def test_a_linear_root_is_refused_before_anything_changes():
    """A bare nn.Linear as the root would have to replace itself: refused, its flags unchanged (a
    KeyError came after every parameter was frozen)."""
    root = torch.nn.Linear(8, 8)
    with pytest.raises(TypeError, match=r"the root is itself a layer to adapt \(Linear\); wrap it"):
        inject(root, TiedLoRAConfig(rank=2))
    assert all(p.requires_grad for p in root.parameters())


def test_misspelt_pattern_keys_are_warned_of():
    """An alpha_pattern or kinds key that matches no adapted layer changes nothing, silently: warned."""
    with pytest.warns(UserWarning, match=r"alpha_pattern keys \['q_porj'\] match no adapted layer"):
        inject(tiny_llama(), TiedLoRAConfig(rank=4, alpha_pattern={"q_porj": 16}))
    with pytest.warns(UserWarning, match=r"kinds keys \['v_porj'\] match no adapted layer"):
        inject(tiny_llama(), TiedLoRAConfig(rank=4, kinds={"v_porj": "value"}))


def test_merge_refuses_a_non_finite_adapter_leaving_every_weight_as_it_was():
    """NaN or inf folded into a base weight cannot be taken out by unmerge: refused before any layer merges."""
    model = inject(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6"))
    randomize_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.tiedlora["v_proj"].A[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"merge: adapter tensor 'tiedlora\.v_proj\.A' holds non-finite values"):
        merge(model)
    assert not any(layer.merged for _, layer in adapted_layers(model))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "tiedlora" not in n)


def _three_linears():
    model = torch.nn.Module()
    model.a, model.b, model.proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
    model.proj.bias.requires_grad_(False)  # the flags must come back as they were, not all True
    return model


@pytest.mark.parametrize("kw,msg", [
    (dict(kinds={"proj": "config"}), "is a reserved name"),
    (dict(kinds={"a": "x.y", "b": "x__y"}), "would share the factors"),
    (dict(rank=4), "rank=4 is larger than layer 'proj'"),
    (dict(target_modules=["a", "missing"]), "matches no nn.Linear"),
], ids=["reserved-kind", "shared-group", "rank", "no-match"])
def test_a_refused_inject_leaves_the_model_as_it_was(kw, msg):
    """inject used to freeze every parameter before its kind checks: a refused inject left the model frozen."""
    model = _three_linears()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=msg):
        inject(model, TiedLoRAConfig(**{"rank": 2, "preset": "tl6", **kw}))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == types and not hasattr(model, "tiedlora")


def test_an_excluded_name_excludes_the_layers_inside_it_and_explicit_targets_still_work():
    model = tiny_llama(n_layer=2)
    inject(model, TiedLoRAConfig(rank=2, exclude_modules=["layers.0.mlp", "self_attn"]))
    names = {n for n, _ in adapted_layers(model)}
    assert names == {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    with pytest.raises(ValueError, match=r"target_modules='lm_head' matches only layers that exclude_modules="):
        inject(tiny_llama(), TiedLoRAConfig(rank=2, target_modules="lm_head"))


def test_inject_keeps_its_own_copy_of_the_config():
    """A config reused in a sweep and changed afterwards must not change an injected model's; a field
    set after construction is checked by the next inject."""
    from tiedlora_kernels.integrations.inject import adapter_config

    cfg = TiedLoRAConfig(rank=2, alpha=4.0, target_modules=["q_proj"])
    model = inject(tiny_llama(), cfg)
    cfg.alpha = 16.0
    assert adapter_config(model).alpha == 4.0
    cfg.dropout = 5.0
    with pytest.raises(ValueError, match="dropout"):
        inject(tiny_llama(), cfg)


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


def test_all_linear_over_a_model_whose_only_linear_is_its_head_says_so():
    """ResNet's only linear layer is its classifier: the error said all-linear matched nothing and that
    the available names were ['1']."""
    def resnet():
        return _tiny("ResNetConfig", "ResNetForImageClassification", embedding_size=8, hidden_sizes=[8, 16],
                     depths=[1, 1], num_labels=3)

    with pytest.raises(ValueError, match=r"'all-linear' leaves out output and task heads, routers and layers read by "
                                         r"their parent, and ResNetForImageClassification has no other nn.Linear / "
                                         r"Conv1D: its linear layers are \['classifier.1'\]"):
        inject(resnet(), TiedLoRAConfig(rank=2))
    model = inject(resnet(), TiedLoRAConfig(rank=2, target_modules=["classifier.1"], exclude_modules=[]))
    assert [n for n, _ in adapted_layers(model)] == ["classifier.1"]


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
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 6)}),
                                        torch.nn.ModuleDict({"proj": torch.nn.Linear(6, 10)})])
    inject(model, TiedLoRAConfig(rank=2, preset="tl6", target_modules=["proj"]))
    f = model.tiedlora["proj"]
    assert tuple(f.A.shape) == (2, 8) and tuple(f.B.shape) == (10, 2)
    randomize_adapters(model)
    x = torch.randn(3, 6)
    y = model.layers[1]["proj"](x)
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


def test_merge_refuses_a_weight_tied_to_another_module():
    """Tied input/output embeddings with lm_head adapted: the adapter applies to lm_head's output only,
    and merging (which would add it to the embedding too) is refused before any layer changes."""
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", target_modules=["q_proj", "lm_head"], exclude_modules=[]))
    randomize_adapters(model)
    embedding = model.model.embed_tokens.weight.detach().clone()
    logits = model(IDS).logits
    with pytest.raises(ValueError, match=r"layer 'lm_head' shares its weight with \['model.embed_tokens.weight'\]"):
        merge(model)
    assert not any(m.merged for _, m in adapted_layers(model))
    assert torch.equal(model.model.embed_tokens.weight, embedding) and torch.equal(model(IDS).logits, logits)


@pytest.mark.parametrize("preset", ["lora", "dora", "simple_dora"])
def test_merge_rounds_the_weight_once(preset):
    """merge stores c * (W + dW) computed wide and rounded to bf16 once (rounding W + dW first, then
    the product, differed by an ulp in ~25 % of a DoRA layer's entries)."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=64).to(torch.bfloat16)
    inject(model, TiedLoRAConfig(rank=4, preset=preset, target_modules=["q_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        for _, m in adapted_layers(model):
            if m.adapter_m is not None:  # c far from 1, so that its product rounds
                m.adapter_m.mul_(1 + 0.3 * torch.randn_like(m.adapter_m))
    once = {}
    for n, m in adapted_layers(model):
        A, B, u, v, c = (t if t is None else t.detach().double() for t in m.op_tensors())
        dW = m.scaling * (B * (u if u is not None else 1) * (v[:, None] if v is not None else 1)) @ A
        once[n] = ((m.weight.double() + dW) * (c[:, None] if c is not None else 1)).to(torch.bfloat16)
    merge(model)
    for n, m in adapted_layers(model):
        assert (m.weight == once[n]).float().mean() > 0.999, n


@pytest.mark.parametrize("preset", ["dora", "simple_dora"])
def test_what_unmerge_needs_survives_a_dtype_change_of_the_merged_model(preset):
    """The row scale c (and Simple DoRA's original norm) that unmerge divides by stay in fp32 when the
    merged model is cast (as buffers they were rounded to bf16, ~2e-3 per row on the restored weight)."""
    model = tiny_llama()
    inject(model, TiedLoRAConfig(rank=4, preset=preset))
    randomize_adapters(model)
    merge(model)
    kept = {n: (m._merged_row_scale.clone(), getattr(m, "_merged_base_norm", None)) for n, m in adapted_layers(model)}
    model.to(torch.bfloat16)
    for n, m in adapted_layers(model):
        assert m._merged_row_scale.dtype == torch.float32 and torch.equal(m._merged_row_scale, kept[n][0])
        if preset == "simple_dora":
            assert torch.equal(m._merged_base_norm, kept[n][1])
    unmerge(model)
    assert not any(hasattr(m, "_merged_row_scale") for _, m in adapted_layers(model))


def test_a_merged_model_warns_when_it_would_train():
    """Training through merged layers silently gives the adapter no gradient: warned, once per call
    site; evaluation (eval mode or no grad) is silent."""
    model = tiny_llama()
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    merge(model)
    model.train()
    with pytest.warns(UserWarning, match="merged layer runs in training mode"):
        model(IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()
        model(IDS)
        model.train()
        with torch.no_grad():
            model(IDS)


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


@pytest.mark.parametrize("adapter_dtype,reentrant,layers", [
    ("bfloat16", True, "all"), ("bfloat16", True, "some"), ("bfloat16", False, "all"), ("bfloat16", False, "some"),
    ("float32", True, "all")])
def test_reentrant_checkpointing_of_bf16_tied_factors_warns(adapter_dtype, reentrant, layers):
    """Reentrant checkpointing runs each segment's backward on its own, so a bf16 tied factor's
    gradient is summed in bf16 over segments: warned, also when only some blocks are checkpointed
    (the others' forward casts the factor with grad). Non-reentrant keeps the fp32 sum, bit for bit."""
    import warnings

    model = tiny_llama(n_layer=3)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype=adapter_dtype))
    randomize_adapters(model)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if layers == "some":
        model.model.layers[1].gradient_checkpointing = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(IDS, labels=IDS).loss.backward()
    warned = [w for w in caught if "reentrant activation checkpointing" in str(w.message)]
    assert bool(warned) == (adapter_dtype == "bfloat16" and reentrant)
    if not warned:
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert rel_err(p.grad, ref[n]) < (1e-6 if adapter_dtype == "float32" else 1e-9), n


def test_checkpoint_around_the_whole_model_keeps_the_fp32_sum_without_warning():
    """A non-reentrant checkpoint around the whole injected model recomputes it, root pre-hook
    included, inside the backward: the forward's shared casts stay (the backward still adds into
    them), so the bf16 factor's gradient is the un-checkpointed fp32 sum and nothing warns."""
    model = tiny_llama(n_layer=3)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype="bfloat16", target_modules=["q_proj"]))
    randomize_adapters(model)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    want = model.tiedlora["q_proj"].A.grad.clone()
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.utils.checkpoint.checkpoint(lambda ids: model(ids, labels=ids).loss, IDS, use_reentrant=False).backward()
    assert not [w for w in caught if "reentrant" in str(w.message)]
    assert torch.equal(model.tiedlora["q_proj"].A.grad, want)


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


def test_training_registers_no_global_hook():
    """No global state: importing the package and training bf16 tied factors (whose shared fp32 casts
    live only during a forward pass) register no global optimizer or module hook."""
    import subprocess
    import sys

    code = ("import torch, torch.optim.optimizer as o, torch.nn.modules.module as mm, tiedlora_kernels as tk; "
            "m = torch.nn.Module(); m.a, m.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8); "
            "tk.inject(m, tk.TiedLoRAConfig(rank=2, preset='tl6', adapter_dtype='bfloat16', kinds={'a|b': 'k'})); "
            "opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]); "
            "m.b(m.a(torch.randn(3, 8))).sum().backward(); opt.step(); "
            "print(len(o._global_optimizer_post_hooks) + len(mm._global_forward_pre_hooks) "
            "+ len(mm._global_forward_hooks))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("preset,tied", [("tl6", "A"), ("tensor_embed", "core_bank")])
def test_bf16_tied_gradients_are_summed_in_fp32(preset, tied):
    """bf16 tied factors (A; tensor embedding's LM bank): the per-layer gradients are added in fp32 and
    rounded once, so the gradient is the exact sum correctly rounded to bf16 almost everywhere (a bf16
    running sum: about half the entries)."""
    torch.manual_seed(0)
    model = tiny_llama(n_layer=8, hidden=64)
    inject(model, TiedLoRAConfig(rank=8, preset=preset, adapter_dtype="bfloat16", target_modules=["q_proj"]))
    randomize_adapters(model)
    model(IDS, labels=IDS).loss.backward()
    grad = getattr(model.tiedlora["q_proj"], tied).grad
    assert grad.dtype == torch.bfloat16
    # The exact sum, from a float64 copy of the same model (same bf16 values, computed in fp64).
    ref = copy.deepcopy(model).double()
    for p in ref.parameters():
        p.grad = None
    ref(IDS, labels=IDS).loss.backward()
    exact = getattr(ref.tiedlora["q_proj"], tied).grad
    assert (grad == exact.to(torch.bfloat16)).float().mean() > 0.95
    copy.deepcopy(model)  # the shared fp32 casts are not part of the module's state


def _flow_gradient(model, flow):
    """The gradient of the trained tied factor A of kind q_proj, from one training flow."""
    from torch.func import functional_call

    key = "tiedlora.q_proj.A"
    if flow == "root":
        model(IDS, labels=IDS).loss.backward()
    elif flow == "model.forward":  # a wrapper calling forward, not the module (PEFT's BaseTuner)
        model.forward(IDS, labels=IDS).loss.backward()
    elif flow == "submodule":  # model.model and a head of one's own (CLIP's get_text_features, likewise)
        logits = model.lm_head(model.model(IDS).last_hidden_state)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                          IDS[:, 1:].reshape(-1)).backward()
    elif flow == "fast_weights":  # MAML-style non-leaf weights through functional_call
        fast = {k: (v * 1 if v.requires_grad else v) for k, v in model.named_parameters()}
        return torch.autograd.grad(functional_call(model, fast, (IDS,), {"labels": IDS}).loss, fast[key])[0]
    elif flow == "torch.func.grad":
        params = {k: v.detach() for k, v in model.named_parameters()}
        return torch.func.grad(lambda p: functional_call(model, {**params, **p}, (IDS,), {"labels": IDS}).loss)(
            {key: params[key]})[key]
    elif flow == "dpo":  # the policy's checkpointed forward, a reference forward under no_grad, then backward
        model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(IDS, labels=IDS).loss
        with torch.no_grad():
            model(IDS)
        loss.backward()
    return model.tiedlora["q_proj"].A.grad


@pytest.mark.parametrize("flow", ["root", "model.forward", "submodule", "fast_weights", "torch.func.grad", "dpo"])
def test_bf16_tied_gradients_are_summed_in_fp32_in_every_training_flow(flow):
    """The shared fp32 cast is made by the outermost of the model's entry points running (the root, and
    any module holding adapted layers outside its blocks: model.model, an encoder), so the fp32 sum
    holds when a wrapper calls forward() or a submodule directly, with functional_call's fast weights
    and under torch.func; a no-grad reference forward between (DPO) neither breaks it nor warns."""
    torch.manual_seed(0)
    model = tiny_llama(n_layer=8, hidden=64)
    inject(model, TiedLoRAConfig(rank=8, preset="tl5", adapter_dtype="bfloat16", target_modules=["q_proj"]))
    randomize_adapters(model)
    ref = copy.deepcopy(model).double()
    ref(IDS, labels=IDS).loss.backward()
    exact = ref.tiedlora["q_proj"].A.grad.to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad = _flow_gradient(model, flow)
    assert (grad == exact).float().mean() > 0.95
    assert not [w for w in caught if "TiedFactors" in str(w.message)]


@pytest.mark.parametrize("kind_rule", ["path", "last"])
def test_encoder_decoder_bf16_tied_gradients_under_checkpointing(kind_rule):
    """T5: the decoder's call runs inside the model's and shares its pass (a nested entry point that
    started a pass of its own split one call's sum into parts rounded apart, with the encoder and
    decoder tied as one kind, kind_rule="last"); non-reentrant checkpointing warns of nothing (the
    decoder's start used to forget that the encoder's layers ran with grad)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=97, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_decoder_layers=4, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0))
    inject(model, TiedLoRAConfig(rank=8, preset="tl5", adapter_dtype="bfloat16", target_modules=["wi"],
                                 kind_rule=kind_rule))
    randomize_adapters(model)
    ref = copy.deepcopy(model).double()
    ref(input_ids=IDS, labels=IDS).loss.backward()
    model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=IDS, labels=IDS).loss.backward()
    assert not [w for w in caught if "TiedFactors" in str(w.message)]
    for name, factors in model.tiedlora.items():
        exact = ref.tiedlora[name].A.grad.to(torch.bfloat16)
        assert (factors.A.grad == exact).float().mean() > 0.95, name


def test_an_in_place_write_during_the_pass_is_seen_by_the_layers():
    """A write into a tied factor after the pass made its cast (a forward pre-hook of the user's
    registered after inject, an inner training loop): the layers use the factor as it is now."""
    torch.manual_seed(0)
    model = tiny_llama(n_layer=2)
    inject(model, TiedLoRAConfig(rank=4, preset="tl5", adapter_dtype="bfloat16", target_modules=["q_proj"]))
    randomize_adapters(model)
    want = copy.deepcopy(model)
    with torch.no_grad():
        want.tiedlora["q_proj"].A.mul_(3)

    def triple(module, args):  # runs after inject's pre-hooks, which have made the pass's cast
        with torch.no_grad():
            model.tiedlora["q_proj"].A.mul_(3)

    model.model.register_forward_pre_hook(triple)
    assert torch.equal(model(IDS).logits, want(IDS).logits)


def test_a_forward_that_raises_ends_its_pass():
    """The post-hooks of a forward that raised run in nn.Module's except branch, not in the frame
    the pre-hooks ran in: the pass must end all the same (it held the failed batch's casts and the
    call's inputs until the next forward, through an out-of-memory retry loop)."""
    import weakref

    torch.manual_seed(0)
    model = tiny_llama(n_layer=2)
    inject(model, TiedLoRAConfig(rank=4, preset="tl5", adapter_dtype="bfloat16", target_modules=["q_proj"]))

    def fail(module, args, output):
        raise RuntimeError("out of memory (simulated)")

    handle = model.model.layers[1].register_forward_hook(fail)
    ids = IDS.clone()
    alive = weakref.ref(ids)
    with pytest.raises(RuntimeError, match="simulated"):
        model(ids, labels=ids)
    handle.remove()
    del ids
    assert model.tiedlora._pass_frame is None and not model.tiedlora["q_proj"]._fp32_views
    gc.collect()
    assert alive() is None


def test_a_forward_interrupted_by_ctrl_c_leaves_no_stale_cast():
    """KeyboardInterrupt skips the forward post-hooks (nn.Module runs always_call hooks only on an
    Exception): the next pass must still cast the factors as the optimizer left them, so training
    goes on exactly as in a model never interrupted (a pass counter left stuck froze the factors)."""

    def build():
        torch.manual_seed(0)
        model = tiny_llama(n_layer=2)
        inject(model, TiedLoRAConfig(rank=4, preset="tl5", adapter_dtype="bfloat16", target_modules=["q_proj"]))
        randomize_adapters(model)
        return model

    interrupted, reference = build(), build()
    handle = interrupted.model.layers[1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        interrupted(IDS, labels=IDS)
    handle.remove()
    losses = {}
    for name, model in (("interrupted", interrupted), ("reference", reference)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        losses[name] = []
        for _ in range(3):
            loss = model(IDS, labels=IDS).loss
            losses[name].append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert losses["interrupted"] == losses["reference"] and losses["reference"][0] != losses["reference"][-1]


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_a_parametrized_tied_factor_trains(adapter_dtype):
    """A parametrization on a tied factor makes it a computed tensor: the fp32-cast machinery hooked
    every trained factor and crashed ("post accumulate grad hooks cannot be registered on non-leaf
    tensors"), even for fp32 factors, which need no cast."""
    import torch.nn.utils.parametrize as parametrize

    class Doubled(torch.nn.Module):
        def forward(self, A):
            return 2 * A

    models = []
    for doubled in (True, False):
        torch.manual_seed(0)
        model = tiny_llama(n_layer=3)
        inject(model, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype=adapter_dtype, target_modules=["q_proj"]))
        randomize_adapters(model)
        if doubled:
            parametrize.register_parametrization(model.tiedlora["q_proj"], "A", Doubled())
        else:
            model.tiedlora["q_proj"].A.data.mul_(2)
        model(IDS, labels=IDS).loss.backward()
        models.append(model)
    grad = models[0].tiedlora["q_proj"].parametrizations.A.original.grad
    want = 2 * models[1].tiedlora["q_proj"].A.grad
    assert rel_err(grad.float(), want.float()) < (1e-6 if adapter_dtype == "float32" else 1e-2)


def test_torch_func_grad_through_bf16_tied_factors():
    """torch.func.grad over functional_call: the fp32 cast's cache key read the data pointer of a
    functorch-wrapped tensor ("Cannot access data pointer of Tensor that doesn't have storage")."""
    torch.manual_seed(0)
    model = tiny_llama(n_layer=2)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype="bfloat16", target_modules=["q_proj"]))
    randomize_adapters(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(ps):
        return torch.func.functional_call(model, ps, (IDS,), {"labels": IDS}).loss

    grads = torch.func.grad(loss)(params)
    model(IDS, labels=IDS).loss.backward()
    for n, p in params.items():
        assert rel_err(grads[n].float(), p.grad.float()) < 2e-2, n


@pytest.mark.parametrize("write", ["data.add_", "data.copy_"])
def test_bf16_tied_factor_written_through_data_is_seen_by_a_submodule_call(write):
    """A submodule called directly (no root pre-hook) after its bf16 tied factor was written through
    ``.data`` (a hand-written update, weight averaging: neither moves the version nor the storage):
    the shared fp32 cast is dropped once its gradient has accumulated, so the next call sees the write."""
    torch.manual_seed(0)
    model = tiny_llama(n_layer=2)
    inject(model, TiedLoRAConfig(rank=4, preset="tl5", adapter_dtype="bfloat16", target_modules=["q_proj"]))
    randomize_adapters(model)
    model.model(IDS).last_hidden_state.square().mean().backward()
    A = model.tiedlora["q_proj"].A
    with torch.no_grad():
        (A.data.add_(0.25) if write == "data.add_" else A.data.copy_(torch.randn_like(A)))
    fresh = copy.deepcopy(model)  # with grad enabled: the trained factor goes through its fp32 cast
    assert torch.equal(model.model(IDS).last_hidden_state, fresh.model(IDS).last_hidden_state)


@pytest.mark.parametrize("after_inject", ["nothing", "to_bf16", "load_state_dict_assign", "unfreeze_A"])
def test_compiled_submodule_with_bf16_tied_factors_trains_like_eager(after_inject):
    """torch.compile of a submodule (the root's pre-hook never runs): each step's graph casts the bf16
    factors afresh (a cast recorded by the previous graph made the second backward fail), also for a
    trained bf16 factor that appeared after inject (a cast of the model, parameters assigned by a
    load, a frozen factor unfrozen)."""
    losses = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = tiny_llama(n_layer=2)
        inject(model, TiedLoRAConfig(rank=4, preset="tl3" if after_inject == "unfreeze_A" else "tl5",
                                     adapter_dtype="float32" if after_inject == "to_bf16" else "bfloat16",
                                     target_modules=["q_proj"]))
        randomize_adapters(model)
        if after_inject == "to_bf16":
            model.to(torch.bfloat16)
        elif after_inject == "load_state_dict_assign":
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        elif after_inject == "unfreeze_A":
            model.tiedlora["q_proj"].A.requires_grad_(True)
        inner = torch.compile(model.model, backend="aot_eager") if mode == "compiled" else model.model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        losses[mode] = []
        for _ in range(3):
            opt.zero_grad()
            loss = model.lm_head(inner(IDS).last_hidden_state).float().square().mean()
            loss.backward()
            opt.step()
            losses[mode].append(loss.item())
    torch._dynamo.reset()
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5) and losses["eager"][0] != losses["eager"][-1]


@pytest.mark.parametrize("call", ["root", "submodule"])
def test_bf16_tied_factors_train_with_fused_optimizers(call):
    """Fused optimizer kernels write parameters without moving their version counter: a bf16 tied
    factor's fp32 cast must never outlive the forward that made it (the root's pre- and post-hooks;
    a submodule called directly casts per call), so fused AdamW follows foreach AdamW's trajectory
    instead of training on the first step's factors forever."""
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


def test_bf16_tied_factor_replaced_through_data_is_seen_by_a_layer_called_directly():
    """``p.data = ...`` (and ``model.to``) replaces a parameter's storage without moving its version:
    a layer called without the model root (no pre-hook) must not keep using the old fp32 cast."""
    torch.manual_seed(0)
    model = tiny_llama(n_layer=1)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype="bfloat16", target_modules=["q_proj"]))
    randomize_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    before = layer(x)
    A = model.tiedlora["q_proj"].A
    A.data = (A.data * 3).clone()
    after = layer(x)
    fresh = copy.deepcopy(model).model.layers[0].self_attn.q_proj(x)  # no cast cached
    assert not torch.equal(after, before) and torch.equal(after, fresh)


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


class _TiedBlocks(torch.nn.Module):
    """Three tanh(Linear) blocks tied into one kind, the loss their output's mean square."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.square().mean()


def _tied_blocks(seed=0):
    torch.manual_seed(seed)
    model = _TiedBlocks()
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype="bfloat16", kinds={r"layers\.\d+": "lin"}))
    randomize_adapters(model)
    return model.train()


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_torch_compile_fullgraph_of_checkpointed_blocks_matches_eager(adapter_dtype, monkeypatch):
    """torch.compile(fullgraph=True) of a model whose blocks are activation-checkpointed: the shared
    fp32 casts of bf16 factors are made by the root's pre-hook, outside the checkpointed regions
    (written inside one, the cache was a side effect the checkpoint's higher-order op refused)."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")

    class Blocks(_TiedBlocks):
        def forward(self, x):
            for layer in self.layers:
                x = torch.utils.checkpoint.checkpoint(lambda t, f=layer: torch.tanh(f(t)), x, use_reentrant=False)
            return x.square().mean()

    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    grads = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Blocks()
        inject(model, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype=adapter_dtype, kinds={r"layers\.\d+": "lin"}))
        randomize_adapters(model)
        (torch.compile(model, fullgraph=True, backend="aot_eager") if mode == "compiled" else model)(x).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch._dynamo.reset()
    for n, g in grads["eager"].items():
        assert rel_err(grads["compiled"][n], g) < 1e-6, n


def test_reentrant_checkpointing_turned_on_before_inject_trains_a_vision_model():
    """Reentrant checkpointing runs its blocks without grad, then backpropagates through their outputs:
    an input that requires no grad gives the adapters none. transformers makes the input embeddings'
    output require grad only for models whose input is input_ids; inject does it for any model already
    checkpointing, as PEFT's wrapping does (ViT's adapters got no gradient at all, silently)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_labels=3))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", target_modules="all-linear"))
    model.classifier.requires_grad_(True)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2])).loss.backward()
    trained = [(n, p) for n, p in adapter_named_parameters(model) if p.requires_grad]
    assert trained and all(p.grad is not None for _, p in trained)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_sum_bf16_tied_gradients_in_fp32_without_recompiling(checkpointing, monkeypatch):
    """Blocks compiled one by one (torchtitan's recipe; transformers' checkpointing around each): a
    compiled block reads the pass's fp32 cast guarded on its presence and identity only (guarded on the
    factor's version, it recompiled at every optimizer step until torch.compile gave up, silently), and
    a checkpointed block recomputed in the backward sees the cast its forward saw (it cast by itself
    there, saved other tensors, and the checkpoint failed)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    model = tiny_llama(n_layer=4)
    inject(model, TiedLoRAConfig(rank=4, preset="tl5", adapter_dtype="bfloat16", target_modules=["q_proj"]))
    randomize_adapters(model)
    ref = copy.deepcopy(model).double()
    ref(IDS, labels=IDS).loss.backward()
    exact = ref.tiedlora["q_proj"].A.grad.to(torch.bfloat16)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    counters.clear()
    for block in model.model.layers:
        block.compile(backend="aot_eager")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    graphs = []
    for step in range(4):
        model(IDS, labels=IDS).loss.backward()
        if step == 0:
            assert (model.tiedlora["q_proj"].A.grad == exact).float().mean() > 0.95
        opt.step()
        opt.zero_grad()
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs


def _metric(model):
    model(IDS, labels=IDS)


def _input_gradient(model):
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
    torch.autograd.grad(model(inputs_embeds=embeds, labels=IDS).loss, embeds)


@pytest.mark.parametrize("between,compiled", [(_metric, slice(None)), (_input_gradient, slice(0, 1))],
                         ids=["metric", "input-gradient-first-block-compiled"])
def test_a_compiled_block_called_on_its_own_after_a_step_sees_the_step(between, compiled, monkeypatch):
    """A block compiled on its own, called after the optimizer step (a layer-by-layer loop), must read
    the stepped factors, not a cast kept from a pass before the step: a forward under grad never
    backpropagated (a logged metric) keeps its casts for a backward that does not come, and a backward
    towards the inputs only (a saliency map, an input-gradient penalty) revives them and reaches none, so
    none is dropped (its end must retire them; seen with the other layers of the kind eager). Both gave exactly the output from before the step."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    h = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(9)[None]
    outs = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = tiny_llama(n_layer=2)
        inject(model, TiedLoRAConfig(rank=4, preset="tl5", adapter_dtype="bfloat16", target_modules=["q_proj"]))
        randomize_adapters(model)
        model.train()
        if mode == "compiled":
            for block in model.model.layers[compiled]:
                block.compile(backend="aot_eager")
        block, rope = model.model.layers[0], model.model.rotary_emb(h, pos)
        run = lambda: block(h, position_embeddings=rope, attention_mask=None, position_ids=pos)  # noqa: E731
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        before = run().detach()
        model(IDS, labels=IDS).loss.backward()
        between(model)
        opt.step()
        outs[mode] = (before, run().detach())
    torch._dynamo.reset()
    assert not torch.equal(*outs["eager"]) and torch.equal(outs["compiled"][1], outs["eager"][1])


def test_compiled_autograd_without_fullgraph_trains_like_eager(monkeypatch):
    """Compiled autograd traces the gradient hooks on a pass's outputs: one that queued an engine callback
    broke it unless fullgraph (torch allows queue_callback there only)."""
    from torch._dynamo import compiled_autograd

    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    grads = {}
    for mode in ("eager", "compiled_autograd"):
        torch._dynamo.reset()
        model = _tied_blocks()
        loss = model(x)
        with compiled_autograd._enable(torch.compile(backend="aot_eager")) if mode != "eager" else nullcontext():
            loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch._dynamo.reset()
    assert grads["eager"].keys() == grads["compiled_autograd"].keys() and len(grads["eager"]) >= 4
    for name, g in grads["eager"].items():
        assert torch.equal(grads["compiled_autograd"][name], g), name


@pytest.mark.parametrize("merged", [False, True])
def test_fullgraph_compile_with_dynamic_shapes_and_of_a_merged_model_in_training(merged, monkeypatch):
    """torch.compile(dynamic=True, fullgraph=True): the scaling is symbolic there, and math.isfinite on it
    broke the graph at every adapted layer (fullgraph failed); a merged model in training mode warns
    in eager, and its warning failed fullgraph."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llama(n_layer=2).train()
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    randomize_adapters(model)
    if merged:
        merge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model(IDS, labels=IDS).loss
        got = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")(IDS, labels=IDS).loss
    torch._dynamo.reset()
    assert torch.allclose(got, want, rtol=1e-5)


def test_compiled_submodule_with_a_metric_forward_between_steps_trains_like_eager(monkeypatch):
    """A compiled submodule trained without the root, with a forward under grad and no backward (a
    logged metric) between steps: no cast outlives the forward that made it, so the next step never
    reads the factors as they were before the optimizer's write (losses drifted; SGD crashed)."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    losses = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        root = torch.nn.Module()
        root.inner = _TiedBlocks()
        inject(root, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype="bfloat16",
                                    kinds={r"inner\.layers\.\d+": "lin"}))
        randomize_adapters(root)
        run = torch.compile(root.inner, backend="aot_eager") if mode == "compiled" else root.inner
        opt = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=5e-2, fused=True)
        losses[mode] = []
        for _ in range(3):
            opt.zero_grad()
            loss = run(x)
            loss.backward()
            run(x)  # the metric
            opt.step()
            losses[mode].append(loss.item())
    torch._dynamo.reset()
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5) and losses["eager"][0] != losses["eager"][-1]


@pytest.mark.parametrize("copy_by", ["deepcopy", "torch.load"])
def test_a_copied_model_under_torch_compile_sums_bf16_tied_gradients_in_fp32(copy_by, tmp_path, monkeypatch):
    """A deepcopied or unpickled injected model, compiled whole: its tied bf16 factor's gradient is the
    fp32 sum over layers rounded once (what the original gives), not a sum of bf16 roundings."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    model = _tied_blocks()
    model(x).backward()
    want = model.tiedlora["lin"].A.grad.clone()
    if copy_by == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        twin = torch.load(tmp_path / "model.pt", weights_only=False)
    twin.zero_grad()
    torch._dynamo.reset()
    torch.compile(twin, backend="aot_eager")(x).backward()
    torch._dynamo.reset()
    assert torch.equal(twin.tiedlora["lin"].A.grad, want)


def test_another_librarys_reentrant_checkpoint_warns():
    """A reentrant checkpoint that is not torch's (DeepSpeed / Megatron style: forward without grad,
    recompute and a backward of its own inside the Function's backward) rounds each segment's part
    of a bf16 tied factor's gradient: warned, as torch's is."""

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run, x):
            ctx.run = run
            ctx.save_for_backward(x)
            with torch.no_grad():
                return run(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.backward(ctx.run(x), g)
            return None, x.grad

    class Checkpointed(_TiedBlocks):
        def forward(self, x):
            for layer in self.layers:
                x = Recompute.apply(lambda t, f=layer: torch.tanh(f(t)), x)
            return x.square().mean()

    model = _tied_blocks()
    model.__class__ = Checkpointed
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x).backward()
    assert [w for w in caught if "reentrant activation checkpointing" in str(w.message)]


# ---------------------------------------------------------------------------------------------
# Kinds: the module path without layer indices, shortened to its shortest unique suffix.

GPT2_KINDS = {"c_attn": (32, 96), "attn.c_proj": (32, 32), "c_fc": (32, 128), "mlp.c_proj": (128, 32)}


def test_gpt2_attention_and_mlp_projections_are_different_kinds():
    model = tiny_gpt2(n_layer=3)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6"))
    layers = dict(adapted_layers(model))
    assert layers["transformer.h.2.attn.c_proj"].kind == "attn.c_proj"
    assert layers["transformer.h.0.mlp.c_proj"].kind == "mlp.c_proj"
    counted = trainable_parameters(model)["kinds"]
    assert {k: v["layers"] for k, v in counted.items()} == {k: 3 for k in GPT2_KINDS}
    for kind, (K, N) in GPT2_KINDS.items():  # each kind's pair has its own layers' shape: no slicing
        f = model.tiedlora[kind.replace(".", "__")]
        assert (f.A.shape[1], f.B.shape[0]) == (K, N), kind
        assert all(m.factors is f for m in layers.values() if m.kind == kind)
    assert "tiedlora.attn__c_proj.A" in model.state_dict() and "tiedlora.c_proj.A" not in model.state_dict()


def test_llama_kind_names_are_the_last_component():
    model = tiny_llama(n_layer=2)
    inject(model, TiedLoRAConfig(rank=2))
    assert {n: m.kind for n, m in adapted_layers(model)} == {n: n.rsplit(".", 1)[-1] for n, _ in
                                                              adapted_layers(model)}
    assert sorted(model.tiedlora.keys()) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])


def test_a_kind_does_not_depend_on_what_else_is_targeted():
    model = tiny_gpt2()
    inject(model, TiedLoRAConfig(rank=2, target_modules=["attn.c_proj"]))
    assert {m.kind for _, m in adapted_layers(model)} == {"attn.c_proj"}


@pytest.mark.parametrize("names,kinds", [
    (["transformer.h.0.attn.c_proj", "transformer.h.11.mlp.c_proj", "transformer.h.3.attn.c_attn"],
     ["attn.c_proj", "mlp.c_proj", "c_attn"]),
    (["model.encoder.layers.0.self_attn.q_proj", "model.decoder.layers.1.self_attn.q_proj",
      "model.decoder.layers.0.encoder_attn.q_proj"],
     ["encoder.layers.self_attn.q_proj", "decoder.layers.self_attn.q_proj", "encoder_attn.q_proj"]),
    (["model.layers.0.mlp.experts.0.w1", "model.layers.1.mlp.experts.7.w1"], ["w1", "w1"]),
    (["visual.merger.mlp.0", "visual.merger.mlp.2", "head.0"], ["mlp.0", "mlp.2", "head.0"]),
    (["attn.c_proj", "h.0.attn.c_proj"], ["attn.c_proj", "h.attn.c_proj"]),
], ids=["gpt2", "encoder-decoder", "experts", "sequential-positions", "nested"])
def test_kind_rule_on_paths(names, kinds):
    from tiedlora_kernels.integrations.inject import layer_kinds

    assert list(layer_kinds(names, names, TiedLoRAConfig()).values()) == kinds
    assert list(layer_kinds(names, names, TiedLoRAConfig(kind_rule="last")).values()) == \
        [n.rsplit(".", 1)[-1] for n in names]


def test_kinds_override_and_the_last_component_rule():
    model = tiny_gpt2(n_layer=2)
    inject(model, TiedLoRAConfig(rank=2, kind_rule="last"))
    assert {m.kind for _, m in adapted_layers(model)} == {"c_attn", "c_proj", "c_fc"}
    assert tuple(model.tiedlora["c_proj"].A.shape) == (2, 128)  # attn's 32 inputs use a slice of mlp's 128
    model = tiny_gpt2(n_layer=2)
    inject(model, TiedLoRAConfig(rank=2, kinds={r"h\.0\.attn\.c_attn": "first_attn", "c_proj": "out"}))
    kinds = {n: m.kind for n, m in adapted_layers(model)}
    assert kinds["transformer.h.0.attn.c_attn"] == "first_attn" and kinds["transformer.h.1.attn.c_attn"] == "c_attn"
    assert kinds["transformer.h.1.attn.c_proj"] == kinds["transformer.h.0.mlp.c_proj"] == "out"
    assert sorted(model.tiedlora.keys()) == ["c_attn", "c_fc", "first_attn", "out"]


@pytest.mark.parametrize("kw,msg", [
    (dict(kinds={"c_proj": "bad name"}), r"kinds\['c_proj'\] must be a kind name"),
    (dict(kinds={"c_proj": ""}), r"kinds\['c_proj'\] must be a kind name"),
    (dict(kinds={"(c_proj": "out"}), r"kinds: invalid regex"),
    (dict(kinds=["c_proj"]), "kinds must be a dict"),
    (dict(kind_rule="suffix"), "kind_rule must be one of"),
], ids=["space", "empty", "regex", "list", "rule"])
def test_bad_kinds_are_refused_naming_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TiedLoRAConfig(**kw)


def test_kinds_that_would_share_one_factor_name_are_refused():
    with pytest.raises(ValueError, match=r"kinds \['attn\.c_proj', 'attn__c_proj'\] would share"):
        inject(tiny_gpt2(), TiedLoRAConfig(rank=2, kinds={r"h\.0\.attn\.c_proj": "attn__c_proj"}))
    for name in ("config", "training", "values"):  # attributes of model.tiedlora
        with pytest.raises(ValueError, match=f"kind '{name}' .* is a reserved name"):
            inject(tiny_gpt2(), TiedLoRAConfig(rank=2, kinds={"c_fc": name}))


#: Presets with a trained, randomly initialised factor: gamma multiplies their s.
GAMMA_BOOSTED = {"lora", "tl5", "tl6", "partial", "tl_extra", "tensor_embed", "dora", "simple_dora"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_merge_unmerge_round_trip_with_alpha_and_gamma(preset):
    """s != 1 (alpha != r, gamma != 1, a per-kind alpha): merge must fold s * dW, not dW. Each layer's
    merged weight is checked against W' = c * (W + s * diag(v) B diag(u) A) with s computed here."""
    model = tiny_llama()
    inject(model, TiedLoRAConfig(rank=4, preset=preset, alpha=10, gamma=3.0, alpha_pattern={"q_proj": 2}))
    randomize_adapters(model)
    adapted = model(IDS).logits
    w0, want = {}, {}
    for n, m in adapted_layers(model):
        s = (2 if n.endswith("q_proj") else 10) / 4 * (3.0 if preset in GAMMA_BOOSTED else 1.0)
        assert m.scaling == s, n
        A, B, u, v, c = (t if t is None else t.detach().double() for t in m.op_tensors())
        dW = (B * (1 if u is None else u)) @ A
        W = m.weight_nk().detach().double() + s * (dW if v is None else v[:, None] * dW)
        want[n] = W if c is None else c[:, None] * W
        w0[n] = m.weight.detach().clone()
    for n, m in adapted_layers(model):
        m.merge()
        assert rel_err(m.weight_nk(), want[n]) < 1e-6, n
    assert rel_err(model(IDS).logits, adapted) < 1e-5
    for n, m in adapted_layers(model):
        m.unmerge()
        assert rel_err(m.weight, w0[n]) < 1e-6, n
    assert rel_err(model(IDS).logits, adapted) < 1e-5


def test_a_module_under_two_names_is_adapted_under_both():
    """``self.b = self.a``: the same layer called from two places gets the same adapter at both."""
    model = torch.nn.Module()
    model.a = torch.nn.Linear(8, 8)
    model.b = model.a
    inject(model, TiedLoRAConfig(rank=2, preset="tl6", target_modules=["a"]))
    assert model.b is model.a and isinstance(model.a, TiedLoRALinear)
    randomize_adapters(model)
    x = torch.randn(3, 8)
    want = model.b(x)
    merge(model)  # one layer, one weight: merging it is no change to another module
    assert rel_err(model.b(x), want) < 1e-5


def test_a_model_holding_peft_layers_is_refused():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"holds PEFT adapter layers .*from_peft"):
        inject(pm, TiedLoRAConfig(rank=2))


def test_a_forward_without_backward_leaks_nothing():
    """bf16 tied factors with grad and no backward (an evaluation without no_grad): once the model is
    gone, its factors and their fp32 casts are freed (a hook holding the casts strongly made a cycle
    through the autograd graph that no collector breaks)."""
    import gc
    import weakref

    refs = []
    for _ in range(3):
        model = tiny_llama(n_layer=2)
        inject(model, TiedLoRAConfig(rank=4, preset="tl5", adapter_dtype="bfloat16", target_modules=["q_proj"]))
        model(IDS)
        refs.append(weakref.ref(model.tiedlora["q_proj"].A))
        del model
    gc.collect()
    assert not any(r() is not None for r in refs)


def test_no_reentrant_warning_for_non_reentrant_checkpointing_with_two_backwards():
    """retain_graph and a second backward, or two micro-batches, under use_reentrant=False: the cast
    is dropped after each backward and recomputed inside the next; that is no reentrant recompute."""
    import warnings

    model = tiny_llama(n_layer=2)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", adapter_dtype="bfloat16"))
    model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model(IDS, labels=IDS).loss
        loss.backward(retain_graph=True)
        loss.backward()
        first, second = model(IDS, labels=IDS).loss, model(IDS, labels=IDS).loss
        first.backward()
        second.backward()
    assert not [w for w in caught if "reentrant" in str(w.message)]
