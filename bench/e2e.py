"""End-to-end: training steps of a LLaMA-style model built from a config (random weights), adapters
on every linear layer of the decoder (lm_head excluded, as PEFT's "all-linear" does).

Configs, in order of importance (a run short of time keeps the first ones): no adapter (every
weight frozen, but backward still runs through every layer: the speed limit), ours TL6, PEFT LoRA,
ours LoRA, then the seed-003 variants (ours DoRA vs PEFT DoRA, Simple DoRA, Tied-LoRA Extra,
tensor embedding, partial tying).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Optional

import torch

from tiedlora_kernels import TiedLoRAConfig, inject, trainable_parameters
from tiedlora_kernels.ops import resolve_backend

GPU_MODEL = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=97)
CONFIGS = ["no_adapter", "ours_tl6", "peft_lora", "ours_lora", "ours_dora", "peft_dora", "ours_simple_dora",
           "ours_tl_extra", "ours_tensor_embed", "ours_partial"]


def _build(config: str, base, rank: int, device, dtype):
    model = copy.deepcopy(base).to(device, dtype)
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


def run_e2e(device: str, smoke: bool, rank: int = 16, steps: int = 10, deadline: Optional[float] = None,
            sink: Optional[list] = None, on_record: Optional[Callable[[], None]] = None,
            configs: Optional[list[str]] = None) -> list[dict]:
    """Train ``steps`` AdamW steps (after one warm-up step) per config; records step time (median),
    tokens/s, peak memory. Appends to ``sink`` as it goes and calls ``on_record`` after each config,
    so a run stopped by ``deadline`` (a ``time.monotonic()`` value) or a signal keeps what it measured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = [] if sink is None else sink
    shape = SMOKE_MODEL if smoke else GPU_MODEL
    batch, seq = (2, 32) if smoke else (4, 1024)
    steps = 2 if smoke else steps
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    # The base is built on the device (fast init), then parked on the CPU: each config gets its own
    # copy on the device, so peak memory is one model's, the same footing for every config.
    with torch.device(device):
        base = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=seq)).to(dtype)
    base = base.cpu()
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    for config in configs or CONFIGS:
        if deadline is not None and time.monotonic() > deadline:
            out.append(dict(config=config, error="skipped: out of time (--max-minutes)"))
            continue
        model = opt = None
        try:
            model = _build(config, base, rank, device, dtype)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4) if params else None

            def step():
                loss = model(ids, labels=ids).loss
                loss.backward()
                if opt:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                return loss.detach()

            step()  # warm-up: kernel compilation and autotuning, optimizer state
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                loss = step()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            trainable = (trainable_parameters(model)["total"] if config.startswith("ours")
                         else sum(p.numel() for p in params))
            out.append(dict(config=config, layers=shape["num_hidden_layers"], hidden=shape["hidden_size"],
                            intermediate=shape["intermediate_size"], rank=rank, batch=batch, seq=seq,
                            tokens=batch * seq, steps=steps, step_ms=ms, step_ms_min=min(times),
                            step_ms_max=max(times), tokens_per_s=batch * seq / (ms / 1e3),
                            peak_mem_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                            trainable=trainable, dtype=str(dtype).removeprefix("torch."), loss=float(loss),
                            backend=(resolve_backend(ids.new_empty(1, dtype=dtype)) if config.startswith("ours")
                                     else None)))
        except Exception as e:  # e.g. an older peft without DoRA: recorded, not fatal
            out.append(dict(config=config, error=f"{type(e).__name__}: {e}"[:300]))
        finally:
            model = opt = None  # release this config before the next is built
            if device == "cuda":
                torch.cuda.empty_cache()
        limit = next((e["step_ms"] for e in out if e["config"] == "no_adapter" and "step_ms" in e), None)
        for e in out:
            if limit and "step_ms" in e:
                e["ratio_to_no_adapter"] = e["step_ms"] / limit
        if on_record:
            on_record()
    return out
