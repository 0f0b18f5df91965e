"""Adapters over quantized base models (QLoRA-style): bitsandbytes 4-bit (NF4) and 8-bit layers, as
transformers loads them with ``BitsAndBytesConfig``, on the CPU (bitsandbytes >= 0.45 runs both there).

The oracle is the same model with dense layers holding the dequantized weights (4-bit: bitsandbytes'
CPU 4-bit matmul is a dequantize + matmul, so logits and every adapter gradient agree to fp32
rounding; in train mode, since in eval mode on a CPU with avx512-bf16 bitsandbytes repacks the
weight for a bf16 inference kernel, ~2e-3 away). 8-bit's LLM.int8 matmul also quantizes its input, so there the oracle is the base
layer's own output plus the reference adapter term.
"""

import math
import warnings

import pytest
import torch
import torch.nn as nn

from helpers import load_quantized, randomize_adapters, rel_err
from tiedlora_kernels import (TiedLoRAConfig, adapter_named_parameters, inject, load_adapter, merge, reference,
                              save_adapter, unmerge)
from tiedlora_kernels.bases import Bnb4bit, Bnb8bit, quantized_base_of
from tiedlora_kernels.modules import TiedLoRALinear

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

PRESETS = ["lora", "vera", "tl1", "tl2", "tl3", "tl4", "tl5", "tl6", "partial", "tl_extra", "tensor_embed", "dora",
           "simple_dora"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved as a transformers checkpoint (built from a config, no download). Every
    output width is a multiple of 32: bitsandbytes 0.50's CPU inference repacking (eval mode, no
    grad, avx512-bf16 CPUs) asserts it, with or without adapters."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    return path


def dense_twin(path, quantized):
    """The same model with dense nn.Linear layers holding the quantized model's dequantized weights."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dense = dict(model.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            kind = quantized_base_of(module)
            if kind is not None:
                dense[name].weight.copy_(kind.dequantized_weight(module).float())
    return model


def copy_adapters(src, dst):
    theirs = dict(adapter_named_parameters(dst))
    with torch.no_grad():
        for name, p in adapter_named_parameters(src):
            theirs[name].copy_(p)


def config(preset):
    return TiedLoRAConfig(rank=4, preset=preset, target_modules="all-linear", alpha=8, seed=3)


def test_layers_are_recognised(base_dir):
    q4, q8 = load_quantized(base_dir, 4), load_quantized(base_dir, 8)
    assert isinstance(quantized_base_of(q4.model.layers[0].self_attn.q_proj), Bnb4bit)
    assert isinstance(quantized_base_of(q8.model.layers[0].mlp.down_proj), Bnb8bit)
    assert quantized_base_of(nn.Linear(4, 4)) is None


@pytest.mark.parametrize("preset", PRESETS)
def test_4bit_logits_and_every_adapter_gradient_match_the_dequantized_model(base_dir, preset):
    quantized = load_quantized(base_dir, 4)
    dense = dense_twin(base_dir, quantized)
    inject(quantized, config(preset))
    inject(dense, config(preset))
    randomize_adapters(quantized, std=0.2)
    copy_adapters(quantized, dense)
    quantized.train(), dense.train()  # no dropout in the model; bitsandbytes' exact CPU path
    layer = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(layer, TiedLoRALinear) and layer.layout == "quantized"
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (quantized, dense):
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        outs.append((logits, {n: p.grad for n, p in adapter_named_parameters(model) if p.requires_grad}))
    (lq, gq), (ld, gd) = outs
    assert rel_err(lq, ld) < 1e-5
    assert gq.keys() == gd.keys() and gq
    for name in gq:
        assert gq[name] is not None, name
        assert rel_err(gq[name], gd[name]) < 1e-4, (name, rel_err(gq[name], gd[name]))


@pytest.mark.parametrize("preset,targets", [("tl6", "all-linear"), ("dora", "all-linear"),
                                            ("tl6", ["q_proj", "v_proj"])])
def test_training_after_eval_passes_on_a_cpu_repacked_model(base_dir, preset, targets):
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel, which has no backward, on
    the first no-grad eval call (avx512-bf16 CPUs; packed by hand here, so any CPU runs this). inject
    puts a packed weight back in the standard layout, scales included (transformers' default state
    is not double-quantized, where bitsandbytes' own inverse leaves them transposed), and switches
    the repack off, so eval passes after inject change nothing: training stays exact. For every
    4-bit layer, adapted or not: a repacked layer below an adapter passes no gradient to its input
    (with q_proj, v_proj targeted, every adapter gradient was None after one eval pass)."""
    import bitsandbytes.functional as bf

    quantized = load_quantized(base_dir, 4)
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not layers[0].weight.quant_state.nested
    for m in layers:
        m.weight.data, m.weight.quant_state = bf._convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    dense = dense_twin(base_dir, quantized)  # dequantized from the packed layout
    cfg = TiedLoRAConfig(rank=4, preset=preset, target_modules=targets, alpha=8, seed=3)
    inject(quantized, cfg)
    inject(dense, cfg)
    assert all(not m.support_avx512bf16_for_cpu and not m.weight.quant_state.packing_format_for_cpu for m in layers)
    randomize_adapters(quantized, std=0.2)
    copy_adapters(quantized, dense)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        quantized.eval()(ids)
    assert not any(m.weight.quant_state.packing_format_for_cpu for m in layers)
    outs = []
    for model in (quantized, dense):
        model.train().zero_grad(set_to_none=True)
        logits = model(ids).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        outs.append((logits, {n: p.grad for n, p in adapter_named_parameters(model) if p.requires_grad}))
    (lq, gq), (ld, gd) = outs
    assert rel_err(lq, ld) < 1e-5
    for name in gq:
        assert rel_err(gq[name], gd[name]) < 1e-4, (name, rel_err(gq[name], gd[name]))


