"""``python -m tiedlora_kernels demo``: pretrain a small LM, adapt it with every preset, compare.

Steps: (1) build a tiny LLaMA from a ``LlamaConfig`` with a character tokenizer and pretrain it
on the embedded base corpus (or, with ``--model``, load a pretrained model and its tokenizer and
skip this); (2) for each (rank, preset): copy the base model, :func:`tiedlora_kernels.inject` the
adapters, train them with AdamW on the word-problem task in the same seeded batch order;
(3) report train/test loss (bits per token) and exact-match accuracy as in Table 2 of the
Tied-LoRA paper (Renduchintala et al., arXiv:2311.09578).

The run keeps its work: ``results.json`` and ``results.md`` are rewritten after every preset, the
pretrained base model is saved beside them, and Ctrl-C or SIGTERM (a timeout) writes the partial
table before exiting. Rerunning the same command resumes: presets already in ``results.json``
under the same settings and versions are not trained again (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import PRESETS, TiedLoRAConfig
from ..integrations.checkpoint import usual_mode
from ..integrations.inject import inject
from ..ops import resolve_backend
from . import report
from .data import CharTokenizer, HFTokenizer, base_corpus, word_problems
from .train import (adapt, build_tiny_llama, encode_task, lora_parameter_count, pretrain, quantize_model,
                    task_accuracy,
                    task_loss_bits)

#: Peak AdamW learning rates per preset for the default run (warm-up + cosine). Presets that
#: train only the per-layer vectors u, v (VeRA) need the largest steps; a preset not listed here
#: (the variants of docs/MATH.md, or a new preset) gets ``DEFAULT_LR``. ``--lr`` overrides them all.
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
                   help="peak learning rate for every preset (default: per preset, "
                        + ", ".join(f"{k} {v:g}" for k, v in PRESET_LR.items()) + f", others {DEFAULT_LR:g})")
    p.add_argument("--base-lr", type=float, default=3e-3, help="base pretraining learning rate (default 3e-3)")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="gamma of the 'multiply and divide' initialisation (docs/MATH.md; default 1)")
    p.add_argument("--target-modules", default="all-linear",
                   help="'all-linear' (default), module names (one, or comma-separated: q_proj,v_proj), "
                        "or a regex over full module paths")
    p.add_argument("--n-train", type=int, default=None, help="train problems (default 4000; --quick: 200)")
    p.add_argument("--n-test", type=int, default=None, help="test problems (default 192; --quick: 32)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate test loss every N steps, recorded in results.json as eval_steps / "
                        "eval_test_bits (default: steps / 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, model init and batch order (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="adapt a pretrained causal LM (transformers from_pretrained, with its own tokenizer) "
                        "instead of pretraining the tiny built-in one")
    p.add_argument("--quantize", choices=("none", "4bit", "8bit"), default="none",
                   help="QLoRA-style: adapt a bitsandbytes 4-bit (NF4) or 8-bit copy of the base model "
                        "(needs bitsandbytes: pip install -e '.[quant]', also in '.[test]'; runs on a CPU too)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default ./demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run (smaller built-in model, few steps, a smoke test) for CI and smoke tests")
    p.add_argument("--fresh", action="store_true",
                   help="start over: ignore the results and base model already in --out (default: resume)")
    p.add_argument("--replot", action="store_true",
                   help="no training: rewrite results.md and curves.png from --out's results.json")
    p.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.add_argument("--log-every", type=float, default=10.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a log), print a progress line at most every SECONDS "
                        "(default 10; 0: every step)")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tiedlora demo: --device cuda but CUDA is not available")
    return dev


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: torch.device) -> dict:
    """What the numbers depend on besides the settings: device, backend and library versions."""
    probe = torch.empty(1, device=device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({_cpu_name()}, {platform.machine()}), {torch.get_num_threads()} threads"
    try:
        backend = resolve_backend(probe)
    except (RuntimeError, ValueError) as e:
        backend = f"unavailable ({e})"
    import transformers

    from .. import __version__
    return {"device": str(device), "device_name": name, "backend": backend, "torch": torch.__version__,
            "transformers": transformers.__version__, "tiedlora_kernels": __version__,
            "tiedlora_kernels_source": _source_fingerprint(), "commit": _git_commit(),
            "bitsandbytes": _installed_version("bitsandbytes"),
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def _source_fingerprint() -> str:
    """sha256 (16 hex digits) of the package's Python sources: the code the numbers came from, also
    where no git checkout is (the package version does not move with every change)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git_commit() -> Optional[str]:
    """The checkout's commit, with "+dirty" for uncommitted changes; None outside a git checkout of
    this package (an installed copy inside some other repository gets None, not that one's commit)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0 or not sha.stdout.strip():
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _installed_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


#: Settings and environment entries that change the numbers: a run resumes from ``results.json``
#: only when all of them are equal (the presets and ranks may differ: rows are kept per preset).
RESUME_SETTINGS = ("steps", "base_steps", "batch_size", "lr", "base_lr", "gamma", "target_modules", "n_train",
                   "n_test", "eval_every", "seed", "quick", "model", "quantize")
RESUME_ENVIRONMENT = ("device", "device_name", "backend", "torch", "transformers", "tiedlora_kernels",
                      "tiedlora_kernels_source", "bitsandbytes")


def _run_key(settings: dict, environment: dict) -> dict:
    return {"settings": {k: settings.get(k) for k in RESUME_SETTINGS},
            "environment": {k: environment.get(k) for k in RESUME_ENVIRONMENT}}


def _previous_results(out: Path, key: dict, log) -> Optional[dict]:
    """The results already in ``out`` when they were made with ``key``, else ``None`` (with a note)."""
    path = out / "results.json"
    if not path.exists():
        return None
    try:
        prev = json.loads(path.read_text())
        prev_key = _run_key(prev["settings"], prev["environment"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"tiedlora demo: not resuming: {path} is unreadable ({e}); starting over")
        return None
    if prev_key != key:
        diff = [f"{part}.{k}: {prev_key[part][k]!r} -> {key[part][k]!r}" for part in key for k in key[part]
                if prev_key[part][k] != key[part][k]]
        log(f"tiedlora demo: not resuming from {path}: it was made with other settings ({'; '.join(diff)}); "
            "starting over")
        return None
    return prev


def _base_checkpoint(out: Path) -> Path:
    return out / "base_model.safetensors"


def _load_base(model: torch.nn.Module, out: Path, key: dict) -> Optional[list[float]]:
    """Load the pretrained base model an earlier run with the same ``key`` saved in ``out``.
    Returns its pretraining losses, or ``None`` (nothing loaded) when there is no such file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _base_checkpoint(out)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("run_key") != json.dumps(key, sort_keys=True):
            return None
        model.load_state_dict(load_file(str(path), device=str(next(model.parameters()).device)))
        return json.loads(meta.get("pretrain_bits", "[]"))
    except (OSError, ValueError, RuntimeError):
        return None


