"""``python -m tiedlora_kernels demo``: pretrain a small LM, adapt it with every preset, compare.

Steps: (1) build a tiny LLaMA from a ``LlamaConfig`` with a character tokenizer and pretrain it
on the embedded base corpus (or, with ``--model``, load a pretrained model and its tokenizer and
skip this); (2) for each (rank, preset): copy the base model, :func:`tiedlora_kernels.inject` the
adapters, train them with AdamW on the word-problem task in the same seeded batch order;
(3) report train/test loss (bits per token) and exact-match accuracy as in the paper's Table 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import PRESETS, TiedLoRAConfig
from ..ops import resolve_backend
from . import report
from .data import CharTokenizer, HFTokenizer, base_corpus, word_problems
from .train import (adapt, build_tiny_llama, encode_task, lora_parameter_count, pretrain, task_accuracy,
                    task_loss_bits)

#: Peak AdamW learning rates per preset for the default run (warm-up + cosine). Presets that
#: train only the per-layer vectors u, v (VeRA) need the largest steps; a preset not listed here
#: (e.g. a new seed-003 variant) gets ``DEFAULT_LR``. ``--lr`` overrides them all.
PRESET_LR = {"lora": 1e-2, "vera": 3e-2, "tl1": 1e-2, "tl2": 1e-2, "tl3": 1e-2, "tl4": 1e-2, "tl5": 1e-2,
             "tl6": 1e-2}
DEFAULT_LR = 1e-2

#: (default, --quick) sizes.
SIZES = {
    "base_steps": (300, 20),
    "steps": (120, 12),
    "batch_size": (16, 8),
    "n_train": (4000, 200),
    "n_test": (192, 32),
}
#: Built-in model shape (hidden, layers, intermediate), default and --quick.
MODEL_SHAPE = ((96, 3, 256), (64, 2, 172))


def _csv(kind):
    def parse(s: str):
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", type=_csv(str), default=None,
                   help="comma-separated presets (default: every key of tiedlora_kernels.PRESETS: "
                        f"{','.join(PRESETS)})")
    p.add_argument("--ranks", type=_csv(int), default=[8], help="comma-separated ranks (default: 8)")
    p.add_argument("--steps", type=int, default=None, help="adapter training steps per preset (default 120; "
                                                           "--quick: 12)")
    p.add_argument("--base-steps", type=int, default=None,
                   help="base-model pretraining steps (default 300; --quick: 20; ignored with --model)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="adapter training batch size (default 16; --quick: 8)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate for every preset (default: per preset, see PRESET_LR)")
    p.add_argument("--base-lr", type=float, default=3e-3, help="base pretraining learning rate (default 3e-3)")
    p.add_argument("--gamma", type=float, default=1.0, help="seed 003's gamma for the adapters (default 1)")
    p.add_argument("--target-modules", default="all-linear",
                   help="'all-linear' (default), a regex, or comma-separated module names")
    p.add_argument("--n-train", type=int, default=None, help="train problems (default 4000; --quick: 200)")
    p.add_argument("--n-test", type=int, default=None, help="test problems (default 192; --quick: 32)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate test loss every N steps for the curves (default: steps / 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, model init and batch order (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="adapt a pretrained causal LM (transformers from_pretrained, with its own tokenizer) "
                        "instead of pretraining the tiny built-in one")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default ./demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run (seconds; smaller built-in model, few steps) for CI and smoke tests")
    p.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tiedlora demo: --device cuda but CUDA is not available")
    return dev


def _environment(device: torch.device) -> dict:
    probe = torch.empty(1, device=device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    try:
        backend = resolve_backend(probe)
    except (RuntimeError, ValueError) as e:
        backend = f"unavailable ({e})"
    import transformers
    return {"device": str(device), "device_name": name, "backend": backend, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count()}


def _load_pretrained(name: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model.to(device), HFTokenizer(tok)


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo as ``args`` say; write the outputs; return the results dict."""
    t_start = time.perf_counter()
    quick = args.quick
    size = {k: v[1] if quick else v[0] for k, v in SIZES.items()}
    steps = args.steps if args.steps is not None else size["steps"]
    base_steps = args.base_steps if args.base_steps is not None else size["base_steps"]
    n_train = args.n_train if args.n_train is not None else size["n_train"]
    n_test = args.n_test if args.n_test is not None else size["n_test"]
    batch_size = args.batch_size if args.batch_size is not None else size["batch_size"]
    presets = args.presets if args.presets is not None else list(PRESETS)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"tiedlora demo: unknown presets {unknown}; expected some of {list(PRESETS)}")
    if not args.ranks or any(r < 1 for r in args.ranks):
        raise SystemExit(f"tiedlora demo: --ranks must be positive integers, got {args.ranks}")
    if steps < 1 or batch_size < 1:
        raise SystemExit("tiedlora demo: --steps and --batch-size must be >= 1")
    eval_every = args.eval_every if args.eval_every is not None else max(1, steps // 5)
    target = args.target_modules
    if target != "all-linear" and "," in target:
        target = [t for t in target.split(",") if t]
    device = _device(args.device)
    progress = not args.no_progress
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    torch.manual_seed(args.seed)
    base_losses: list[float] = []
    if args.model:
        model, tok = _load_pretrained(args.model, device)
        model_desc = f"{args.model} ({sum(p.numel() for p in model.parameters()):,} parameters, pretrained)"
    else:
        tok = CharTokenizer()
        hidden, layers, intermediate = MODEL_SHAPE[1 if quick else 0]
        model = build_tiny_llama(tok.vocab_size, hidden=hidden, layers=layers, intermediate=intermediate,
                                 seed=args.seed).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        c = model.config
        model_desc = (f"tiny LLaMA ({c.num_hidden_layers} layers, hidden {c.hidden_size}, {n_params:,} parameters, "
                      f"char tokenizer) pretrained {base_steps} steps on the embedded base corpus")
        stream = torch.tensor(tok.encode(base_corpus(seed=args.seed)), dtype=torch.long)
        log(f"tiedlora demo: pretraining the base model ({n_params:,} parameters) for {base_steps} steps on {device}")
        base_losses = pretrain(model, stream, steps=base_steps, batch_size=32, seq_len=128, lr=args.base_lr,
                               seed=args.seed, device=device, progress=progress)

    train = encode_task(word_problems(n_train, seed=args.seed, split="train"), tok)
    test = encode_task(word_problems(n_test, seed=args.seed, split="test"), tok)
    eval_train_limit = min(n_train, n_test)
    gen = torch.Generator().manual_seed(args.seed)
    # One batch order for every preset and rank, so the comparison is like for like.
    batches = [torch.randint(0, n_train, (batch_size,), generator=gen).tolist() for _ in range(steps)]

    initial_train = task_loss_bits(model, train, tok.pad_id, device, limit=eval_train_limit)
    baseline = {"train_bits": initial_train,
                "test_bits": task_loss_bits(model, test, tok.pad_id, device),
                "accuracy": task_accuracy(model, test, tok, device)[0]}
    log(f"tiedlora demo: base model before adaptation: test {baseline['test_bits']:.3f} bits/token, "
        f"exact match {100 * baseline['accuracy']:.1f}%")

    rows = []
    for rank in args.ranks:
        lora_count = lora_parameter_count(model, rank, target)
        for preset in presets:
            lr = args.lr if args.lr is not None else PRESET_LR.get(preset, DEFAULT_LR)
            cfg = TiedLoRAConfig(rank=rank, preset=preset, target_modules=target, gamma=args.gamma, seed=args.seed)
            torch.manual_seed(args.seed)
            res = adapt(model, cfg, train=train, test=test, tok=tok, batches=batches, lr=lr, device=device,
                        eval_train_limit=eval_train_limit, eval_test_limit=n_test, acc_limit=n_test,
                        eval_every=eval_every, initial_train_bits=initial_train, progress=progress)
            row = asdict(res)
            row["p_of_lora"] = 100.0 * res.trainable / lora_count
            row["lora_trainable"] = lora_count
            rows.append(row)
            log(f"  {preset:>6} r={rank}: {res.trainable:>8,} params ({row['p_of_lora']:.1f}% of LoRA), "
                f"train {res.final_train_bits:.3f} / test {res.test_bits:.3f} bits/token, "
                f"exact match {100 * res.accuracy:.1f}%  [{res.seconds:.1f} s]")

    settings = {"presets": presets, "ranks": args.ranks, "steps": steps, "base_steps": 0 if args.model else base_steps,
                "batch_size": batch_size, "lr": args.lr, "preset_lr": {r["preset"]: r["lr"] for r in rows},
                "base_lr": args.base_lr, "gamma": args.gamma, "target_modules": target, "n_train": n_train,
                "n_test": n_test, "acc_examples": n_test, "eval_train_examples": eval_train_limit,
                "eval_every": eval_every, "seed": args.seed, "quick": quick, "model": args.model,
                "model_desc": model_desc, "loss": "response tokens only, bits per token"}
    results = {"settings": settings, "environment": _environment(device), "baseline": baseline,
               "base_pretrain_bits": base_losses, "rows": rows,
               "seconds_total": time.perf_counter() - t_start}
    print(report.text_table(results))
    written = report.write_outputs(results, Path(args.out), plot=not args.no_plot)
    results["seconds_total"] = time.perf_counter() - t_start
    log(f"tiedlora demo: wrote {', '.join(str(p) for p in written)} in {results['seconds_total']:.0f} s")
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` as the ``demo`` subcommand's flags and run it."""
    p = argparse.ArgumentParser(prog="tiedlora demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_demo(p.parse_args(argv))