@pytest.mark.parametrize("preset", ["tl6", "dora"])
def test_8bit_layer_matches_its_own_output_plus_the_reference_adapter(base_dir, preset):
    quantized = load_quantized(base_dir, 8)
    inject(quantized, config(preset))
    randomize_adapters(quantized, std=0.2)
    layer = quantized.model.layers[0].self_attn.q_proj
    assert layer.layout == "quantized" and isinstance(layer.base_kind, Bnb8bit)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    A, B, u, v, c = layer.op_tensors()
    base = layer.base_layer(x)
    bias = layer.base_layer.bias
    if c is not None and bias is not None:
        base = base - bias
    want = reference.tied_lora_add(x, base, bias if c is not None else None, A, B, u, v, layer.scaling, 0.0, False, c)
    assert rel_err(out, want) < 1e-6
    assert rel_err(out, layer.base_layer(x)) > 1e-3  # the adapter term is really there


def test_4bit_trains_saves_and_loads(base_dir, tmp_path):
    quantized = load_quantized(base_dir, 4)
    inject(quantized, config("tl6"))
    quantized.train()
    opt = torch.optim.AdamW([p for p in quantized.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(8):
        loss = quantized(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.uint8 for n, p in quantized.named_parameters() if n.endswith("q_proj.base_layer.weight"))
    quantized.eval()
    want = quantized(ids).logits
    save_adapter(quantized, tmp_path / "adapter")
    fresh = load_adapter(load_quantized(base_dir, 4), tmp_path / "adapter")
    assert rel_err(fresh(ids).logits, want) < 1e-6


def test_4bit_merge_requantizes_with_a_warning(base_dir):
    """merge dequantizes, adds the adapter in fp32 and quantizes again (PEFT's choice), with a warning:
    the merged model is as close to the adapted one as NF4 rounding of a weight allows (the error of
    quantizing the base itself sets the scale), and unmerge comes back as close to the adapter-free base."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).train()
    quantized = load_quantized(base_dir, 4).train()  # train mode: bitsandbytes' exact CPU path (module docstring)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base_logits = quantized(ids).logits
        nf4_error = rel_err(base_logits, dense(ids).logits)
        inject(quantized, config("tl6"))
        randomize_adapters(quantized, std=0.05)
        adapted = quantized(ids).logits
        assert rel_err(adapted, base_logits) > 3 * nf4_error  # the adapter matters more than the rounding
        with pytest.warns(UserWarning, match="quantized again"):
            merge(quantized)
        assert rel_err(quantized(ids).logits, adapted) < 2 * nf4_error
        with pytest.warns(UserWarning, match="quantized again"):
            unmerge(quantized)
        assert rel_err(quantized(ids).logits, adapted) < 2 * nf4_error
        assert quantized.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8


def test_an_8bit_layer_keeping_its_float_weights_keeps_their_dtype_through_merge():
    """has_fp16_weights=True keeps the weight in its float dtype (fp32 here) and quantizes on each call:
    merge and unmerge wrote it back as fp16 (merge promises the weight's dtype kept)."""
    torch.manual_seed(0)
    q = bnb.nn.Linear8bitLt(48, 40, bias=True, has_fp16_weights=True, threshold=0.0)
    q.weight = bnb.nn.Int8Params(torch.randn(40, 48) / 7, requires_grad=False, has_fp16_weights=True)
    model = nn.Module()
    model.proj = q.to("cpu")
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", target_modules=["proj"], seed=1))
    randomize_adapters(model, std=0.1)
    x = torch.randn(5, 48)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (merge's rounding warning)
        adapted = model.proj(x)
        for step in (merge, unmerge):
            step(model)
            assert model.proj.base_layer.weight.dtype == torch.float32, step.__name__
            assert rel_err(model.proj(x), adapted) < 1e-2, step.__name__  # int8 rounding of the weight


class Int8WeightLinear(nn.Linear):
    """A stand-in for a quantized linear of a library we do not support: an nn.Linear with int8 storage."""

    def __init__(self):
        super().__init__(8, 8)
        self.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantizing_a_cpu_repacked_4bit_layer_leaves_the_layer_as_it_was(double_quant):
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel (packed here by hand, as its
    first no-grad eval call does on avx512-bf16 CPUs); undoing that for the dequantized weight
    (DoRA's norm each call, merge, inject's dense view) must not touch the layer's own state, or
    its later forwards read a packed weight through an unpacked state (garbage)."""
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128) / 8, requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)._quantize("cpu")
    dense = Bnb4bit().dequantized_weight(layer).clone()
    data, state = layer.weight.data, layer.weight.quant_state
    layer.weight.data, layer.weight.quant_state = bf._convert_weight_packed_for_cpu(data, state)
    packed_state = layer.weight.quant_state
    absmax, packed = packed_state.absmax.clone(), layer.weight.data.clone()
    first = Bnb4bit().dequantized_weight(layer)
    assert rel_err(first, dense) < 1e-2  # the packing keeps absmax in bf16: ~2e-3 off the unpacked layer
    assert torch.equal(Bnb4bit().dequantized_weight(layer), first)
    assert layer.weight.quant_state is packed_state and packed_state.packing_format_for_cpu
    assert torch.equal(packed_state.absmax, absmax) and torch.equal(layer.weight.data, packed)


def test_unsupported_quantized_layer_is_refused_naming_it():
    model = nn.Module()
    model.dense = nn.Linear(8, 8)
    model.proj = Int8WeightLinear()
    with pytest.raises(ValueError, match=r"layer 'proj' is a quantized .*Int8WeightLinear.*supported quantized base "
                                         r"layers: bitsandbytes\.nn\.Linear4bit, bitsandbytes\.nn\.Linear8bitLt"):
        inject(model, TiedLoRAConfig(rank=2, preset="lora", target_modules="all-linear"))


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_trainer_trains_a_quantized_model_with_adapters(base_dir, bits, tmp_path):
    """README's QLoRA recipe, "then train as usual": transformers' Trainer refused a quantized model
    that carries no PEFT adapter ("cannot perform fine-tuning on purely quantized models"). inject
    marks this model's quantizer as training (its adapters do): Trainer runs, the adapters move, the
    base stays; a deepcopy keeps the mark, a pickle holds the quantizer as it was."""
    import copy
    import pickle

    class Tokens(torch.utils.data.Dataset):
        ids = torch.randint(0, 97, (8, 12), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4,
                                          learning_rate=1e-2, max_steps=2, save_strategy="no", report_to=[],
                                          disable_tqdm=True)
    with pytest.raises(ValueError, match="purely quantized"):  # the check is there, for a model without adapters
        transformers.Trainer(model=load_quantized(base_dir, bits), args=args, train_dataset=Tokens())
    model = load_quantized(base_dir, bits)
    quantizer_class = type(model.hf_quantizer)
    inject(model, TiedLoRAConfig(rank=4, preset="tl6", target_modules="all-linear"))
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    transformers.Trainer(model=model, args=args, train_dataset=Tokens()).train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved == {n for n, p in adapter_named_parameters(model) if p.requires_grad}
    assert copy.deepcopy(model).hf_quantizer.is_qat_trainable
    assert type(pickle.loads(pickle.dumps(model.hf_quantizer))) is quantizer_class


def test_4bit_layer_not_quantized_yet_is_refused_before_any_change():
    """bitsandbytes quantizes a Linear4bit when it is moved: inject before that names the layer and the
    call to make (it failed inside bitsandbytes' dequantize with a message about absmax)."""
    model = nn.Module()
    model.proj = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    trains = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"layer 'proj' \(Linear4bit\): its weight is not quantized yet .* call "
                                         r"model\.to\(device\) before inject"):
        inject(model, TiedLoRAConfig(rank=2, preset="tl6", target_modules=["proj"]))
    assert not hasattr(model, "tiedlora") and [p.requires_grad for p in model.parameters()] == trains
    model.to("cpu")
    inject(model, TiedLoRAConfig(rank=2, preset="tl6", target_modules=["proj"]))


class MXTensor(torch.Tensor):
    """A stand-in for a quantizing tensor subclass with floating storage (torchao's MX / NVFP4 tensors)."""


class HQQLinear(nn.Module):
    """A stand-in for another library's quantized linear that is no nn.Linear (HQQ, GPTQ, AWQ)."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.register_buffer("W_q", torch.zeros(8, 4, dtype=torch.uint8))


def _int8_conv1d():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(8, 8)
    layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    return layer


def _mx_linear():
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.bfloat16).as_subclass(MXTensor), requires_grad=False)
    return layer


class WQLinear_GEMM(nn.Module):
    """A stand-in for AutoAWQ's layer (awq/modules/linear/gemm.py): linear sizes, int32 packed weight."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.register_buffer("qweight", torch.zeros(8, 1, dtype=torch.int32))


def _linear_with_weight_of(class_name):
    """An nn.Linear whose weight is a tensor subclass named like optimum-quanto's (float dtype, quantized)."""
    layer = nn.Linear(8, 8)
    sub = type(class_name, (torch.Tensor,), {})
    layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.bfloat16).as_subclass(sub), requires_grad=False)
    return layer


def _transformers_layer(module, name, *args, **kw):
    import importlib

    return getattr(importlib.import_module(f"transformers.integrations.{module}"), name)(*args, **kw)


@pytest.mark.parametrize("make,what", [
    (_int8_conv1d, "quantized .*Conv1D"), (_mx_linear, "quantized .*MXTensor"), (HQQLinear, "quantized .*HQQLinear"),
    (lambda: _transformers_layer("eetq", "EetqLinear", 8, 8), "quantized .*EetqLinear"),
    (lambda: _transformers_layer("higgs", "HiggsLinear", 256, 8, num_bits=4, dtype=torch.float16), "quantized .*HiggsLinear"),
    (lambda: _transformers_layer("bitnet", "BitLinear", 8, 8, bias=False, dtype=torch.float32), "quantized .*BitLinear"),
    (lambda: _transformers_layer("bitnet", "AutoBitLinear", 8, 8, bias=False, online_quant=False),
     "AutoBitLinear, an nn.Linear subclass with a forward of its own"),
    (WQLinear_GEMM, "quantized .*WQLinear_GEMM"),
    (lambda: _linear_with_weight_of("WeightQBytesTensor"), "quantized .*WeightQBytesTensor"),
    (lambda: _linear_with_weight_of("WeightQBitsTensor"), "quantized .*WeightQBitsTensor"),
], ids=["int8-conv1d", "tensor-subclass", "not-an-nn-linear", "eetq-no-sizes", "higgs", "bitnet", "bitnet-auto",
        "autoawq", "quanto-qbytes", "quanto-qbits"])
def test_other_quantized_layers_are_refused_not_treated_as_dense_or_skipped(make, what):
    """EETQ, HIGGS, BitNet and AutoAWQ layers were skipped by "all-linear" (and unknown to a list),
    BitNet's AutoBitLinear (an nn.Linear scaling around its product) and quanto-quantized weights were
    adapted as dense layers, changing the output with a zero adapter."""
    model = nn.Module()
    model.dense = nn.Linear(8, 8)
    model.proj = make()
    with pytest.raises(ValueError, match=rf"layer 'proj' is a .*{what}.*supported quantized base layers"):
        inject(model, TiedLoRAConfig(rank=2, preset="lora", target_modules="all-linear"))


@pytest.mark.parametrize("preset", ["tl6", "dora", "simple_dora"])
def test_4bit_layer_with_bias_matches_the_dense_twin(preset):
    """A biased 4-bit layer: the magnitude variants scale (base - b + adapter) and add b after, as
    the dense op does."""
    torch.manual_seed(0)
    dense_layer = nn.Linear(64, 96)
    q = bnb.nn.Linear4bit(64, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(dense_layer.state_dict())
    q = q.to("cpu")
    with torch.no_grad():
        dense_layer.weight.copy_(Bnb4bit().dequantized_weight(q))
    models = []
    for layer in (q, dense_layer):
        model = nn.Module()
        model.proj = layer
        inject(model, TiedLoRAConfig(rank=4, preset=preset, target_modules=["proj"], seed=1))
        models.append(model.train())
    randomize_adapters(models[0], std=0.2)
    copy_adapters(models[0], models[1])
    x = torch.randn(3, 5, 64)
    G = torch.randn(3, 5, 96)
    got, want = [], []
    for model, into in zip(models, (got, want)):
        xi = x.clone().requires_grad_()
        out = model.proj(xi)
        trained = [p for _, p in adapter_named_parameters(model) if p.requires_grad]
        into.extend([out, *torch.autograd.grad(out, [xi, *trained], G)])
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-5, (i, rel_err(a, b))


@pytest.mark.parametrize("fp16_weights", [False, True])
def test_8bit_dora_starts_as_the_base_layer(fp16_weights):
    """With has_fp16_weights=True the layer computes with a row-wise int8 quantization of its fp16
    weight: the dequantized weight (DoRA's m = ||W||_row) must be that one, not the fp16 weight (the
    layer started 5.5e-4 away from its base output)."""
    torch.manual_seed(0)
    dense_layer = nn.Linear(48, 40)
    q = bnb.nn.Linear8bitLt(48, 40, bias=True, has_fp16_weights=fp16_weights, threshold=0.0)
    q.weight = bnb.nn.Int8Params(dense_layer.weight.data.half(), requires_grad=False, has_fp16_weights=fp16_weights)
    q.bias = nn.Parameter(dense_layer.bias.data.clone(), requires_grad=False)
    model = nn.Module()
    model.proj = q.to("cpu")
    inject(model, TiedLoRAConfig(rank=4, preset="dora", target_modules=["proj"], seed=1))
    x = torch.randn(5, 48)
    with torch.no_grad():
        assert rel_err(model.proj.train()(x), model.proj.base_layer(x)) < 1e-6


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bits", [4, 8])
def test_from_peft_over_a_quantized_model(base_dir, use_dora, bits):
    """A PEFT LoRA (or DoRA) trained over a 4-bit or 8-bit model converts to ours with the same logits.
    PEFT's DoRA over 8-bit, once run, leaves the int8 weight without its scales (weight.SCB None):
    the converted model's first call failed inside bitsandbytes."""
    peft = pytest.importorskip("peft")
    model = load_quantized(base_dir, bits)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora,
                           init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, pcfg).train()  # train mode: bitsandbytes' exact CPU path
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = peft_model(ids).logits
        base = load_quantized(base_dir, bits).train()(ids).logits
    from tiedlora_kernels import from_peft

    ours = from_peft(peft_model).train()
    assert ours.model.layers[1].mlp.down_proj.layout == "quantized"
    with torch.no_grad():
        got = ours(ids).logits
    assert rel_err(want, base) > 1e-2  # the adapter matters
    assert rel_err(got, want) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["tl6", "dora"])
def test_gpu_4bit_bf16_matches_the_dequantized_model(base_dir, preset, monkeypatch):
    """The GPU path over bitsandbytes' CUDA 4-bit layers, bf16 compute: logits and adapter gradients
    against the dense twin (dequantized weights, same adapters, the torch backend) at bf16 tolerance."""
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=cfg,
                                                                  device_map={"": "cuda"}, dtype=torch.bfloat16)
    dense = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).cuda()
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if quantized_base_of(module) is not None:
                modules[name].weight.copy_(quantized_base_of(module).dequantized_weight(module))
    for model in (quantized, dense):
        inject(model, config(preset))
    randomize_adapters(quantized, std=0.2)
    copy_adapters(quantized, dense)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    outs = []
    for model, backend in ((quantized, "auto"), (dense, "torch")):
        monkeypatch.setenv("TIEDLORA_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits.float()
        (logits * torch.linspace(-1, 1, logits.shape[-1], device="cuda")).sum().backward()
        outs.append((logits, {n: p.grad for n, p in adapter_named_parameters(model) if p.requires_grad}))
    (lq, gq), (ld, gd) = outs
    assert rel_err(lq, ld) < 2e-2
    for name in gq:
        assert rel_err(gq[name], gd[name]) < 5e-2, name


class Joint3DProjection(nn.Module):
    """A dense layer of a model of its own whose name holds ``int`` and a digit (``Joint3D``)."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.weight = nn.Parameter(torch.zeros(8, 8))


def test_ordinary_layers_are_not_taken_for_quantized_ones():
    """Falcon's nn.Linear subclass (its own forward, the same product), torch's MultiheadAttention output
    projection (a class name with "Quantizable"), a layer named like Joint3D and an int8 embedding."""
    from tiedlora_kernels.bases import looks_like_quantized_linear
    from tiedlora_kernels.integrations.inject import _layout_of

    torch.manual_seed(0)
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, new_decoder_architecture=False))
    inject(falcon, TiedLoRAConfig(rank=4, preset="tl6"))
    assert isinstance(falcon.transformer.h[0].self_attention.query_key_value, TiedLoRALinear)
    assert _layout_of(nn.MultiheadAttention(8, 2).out_proj) == "linear"
    embedding = nn.Embedding(8, 8)
    embedding.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    assert not looks_like_quantized_linear(Joint3DProjection()) and not looks_like_quantized_linear(embedding)
