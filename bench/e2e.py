"""End-to-end: training steps of a LLaMA-style model built from a config (random weights), adapters
on every linear layer of the decoder (lm_head excluded, as PEFT's "all-linear" does).

Configs, in order of importance (a run short of time keeps the first ones): no adapter (every
weight frozen, but backward still runs through every layer: the speed limit), ours TL6, PEFT LoRA,
ours LoRA, the three over a 4-bit base, then the other variants (ours DoRA vs PEFT DoRA, Simple
DoRA, Tied-LoRA Extra, tensor embedding, partial tying), last no adapter / ours TL6 / PEFT LoRA
under ``torch.compile`` and under its CUDA graphs (each family divided by its own no-adapter step).

What a timed step contains, and what it must not: warm-up steps run until two consecutive steps
agree within 5 % (at least 3 on a GPU, at most 10), so kernel compilation, allocator growth and the
optimizer's first-step state stay out of the timed steps; a Triton compilation during the timed
steps is detected (new entries in Triton's cache) and recorded. The timed steps run back to back
with a CUDA event at each step boundary and one sync at the end, as a training loop runs (no
per-step host sync); ``step_ms`` is the median event interval. Then, per config and only after
its timing: the host syncs one step makes (``torch.cuda.set_sync_debug_mode``), the host time of
one step, and a torch.profiler pass (top kernels, launches and GPU busy time per step).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from tiedlora_kernels import TiedLoRAConfig, inject, trainable_parameters

from .profiling import host_ms, profile_steps

GPU_MODEL = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=97)
#: In the order of what they decide, since a GPU session's share stops where it stops: the eager
#: targets (TL6 against no adapter and PEFT LoRA; DoRA and the 4-bit base against PEFT's), then the
#: CUDA-graph family (about a minute of compilation each), then what has no target.
CONFIGS = ["no_adapter", "ours_tl6", "peft_lora", "ours_dora", "peft_dora",
           "no_adapter_4bit", "ours_tl6_4bit", "peft_lora_4bit",
           "no_adapter_graphs", "ours_tl6_graphs", "peft_lora_graphs",
           "ours_lora", "ours_simple_dora", "ours_tl_extra", "ours_tensor_embed", "ours_partial",
           "no_adapter_compiled", "ours_tl6_compiled", "peft_lora_compiled"]
#: Configs ending in this train over a bitsandbytes NF4 copy of the base (QLoRA-style; compared with
#: no_adapter_4bit). Needs bitsandbytes (on the lent GPU machine: carried as a wheel, see gpu_session.sh).
QUANTIZED = "_4bit"
#: Configs ending in this run the model under ``torch.compile`` (inductor, default mode; the smoke
#: mode on a CPU: the aot_eager backend, the plumbing only), compared with no_adapter_compiled: a
#: small model's eager step is host-bound, and compiling is the usual remedy. The compilation
#: (about a minute per config on the GPU machine) falls in the warm-up steps.
COMPILED = "_compiled"
#: Configs ending in this run under ``torch.compile(mode="reduce-overhead")``: CUDA graphs replay the
#: forward and backward, so the host's issue time (what makes a small model's eager step host-bound)
#: is gone; compared with no_adapter_graphs. On a CPU, aot_eager as above.
GRAPHS = "_graphs"
FAMILIES = ("", QUANTIZED, COMPILED, GRAPHS)


def family(config: str) -> str:
    """The base a config is compared with: no_adapter + this suffix."""
    return next((f for f in FAMILIES[1:] if config.endswith(f)), "")
#: Warm-up on a GPU: at least WARMUP_MIN steps, at most WARMUP_MAX, until two consecutive steps agree
#: within WARMUP_TOL (a CPU smoke run: 1 or 2 steps).
WARMUP_MIN, WARMUP_MAX, WARMUP_TOL = 3, 10, 0.05


def _backend_of(x: torch.Tensor) -> Optional[str]:
    try:
        from tiedlora_kernels.ops import resolve_backend
    except ImportError:  # the dispatch is being redesigned
        return None
    try:
        return resolve_backend(x)
    except Exception:
        return None


def _triton_cache_entries() -> Optional[int]:
    """Entries in Triton's on-disk kernel cache: a compilation adds one (None if there is no cache dir)."""
    d = os.environ.get("TRITON_CACHE_DIR")
    if not d:
        try:
            import triton

            d = getattr(getattr(getattr(triton, "knobs", None), "cache", None), "dir", None)
        except ImportError:
            d = None
    path = Path(d) if d else Path.home() / ".triton" / "cache"
    try:
        return sum(1 for _ in path.iterdir())
    except OSError:
        return None


def _syncs_in(step: Callable[[], object], device: str) -> Optional[int]:
    """Synchronizing host calls one step makes (``.item()``, device-to-host copies, ...)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def _build(config: str, base, rank: int, device, dtype, quantized_dir: Optional[Path] = None):
    fam = family(config)
    if fam in (COMPILED, GRAPHS):
        model = _build(config.removesuffix(fam), base, rank, device, dtype, quantized_dir)
        if device != "cuda":
            return torch.compile(model, backend="aot_eager")
        return torch.compile(model, mode="reduce-overhead" if fam == GRAPHS else None)
    if config.endswith(QUANTIZED):
        model = _load_4bit(quantized_dir, device, dtype)
        config = config.removesuffix(QUANTIZED)
    else:
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


def _load_4bit(path: Path, device, dtype):
    """The base saved at ``path`` reloaded with bitsandbytes NF4 linear layers (compute in ``dtype``)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map={"": str(device)},
                                                    dtype=dtype)


