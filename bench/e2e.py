"""End-to-end: training steps of a LLaMA-style model built from a config, adapters on all linear layers.

Configs: no adapter (but backward through every layer, the speed limit), ours TL6, ours LoRA,
PEFT LoRA, and the seed-003 variants (ours DoRA vs PEFT DoRA, Simple DoRA, Tied-LoRA Extra,
tensor embedding, partial tying).
"""

from __future__ import annotations

import copy
import time

import torch

from tiedlora_kernels import TiedLoRAConfig, inject, trainable_parameters

GPU_MODEL = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=97)
CONFIGS = ["no_adapter", "ours_tl6", "ours_lora", "peft_lora", "ours_dora", "peft_dora", "ours_simple_dora",
           "ours_tl_extra", "ours_tensor_embed", "ours_partial"]


def _build(config: str, base, rank: int):
    model = copy.deepcopy(base)
    if config == "no_adapter":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # backward still runs through every layer (dX only)
        return model
    if config.startswith("peft_"):
        import peft

        cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", lora_dropout=0.0,
                              use_dora=config == "peft_dora")
        return peft.get_peft_model(model, cfg)
    return inject(model, TiedLoRAConfig(rank=rank, preset=config.removeprefix("ours_")))


def run_e2e(device: str, smoke: bool, rank: int = 16, steps: int = 10) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SMOKE_MODEL if smoke else GPU_MODEL
    batch, seq = (2, 32) if smoke else (4, 1024)
    steps = 2 if smoke else steps
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    base = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=seq)).to(device, dtype)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    out = []
    for config in CONFIGS:
        try:
            model = _build(config, base, rank)
        except Exception as e:  # e.g. an older peft without DoRA: recorded, not fatal
            out.append(dict(config=config, error=f"{type(e).__name__}: {e}"[:300]))
            continue
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None

        def step():
            loss = model(ids, labels=ids).loss
            loss.backward()
            if opt:
                opt.step()
                opt.zero_grad(set_to_none=True)

        step()  # warm-up (and autotuning)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / steps
        trainable = trainable_parameters(model)["total"] if config.startswith("ours") else \
            sum(p.numel() for p in params) if config.startswith("peft") else 0
        out.append(dict(config=config, layers=shape["num_hidden_layers"], hidden=shape["hidden_size"], rank=rank,
                        tokens=batch * seq, step_ms=ms, tokens_per_s=batch * seq / (ms / 1e3),
                        peak_mem_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                        trainable=trainable, dtype=str(dtype).removeprefix("torch.")))
        del model, opt
    return out
