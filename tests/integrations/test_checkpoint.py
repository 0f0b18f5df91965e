"""save_adapter / load_adapter: round trips, what is written, and refusal of bad files."""

import json

import pytest
import torch
from safetensors import safe_open

from helpers import randomize_adapters, tiny_gpt2, tiny_llama
from tiedlora_kernels import PRESETS, TiedLoRAConfig, inject, load_adapter, save_adapter
from tiedlora_kernels.integrations.checkpoint import ADAPTER_FILE, CONFIG_FILE

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def trained(preset="tl6", family="llama", **kw):
    torch.manual_seed(0)
    model = tiny_gpt2() if family == "gpt2" else tiny_llama()
    inject(model, TiedLoRAConfig(rank=4, preset=preset, seed=5, **kw))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_round_trip_into_fresh_model(tmp_path, preset):
    model = trained(preset)
    save_adapter(model, tmp_path)
    fresh = tiny_llama()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("tiedlora.")
                           and ".adapter_" not in k}, strict=False)
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)


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
    for m, o in ((model, opt), (resumed, opt2)):
        o.zero_grad()
        m(IDS, labels=IDS).loss.backward()
        o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_refused_load_leaves_a_plain_model_untouched(tmp_path):
    save_adapter(trained("tl6"), tmp_path)
    other = tiny_llama(hidden=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="load_adapter"):
        load_adapter(other, tmp_path)
    assert not hasattr(other, "tiedlora")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


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
    with pytest.raises(ValueError, match="format_version '99'"):
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