def _save_base(model: torch.nn.Module, out: Path, key: dict, losses: list[float]) -> None:
    """Save the pretrained base model (written to a temporary file, then renamed: never half a file)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    path = _base_checkpoint(out)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"run_key": json.dumps(key, sort_keys=True), "pretrain_bits": json.dumps(losses)})
    os.chmod(tmp, usual_mode(0o666))  # safetensors writes 0600
    os.replace(tmp, path)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Inside, SIGTERM (``timeout``, a job scheduler) raises KeyboardInterrupt like Ctrl-C does.
    Yields a dict whose ``"signal"`` is the signal number that arrived (None: Ctrl-C or none)."""
    state: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        state["signal"] = signum
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, old)


def _load_pretrained(name: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model.to(device), HFTokenizer(tok)


def _replot(out: Path, plot: bool) -> dict:
    path = out / "results.json"
    if not path.exists():
        raise SystemExit(f"tiedlora demo --replot: {path} does not exist")
    results = json.loads(path.read_text())
    written = report.write_outputs(results, out, plot=plot, json_too=False)
    print(report.text_table(results))
    print(f"tiedlora demo: rewrote {', '.join(str(p) for p in written)} from {path}", file=sys.stderr, flush=True)
    return results


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo as ``args`` say; write the outputs; return the results dict.

    Writes ``results.json`` / ``results.md`` after every preset and resumes from them (see the
    module docstring). On Ctrl-C or SIGTERM it writes what was done and raises ``SystemExit``
    with status 130 (SIGINT) or 143 (SIGTERM).
    """
    t_start = time.perf_counter()
    out = Path(args.out)
    if getattr(args, "replot", False):
        return _replot(out, plot=not args.no_plot)
    quick = args.quick
    size = {k: v[1] if quick else v[0] for k, v in SIZES.items()}
    steps = args.steps if args.steps is not None else size["steps"]
    base_steps = args.base_steps if args.base_steps is not None else size["base_steps"]
    n_train = args.n_train if args.n_train is not None else size["n_train"]
    n_test = args.n_test if args.n_test is not None else size["n_test"]
    batch_size = args.batch_size if args.batch_size is not None else size["batch_size"]
    presets = list(dict.fromkeys(args.presets)) if args.presets is not None else list(PRESETS)  # each once
    ranks = list(dict.fromkeys(args.ranks or []))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"tiedlora demo: unknown presets {unknown}; expected some of {list(PRESETS)}")
    if not ranks or any(r < 1 for r in ranks):
        raise SystemExit(f"tiedlora demo: --ranks must be positive integers, got {args.ranks}")
    if steps < 1 or batch_size < 1 or n_train < 1 or n_test < 1:
        raise SystemExit("tiedlora demo: --steps, --batch-size, --n-train and --n-test must be >= 1")
    eval_every = args.eval_every if args.eval_every is not None else max(1, steps // 5)
    target = args.target_modules
    if target != "all-linear" and ("," in target or re.fullmatch(r"\w+", target)):  # names, not a regex
        target = [t for t in target.split(",") if t]
    _refuse_bad_settings(args, presets, ranks, target, quick)
    device = _device(args.device)
    progress = not args.no_progress
    log_every = getattr(args, "log_every", 10.0)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    lr_of = {p: args.lr if args.lr is not None else PRESET_LR.get(p, DEFAULT_LR) for p in presets}

    settings = {"presets": presets, "ranks": ranks, "steps": steps, "base_steps": 0 if args.model else base_steps,
                "batch_size": batch_size, "lr": args.lr, "preset_lr": lr_of, "base_lr": args.base_lr,
                "gamma": args.gamma, "target_modules": target, "n_train": n_train, "n_test": n_test,
                "acc_examples": n_test, "eval_train_examples": min(n_train, n_test), "eval_every": eval_every,
                "seed": args.seed, "quick": quick, "model": args.model, "model_desc": None,
                "quantize": getattr(args, "quantize", "none"),
                "loss": "response tokens only, bits per token"}
    environment = _environment(device)
    key = _run_key(settings, environment)
    previous = None if args.fresh else _previous_results(out, key, log)
    prev = previous or {}
    # Rows already done under the same key, by (preset, rank). Rows of presets or ranks not asked
    # for this time are kept too; a row whose preset now gets another learning rate is redone.
    done = {(r["preset"], r["rank"]): r for r in prev.get("rows", [])
            if r["preset"] in PRESETS and (r["preset"] not in lr_of or r.get("lr") == lr_of[r["preset"]])}
    wanted = [(preset, rank) for rank in ranks for preset in presets]
    todo = [k for k in wanted if k not in done]
    if previous is not None:
        log(f"tiedlora demo: resuming from {out / 'results.json'}: {len(wanted) - len(todo)} of {len(wanted)} "
            f"presets already done (--fresh starts over)")
    seconds_before = prev.get("seconds_total", 0.0)
    sessions = prev.get("sessions", 1) + 1 if previous is not None else 1
    state = {"baseline": prev.get("baseline"), "base_losses": prev.get("base_pretrain_bits", [])}

    def assemble(status: str) -> dict:
        order = {p: i for i, p in enumerate(PRESETS)}
        rows = sorted(done.values(), key=lambda r: (r["rank"], order.get(r["preset"], len(order))))
        missing = [f"{p} r={r}" for p, r in wanted if (p, r) not in done]
        return {"status": status, "missing": missing, "settings": settings, "environment": environment,
                "baseline": state["baseline"], "base_pretrain_bits": state["base_losses"], "rows": rows,
                "seconds_total": seconds_before + time.perf_counter() - t_start, "sessions": sessions}

    interrupted = None
    with _sigterm_as_interrupt() as caught:
        try:
            torch.manual_seed(args.seed)
            if args.model:
                model, tok = _load_pretrained(args.model, device)
                settings["model_desc"] = (f"{args.model} ({sum(p.numel() for p in model.parameters()):,} "
                                          "parameters, pretrained)")
            else:
                tok = CharTokenizer()
                hidden, layers, intermediate = MODEL_SHAPE[1 if quick else 0]
                model = build_tiny_llama(tok.vocab_size, hidden=hidden, layers=layers, intermediate=intermediate,
                                         seed=args.seed).to(device)
                n_params = sum(p.numel() for p in model.parameters())
                c = model.config
                settings["model_desc"] = (f"tiny LLaMA ({c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                                          f"{n_params:,} parameters, char tokenizer) pretrained {base_steps} steps "
                                          "on the embedded base corpus")
                loaded = None if args.fresh else _load_base(model, out, key)
                if loaded is not None:
                    state["base_losses"] = loaded
                    log(f"tiedlora demo: reusing the pretrained base model {_base_checkpoint(out)}")
                else:
                    stream = torch.tensor(tok.encode(base_corpus(seed=args.seed)), dtype=torch.long)
                    log(f"tiedlora demo: pretraining the base model ({n_params:,} parameters) for {base_steps} "
                        f"steps on {device}")
                    state["base_losses"] = pretrain(model, stream, steps=base_steps, batch_size=32, seq_len=128,
                                                    lr=args.base_lr, seed=args.seed, device=device,
                                                    progress=progress, log_every=log_every)
                    _save_base(model, out, key, state["base_losses"])

            if settings["quantize"] != "none":
                model = quantize_model(model, settings["quantize"], device)
                settings["model_desc"] += f", base quantized to {settings['quantize']} (bitsandbytes)"
                log(f"tiedlora demo: adapting a {settings['quantize']} bitsandbytes copy of the base model")

            train = encode_task(word_problems(n_train, seed=args.seed, split="train"), tok)
            test = encode_task(word_problems(n_test, seed=args.seed, split="test"), tok)
            eval_train_limit = min(n_train, n_test)
            gen = torch.Generator().manual_seed(args.seed)
            # One batch order for every preset and rank, so the comparison is like for like.
            batches = [torch.randint(0, n_train, (batch_size,), generator=gen).tolist() for _ in range(steps)]

            initial_train = task_loss_bits(model, train, tok.pad_id, device, limit=eval_train_limit)
            if state["baseline"] is None:
                state["baseline"] = {"train_bits": initial_train,
                                     "test_bits": task_loss_bits(model, test, tok.pad_id, device),
                                     "accuracy": task_accuracy(model, test, tok, device)[0]}
            baseline = state["baseline"]
            log(f"tiedlora demo: base model before adaptation: test {baseline['test_bits']:.3f} bits/token, "
                f"exact match {100 * baseline['accuracy']:.1f}%")
            report.write_outputs(assemble("partial"), out, plot=False)

            lora_counts: dict[int, int] = {}
            t_presets = time.perf_counter()
            for i, (preset, rank) in enumerate(todo):
                if rank not in lora_counts:
                    lora_counts[rank] = lora_parameter_count(model, rank, target)
                cfg = TiedLoRAConfig(rank=rank, preset=preset, target_modules=target, gamma=args.gamma,
                                     seed=args.seed)
                n_done = len(wanted) - len(todo) + i
                desc = f"[{n_done + 1}/{len(wanted)}] {preset} r={rank}"
                torch.manual_seed(args.seed)
                res = adapt(model, cfg, train=train, test=test, tok=tok, batches=batches, lr=lr_of[preset],
                            device=device, eval_train_limit=eval_train_limit, eval_test_limit=n_test,
                            acc_limit=n_test, eval_every=eval_every, initial_train_bits=initial_train,
                            progress=progress, log_every=log_every, desc=desc)
                row = asdict(res)
                row["p_of_lora"] = 100.0 * res.trainable / lora_counts[rank]
                row["lora_trainable"] = lora_counts[rank]
                done[(preset, rank)] = row
                report.write_outputs(assemble("complete" if i + 1 == len(todo) else "partial"), out, plot=False)
                left = len(todo) - i - 1
                eta = (time.perf_counter() - t_presets) / (i + 1) * left
                log(f"  {desc} {res.trainable:>8,} params ({row['p_of_lora']:.1f}% of LoRA), "
                    f"train {res.final_train_bits:.3f} / test {res.test_bits:.3f} bits/token, "
                    f"exact match {100 * res.accuracy:.1f}%  [{res.seconds:.1f} s"
                    + (f"; {left} to go, about {eta:.0f} s]" if left else "]"))
        except KeyboardInterrupt:
            interrupted = caught["signal"] or signal.SIGINT

    results = assemble("interrupted" if interrupted else "complete")
    if interrupted and results["baseline"] is None:
        log("tiedlora demo: interrupted before the base model was evaluated; nothing to write")
        raise SystemExit(128 + int(interrupted))
    print(report.text_table(results))
    written = report.write_outputs(results, out, plot=not args.no_plot)
    if interrupted:
        log(f"tiedlora demo: interrupted ({signal.Signals(interrupted).name}) with {len(results['missing'])} of "
            f"{len(wanted)} presets not done; wrote {', '.join(str(p) for p in written)}. "
            "Run the same command again to resume.")
        raise SystemExit(128 + int(interrupted))
    log(f"tiedlora demo: wrote {', '.join(str(p) for p in written)} in "
        f"{time.perf_counter() - t_start:.0f} s")
    return results


def _refuse_bad_settings(args, presets: list, ranks: list, target, quick: bool) -> None:
    """Learning rates, and every (preset, rank) config built and, on the built-in model, injected into
    a meta-device copy: a bad ``--gamma`` or a rank the layers cannot take fails at once, not after
    minutes of pretraining (a ``--model`` is only seen once loaded: its layers are checked then)."""
    for flag, lr in (("--lr", args.lr), ("--base-lr", args.base_lr)):
        if lr is not None and not (math.isfinite(lr) and lr > 0):  # inf trained to NaN
            raise SystemExit(f"tiedlora demo: {flag} must be a finite positive number, got {lr}")
    skeleton = None
    if not args.model:
        hidden, layers, intermediate = MODEL_SHAPE[1 if quick else 0]
        with torch.device("meta"):
            skeleton = build_tiny_llama(CharTokenizer().vocab_size, hidden=hidden, layers=layers,
                                        intermediate=intermediate)
    for rank in ranks:
        for preset in presets:
            try:
                cfg = TiedLoRAConfig(rank=rank, preset=preset, target_modules=target, gamma=args.gamma, seed=args.seed)
                if skeleton is not None:
                    inject(copy.deepcopy(skeleton), cfg)
            except (ValueError, TypeError) as e:
                raise SystemExit(f"tiedlora demo: {preset} r={rank}: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` as the ``demo`` subcommand's flags and run it."""
    p = argparse.ArgumentParser(prog="tiedlora demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_demo(p.parse_args(argv))