def _timed_steps(step, device: str, steps: int) -> tuple[list[float], float]:
    """(per-step ms, wall ms per step): back to back, events at step boundaries, one sync at the end."""
    if device != "cuda":
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return times, sum(times) / steps
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    t0 = time.perf_counter()
    ev[0].record()
    for i in range(steps):
        step()
        ev[i + 1].record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    return [ev[i].elapsed_time(ev[i + 1]) for i in range(steps)], wall


def _warm_up(step, device: str, deadline: Optional[float]) -> list[float]:
    """Steps until two consecutive ones agree within WARMUP_TOL (at least WARMUP_MIN on a GPU)."""
    times = []
    least, most = (WARMUP_MIN, WARMUP_MAX) if device == "cuda" else (1, 2)  # a CPU smoke run checks the plumbing
    while len(times) < most:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= least and len(times) >= 2 and abs(times[-1] - times[-2]) <= WARMUP_TOL * times[-2]:
            break
        if len(times) >= least and deadline is not None and time.monotonic() > deadline:
            break
    return times


def run_e2e(device: str, smoke: bool, rank: int = 16, steps: int = 10, deadline: Optional[float] = None,
            sink: Optional[list] = None, on_record: Optional[Callable[[], None]] = None,
            configs: Optional[list[str]] = None, profile: bool = True) -> list[dict]:
    """Train ``steps`` AdamW steps (after the warm-up) per config; records step time (median),
    tokens/s, peak memory, then (after the timing) host syncs, host time and a profile of a step.
    Appends to ``sink`` as it goes and calls ``on_record`` after each config, so a run stopped by
    ``deadline`` (a ``time.monotonic()`` value) or a signal keeps what it measured."""
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
    quantized_dir = None
    tmp = None
    for config in configs or CONFIGS:
        if deadline is not None and time.monotonic() > deadline:
            out.append(dict(config=config, error="skipped: out of time (--max-minutes)"))
            if on_record:
                on_record()
            continue
        if config.endswith(QUANTIZED) and quantized_dir is None:  # after the deadline check: GBs to write
            import tempfile

            tmp = tempfile.TemporaryDirectory()
            quantized_dir = Path(tmp.name)
            base.save_pretrained(quantized_dir)
        model = opt = None
        try:
            model = _build(config, base, rank, device, dtype, quantized_dir)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4) if params else None
            last = {}

            def step():
                loss = model(ids, labels=ids).loss
                loss.backward()
                if opt:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                last["loss"] = loss.detach()

            warm = _warm_up(step, device, deadline)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            compiled_before = _triton_cache_entries()
            times, wall = _timed_steps(step, device, steps)
            compiled_after = _triton_cache_entries()
            if not math.isfinite(float(last["loss"])):  # a diverged or broken config times nothing worth a ratio
                out.append(dict(config=config, error=f"loss not finite after the timed steps ({float(last['loss'])})"))
                if on_record:
                    on_record()
                continue
            ms = statistics.median(times)
            trainable = (trainable_parameters(model)["total"] if config.startswith("ours")
                         else sum(p.numel() for p in params))
            rec = dict(config=config, layers=shape["num_hidden_layers"], hidden=shape["hidden_size"],
                       intermediate=shape["intermediate_size"], rank=rank, batch=batch, seq=seq,
                       tokens=batch * seq, steps=steps, step_ms=ms, step_ms_min=min(times),
                       step_ms_max=max(times), wall_ms_per_step=wall, tokens_per_s=batch * seq / (ms / 1e3),
                       warmup_steps=len(warm), warmup_ms=[round(t, 3) for t in warm],
                       triton_compiles_in_timed_steps=(compiled_after - compiled_before
                                                       if None not in (compiled_before, compiled_after) else None),
                       peak_mem_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                       trainable=trainable, dtype=str(dtype).removeprefix("torch."), loss=float(last["loss"]),
                       backend=_backend_of(ids.new_empty(1, dtype=dtype)) if config.startswith("ours") else None)
            out.append(rec)
            if on_record:
                on_record()
            # Diagnostics, after the timing: syncs per step, host time per step, the profiler's view.
            if profile and (deadline is None or time.monotonic() < deadline):
                try:
                    rec["host_syncs_per_step"] = _syncs_in(step, device)
                    cuda = device == "cuda"  # a CPU smoke run checks the plumbing only: fewer steps
                    rec["host_ms_per_step"] = host_ms(step, device, n=3 if cuda else 1)
                    rec["profile"] = profile_steps(step, device, steps=2 if cuda else 1)
                except Exception as e:
                    rec["profile_error"] = f"{type(e).__name__}: {e}"[:300]
            elif profile:
                rec["profile_skipped"] = "out of time"
        except Exception as e:  # e.g. an older peft without DoRA: recorded, not fatal
            out.append(dict(config=config, error=f"{type(e).__name__}: {e}"[:300]))
        finally:
            model = opt = None  # release this config before the next is built
            if device == "cuda":
                torch.cuda.empty_cache()
        for fam in FAMILIES:  # each config against the no-adapter run on the same base, the same way
            limit = next((e["step_ms"] for e in out if e["config"] == "no_adapter" + fam and "step_ms" in e), None)
            for e in out:
                if limit and "step_ms" in e and family(e["config"]) == fam:
                    e["ratio_to_no_adapter"] = e["step_ms"] / limit
        if on_record:
            on_record()
    return out
