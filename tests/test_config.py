"""Presets (Table 1 of SPEC.md), overrides, and the config's errors."""

import pytest
import torch

from tiedlora_kernels import (PRESETS, TiedLoRAConfig, adapted_layers, expected_trainable_parameters, inject,
                              trainable_parameters)

# Table 1 (fused QKV c_attn: K = d, N = 3d; L layers).
TABLE1 = {
    "lora": lambda L, d, r: 4 * L * d * r,
    "vera": lambda L, d, r: L * (r + 3 * d),
    "tl1": lambda L, d, r: d * r,
    "tl2": lambda L, d, r: d * r + L * (r + 3 * d),
    "tl3": lambda L, d, r: 3 * d * r,
    "tl4": lambda L, d, r: 3 * d * r + L * r,
    "tl5": lambda L, d, r: 4 * d * r,
    "tl6": lambda L, d, r: 4 * d * r + L * (r + 3 * d),
}


def meta_gpt2(L, d):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_layer=L, n_embd=d, n_head=max(1, d // 64), vocab_size=128))


def test_table1_presets_exist():
    assert set(TABLE1) <= set(PRESETS)


@pytest.mark.parametrize("preset", sorted(TABLE1))
@pytest.mark.parametrize("L,d,r", [(3, 64, 4), (12, 768, 8), (5, 96, 1)])
def test_trainable_count_equals_table1(preset, L, d, r):
    model = meta_gpt2(L, d)
    inject(model, TiedLoRAConfig(rank=r, preset=preset, target_modules=["c_attn"]))
    counted = trainable_parameters(model)
    assert counted["total"] == TABLE1[preset](L, d, r)
    assert counted["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted["kinds"]["c_attn"]["layers"] == L
    assert counted["total"] == expected_trainable_parameters(
        TiedLoRAConfig(rank=r, preset=preset), [("c_attn", d, 3 * d)] * L)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_trainable_count_equals_formula_for_every_preset(preset):
    """Every preset, the seed-003 variants included, on a LLaMA with kinds of different shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=150, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    config = TiedLoRAConfig(rank=4, preset=preset)
    inject(model, config)
    layers = [(m.kind, m.in_features, m.out_features) for _, m in adapted_layers(model)]
    assert trainable_parameters(model)["total"] == expected_trainable_parameters(config, layers)
    assert trainable_parameters(model)["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_paper_llama2_7b_checks():
    """SPEC.md: L = 32, d = 4096, r = 8: LoRA ~4.2M, TL5 ~131K, VeRA 9.4% of LoRA, TL6 12.5%."""
    counts = {}
    for preset in ("lora", "tl5", "vera", "tl6"):
        model = meta_gpt2(32, 4096)
        inject(model, TiedLoRAConfig(rank=8, preset=preset, target_modules=["c_attn"]))
        counts[preset] = trainable_parameters(model)["total"]
    assert counts["lora"] == 4_194_304
    assert counts["tl5"] == 131_072
    assert round(100 * counts["vera"] / counts["lora"], 1) == 9.4
    assert round(100 * counts["tl6"] / counts["lora"], 1) == 12.5


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_exactly_one_zero_factor(preset):
    p = TiedLoRAConfig(preset=preset).resolved()
    zeros = [n for n in "ABuv" if getattr(p, n).init in ("zeros", 0.0)]
    assert len(zeros) == 1


def test_overrides_build_other_combinations():
    cfg = TiedLoRAConfig(preset="tl6", train_u=False, init_v="absent", train_v=False, tied=False)
    p = cfg.resolved()
    assert (p.A.train, p.B.train, p.u.train, p.v.init, p.tied) == (True, True, False, None, False)


def test_following_the_matrix_core_advice_builds_a_config():
    """core="matrix" on tl6 says "set init_u='absent'": doing just that used to raise "u is absent but
    train_u=True" (a removed tensor kept the preset's train flag)."""
    with pytest.raises(ValueError, match="set init_u='absent'"):
        TiedLoRAConfig(preset="tl6", core="matrix")
    p = TiedLoRAConfig(preset="tl6", core="matrix", init_u="absent").resolved()
    assert (p.u.init, p.u.train, p.core) == (None, False, "matrix")
    with pytest.raises(ValueError, match="u is absent"):  # asking to train a removed tensor still fails
        TiedLoRAConfig(preset="tl6", core="matrix", init_u="absent", train_u=True)


def test_scaling():
    assert TiedLoRAConfig(rank=8).scaling == 1.0
    assert TiedLoRAConfig(rank=8, alpha=16).scaling == 2.0
    assert TiedLoRAConfig(rank=16, alpha=16, rslora=True).scaling == 4.0
    assert TiedLoRAConfig(rank=16, rslora=True).scaling == 4.0  # alpha unset is the paper's alpha = r


def test_any_int_seed_is_valid():
    """Seeds enter only a hash of their text: files saved with any int seed load."""
    for seed in (-1, 0, 2**64):
        assert TiedLoRAConfig.from_dict(TiedLoRAConfig(seed=seed).to_dict()).seed == seed
    assert TiedLoRAConfig(rank=8, preset="tl6", gamma=10).scaling == 10.0  # A is the trained random factor
    assert TiedLoRAConfig(rank=8, preset="vera", gamma=10).scaling == 1.0  # no trained random factor


BAD = [
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=-3), "rank must be a positive int"),
    (dict(rank=2.5), "rank must be a positive int"),
    (dict(preset="tl7"), "unknown preset 'tl7'"),
    (dict(dropout=1.0), "dropout must be a number in"),
    (dict(dropout="0.1"), "dropout must be a number in"),
    (dict(rslora="no"), "rslora must be True or False"),
    (dict(tied="false"), "tied must be True or False or None"),
    (dict(train_A="no"), "train_A must be True or False or None"),
    (dict(seed="abc"), "seed must be an int"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(init_u=float("nan")), "init_u must be a finite number"),
    (dict(init_v=float("inf")), "init_v must be a finite number"),
    (dict(target_modules=5), "target_modules must be"),
    (dict(exclude_modules=None), "exclude_modules must be a regex string or a list"),
    (dict(exclude_modules=[1]), "exclude_modules must be a regex string or a list"),
    (dict(exclude_modules="lm_(head"), "exclude_modules: invalid regex"),
    (dict(preset="partial", banks=5), "banks must be a pair"),
    (dict(gamma=0), "gamma must be"),
    (dict(gamma=True), "gamma must be"),  # a bool would read as 1
    (dict(rank=1, alpha=1e300, gamma=1e200), "the scaling s = alpha / r . gamma .. 1 is not finite"),
    (dict(rank=1, alpha=1.7e308, gamma=2.0), "is not finite for alpha=1.7e"),
    (dict(alpha=True), "alpha must be a finite nonzero number"),
    (dict(alpha=0.0), "alpha must be a finite nonzero number"),  # s = 0: no output, no gradient, for good
    (dict(alpha_pattern={"q_proj": 0}), r"alpha_pattern\['q_proj'\] must be a finite nonzero number"),
    (dict(init_A="xavier"), "init_A must be one of"),
    (dict(preset="lora", train_B=False), "B is initialised to zero and frozen"),
    (dict(preset="tl6", init_A="zeros"), "A and B are all initialised to zero"),
    (dict(preset="lora", train_u=True), "u is absent"),
    (dict(preset="vera", train_u=False, train_v=False), "v is initialised to zero and frozen"),
    (dict(target_modules="(unclosed"), "invalid regex"),
    (dict(target_modules=[]), "target_modules must be"),
    (dict(adapter_dtype="int8"), "adapter_dtype must be one of"),
    (dict(alpha_pattern={"q_proj": "16"}), r"alpha_pattern\['q_proj'\] must be a finite nonzero number"),
    (dict(alpha_pattern={"q_proj": float("inf")}), r"alpha_pattern\['q_proj'\] must be a finite nonzero number"),
    (dict(alpha_pattern={"q_proj": True}), r"alpha_pattern\['q_proj'\] must be a finite nonzero number"),
    (dict(alpha_pattern={"q_(proj": 16}), "alpha_pattern: invalid regex"),
    (dict(alpha_pattern=[("q_proj", 16)]), "alpha_pattern must be a dict"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_invalid_config_raises_naming_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TiedLoRAConfig(**kw)


def test_layer_scaling_follows_alpha_pattern_with_peft_matching():
    """PEFT's rule: a key is a regex for a dotted suffix of the module path; the first match wins."""
    cfg = TiedLoRAConfig(rank=4, alpha=8, gamma=2.0, preset="tl6", alpha_pattern={
        r"^model\.layers\.0\.self_attn\.q_proj": 1, "q_proj": 2, "mlp.(up|down)_proj": 12})
    assert cfg.layer_scaling("model.layers.0.self_attn.q_proj") == 1 / 4 * 2
    assert cfg.layer_scaling("model.layers.1.self_attn.q_proj") == 2 / 4 * 2
    assert cfg.layer_scaling("model.layers.1.mlp.down_proj") == 12 / 4 * 2
    assert cfg.layer_scaling("model.layers.1.mlp.gate_proj") == cfg.scaling == 8 / 4 * 2
    assert cfg.layer_scaling("model.layers.1.self_attn.xq_proj") == cfg.scaling  # a suffix on a dot only
    assert TiedLoRAConfig(rank=16, rslora=True, alpha_pattern={"q_proj": 8}).layer_scaling("a.q_proj") == 2.0
    assert TiedLoRAConfig(rank=4, alpha_pattern={"q_proj": 8}).layer_scaling("a.k_proj") == 1.0  # alpha None: s = 1


def test_round_trip_dict():
    cfg = TiedLoRAConfig(rank=4, preset="vera", target_modules=["q_proj", "v_proj"], alpha=8, seed=3)
    assert TiedLoRAConfig.from_dict(cfg.to_dict()) == cfg
    cfg = TiedLoRAConfig(rank=4, alpha_pattern={"q_proj": 16, "v_proj": 2.5}, kind_rule="last",
                         kinds={r"h\.0\.attn\.c_attn": "first_attn"})
    import json

    assert TiedLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        TiedLoRAConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_exclude_modules_as_a_string_is_a_regex_not_its_characters():
    """PEFT's rule: a string is matched (fullmatch) against the module path (iterated, it excluded
    nothing: "lm_head" was seven one-letter names)."""
    from helpers import tiny_llama
    from tiedlora_kernels import adapted_layers, inject

    model = tiny_llama(n_layer=2)
    cfg = TiedLoRAConfig(rank=2, target_modules="all-linear", exclude_modules=r".*\.layers\.0\..*|lm_head")
    inject(model, cfg)
    names = [n for n, _ in adapted_layers(model)]
    assert names and not any(".layers.0." in n or n == "lm_head" for n in names)
    assert TiedLoRAConfig.from_dict(cfg.to_dict()).exclude_modules == cfg.exclude_modules
