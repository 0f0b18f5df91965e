"""``python -m tiedlora_kernels serve``: several adapters of one small model, each trained on its own
embedded task, answer one mixed batch in one forward, and every row matches its adapter run alone.

Steps: (1) build a tiny LLaMA (character tokenizer) and pretrain it briefly on the embedded base
corpus; (2) train one adapter per task, each with its own preset and rank (:data:`TASKS`: sums with
TL6, a name's pronoun with LoRA, opposites and plurals with VeRA), and save each with
``save_adapter``; (3) load the files into an :class:`~tiedlora_kernels.serving.AdapterBank`; (4) one
batch holding prompts of every task and one row on the base model alone, each row with its adapter:
one forward (logits) and one ``generate`` call; (5) the same rows one by one, each with its adapter
loaded the usual way (``load_adapter`` into a copy of the base model): the logits and the generated
text must agree. Then the two VeRA adapters alone in a second bank: their factors are the same, so
every layer takes the shared route (one launch, the cost of one adapter).

Prints a table (task, preset, prompt, answer in the batch, answer alone, max |logit difference|) and
exits with status 1 if any row differs. CPU by default and quick (about a minute on 2 cores);
``--kernels`` runs the bank on the Triton kernels (on a CPU through the Triton interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

#: Model and training sizes: default, and ``--tiny`` (the test suite's smoke run).
SIZES = {"hidden": (64, 32), "layers": (2, 1), "intermediate": (172, 64), "base_steps": (60, 2),
         "adapter_steps": (150, 2), "batch_size": (32, 4), "examples": (400, 16)}


#: Word pairs of the ``opposite`` task.
OPPOSITES = (("big", "small"), ("old", "new"), ("hot", "cold"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
             ("day", "night"), ("yes", "no"))


def _sum(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"Sum: {a} + {b}\n", f"{a + b}\n"


def _pronoun(rng: random.Random) -> tuple[str, str]:
    from .data import NAMES, SHE

    name = rng.choice(NAMES)
    return f"Pronoun: {name}\n", f"{'She' if name in SHE else 'He'}\n"


def _opposite(rng: random.Random) -> tuple[str, str]:
    a, b = rng.choice(OPPOSITES)
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    return f"Opposite: {a}\n", f"{b}\n"


def _plural(rng: random.Random) -> tuple[str, str]:
    from .data import OBJECTS

    one, many = rng.choice(OBJECTS)
    return f"Plural: {one}\n", f"{many}\n"


#: task -> (preset, rank, generator of (prompt, response)): small closed tasks an adapter learns in a
#: few dozen steps, generated in code. The two VeRA adapters share their seeded frozen A and B (one
#: config seed and rank), so a bank holding only them serves every layer on the shared route; their
#: higher rank (VeRA's usual choice) is zero-padded onto the others in the mixed bank.
TASKS: dict[str, tuple[str, int, Callable[[random.Random], tuple[str, str]]]] = {
    "sum": ("tl6", 8, _sum),
    "pronoun": ("lora", 8, _pronoun),
    "opposite": ("vera", 32, _opposite),
    "plural": ("vera", 32, _plural),
}
#: Learning rates per preset (VeRA trains only u and v: larger steps).
LR = {"tl6": 2e-2, "lora": 2e-2, "vera": 6e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated tasks (default: {','.join(TASKS)})")
    p.add_argument("--base-steps", type=int, default=None, help="base pretraining steps (default 60)")
    p.add_argument("--steps", type=int, default=None, help="training steps per adapter (default 150)")
    p.add_argument("--rows", type=int, default=2, help="prompts per task in the mixed batch (default 2)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per prompt (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--kernels", action="store_true",
                   help="serve the mixed batch on the Triton kernels (TIEDLORA_BACKEND=triton; on a CPU through "
                        "the interpreter: TRITON_INTERPRET=1 python -m tiedlora_kernels serve --kernels)")
    p.add_argument("--out", type=Path, default=Path("serve_out"),
                   help="directory for the trained adapters (default ./serve_out)")
    p.add_argument("--tiny", action="store_true", help="a smoke run: tiny model, a few steps (the test suite's)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")


def _train_adapter(base, config, examples, tok, *, steps: int, batch_size: int, lr: float, seed: int, device,
                   progress: bool, desc: str):
    """A copy of ``base`` with ``config`` injected and trained on ``examples`` (prompt, response)."""
    from ..integrations import inject
    from .data import WordProblem
    from .train import Progress, encode_task, train_adapters

    task = encode_task([WordProblem(p, r, 0) for p, r in examples], tok)
    model = inject(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(examples), (batch_size,), generator=gen).tolist() for _ in range(steps)]
    train_adapters(model, task, batches, tok.pad_id, lr=lr, device=device, progress=Progress(steps, desc, progress))
    return model.eval()


def run_serve(args: argparse.Namespace) -> int:
    """Run the serving demo as ``args`` say; print the table. Returns the exit status (0: every row matches)."""
    from ..ops import triton_interpreting

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"tiedlora serve: --device {args.device} but CUDA is not available")
    if args.kernels and torch.device(args.device).type != "cuda" and not triton_interpreting():
        # triton reads it when it is imported, and importing torch imports it: set it before Python starts
        raise SystemExit("tiedlora serve: --kernels on a CPU runs the Triton kernels on the interpreter, which must "
                         "be switched on before Python starts: "
                         "TRITON_INTERPRET=1 python -m tiedlora_kernels serve --kernels")
    from ..config import TiedLoRAConfig
    from ..integrations import inject, load_adapter, save_adapter
    from ..serving import AdapterBank
    from .data import CharTokenizer, base_corpus
    from .train import build_tiny_llama, left_pad, pretrain

    t0 = time.perf_counter()
    tiny = 1 if args.tiny else 0
    size = {k: v[tiny] for k, v in SIZES.items()}
    base_steps = args.base_steps if args.base_steps is not None else size["base_steps"]
    steps = args.steps if args.steps is not None else size["adapter_steps"]
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SystemExit(f"tiedlora serve: unknown tasks {unknown}; expected some of {list(TASKS)}")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:  # one adapter per task, each in the bank under the task's name
        raise SystemExit(f"tiedlora serve: --tasks names {repeated} more than once; name each task once")
    for flag, value in (("--rows", args.rows), ("--new-tokens", args.new_tokens)):
        if value < 1:  # refused now, not by the batch or generate after the training
            raise SystemExit(f"tiedlora serve: {flag} must be >= 1, got {value}")
    device = torch.device(args.device)
    progress = not args.no_progress
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)  # noqa: E731
    torch.manual_seed(args.seed)

    tok = CharTokenizer()
    base = build_tiny_llama(tok.vocab_size, hidden=size["hidden"], layers=size["layers"],
                            intermediate=size["intermediate"], seed=args.seed).to(device)
    stream = torch.tensor(tok.encode(base_corpus(n_chars=100_000, seed=args.seed)), dtype=torch.long)
    log(f"tiedlora serve: pretraining the base model for {base_steps} steps")
    pretrain(base, stream, steps=base_steps, batch_size=16, seq_len=64, lr=3e-3, seed=args.seed, device=device,
             progress=progress)
    base.eval()

    out = Path(args.out)
    dirs, examples = {}, {}
    for i, task in enumerate(tasks):
        preset, task_rank, make = TASKS[task]
        rng = random.Random(f"serve:{task}:{args.seed}")
        examples[task] = [make(rng) for _ in range(size["examples"])]
        # one config seed for every adapter: VeRA's frozen factors are then the same for both VeRA tasks
        config = TiedLoRAConfig(rank=min(task_rank, size["hidden"]), preset=preset, seed=args.seed)
        model = _train_adapter(base, config, examples[task], tok, steps=steps, batch_size=size["batch_size"],
                               lr=LR[preset], seed=args.seed + i, device=device, progress=progress,
                               desc=f"adapter {task} ({preset})")
        dirs[task] = out / task
        save_adapter(model, dirs[task])
        del model

    # The batch: `rows` prompts of every task (fresh draws; the tasks' prompt spaces are small, so they
    # may have been seen in training: what is checked is each row against its adapter alone), interleaved,
    # and one row on the base model.
    rows: list[tuple[Optional[str], str, str]] = []
    for j in range(args.rows):
        for task in tasks:
            rng = random.Random(f"serve-test:{task}:{args.seed}:{j}")
            rows.append((task, *TASKS[task][2](rng)))
    rows.insert(1, (None, *TASKS[tasks[0]][2](random.Random(f"serve-base:{args.seed}"))))
    bos = [tok.bos_id] if tok.bos_id is not None else []
    ids, mask = left_pad([bos + tok.encode(p) for _, p, _ in rows], tok.pad_id, device)
    gen_kw = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_id,
                  eos_token_id=tok.eos_id)

    host = inject(copy.deepcopy(base), TiedLoRAConfig(rank=1, preset="lora"))  # only its layers matter
    bank_rank = max(min(TASKS[t][1], size["hidden"]) for t in tasks)
    bank = AdapterBank(host, capacity=len(tasks), rank=bank_rank)
    slot = {task: bank.add(dirs[task]) for task in tasks}
    adapter_ids = torch.tensor([slot[t] if t else -1 for t, _, _ in rows], device=device)
    routes = sorted(set(bank.routes().values()))
    serving_backend = "triton" if args.kernels else os.environ.get("TIEDLORA_BACKEND", "auto")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded prompts
    t_batch = time.perf_counter()
    with _backend(serving_backend), torch.no_grad(), bank.use(adapter_ids):
        logits = host(ids, attention_mask=mask, position_ids=positions).logits
        batch_gen = host.generate(ids, **gen_kw)
    t_batch = time.perf_counter() - t_batch

    # Each row alone, its adapter loaded the usual way (the single-adapter path, torch reference).
    singles = {t: load_adapter(copy.deepcopy(base), dirs[t]).eval() for t in tasks}
    singles[None] = base
    table, ok = [], True
    width = ids.shape[1]
    with _backend("torch"), torch.no_grad():
        for i, (task, prompt, response) in enumerate(rows):
            model = singles[task]
            keep = mask[i].bool()
            one = ids[i:i + 1, keep]
            alone_logits = model(one).logits[0]
            diff = float((logits[i, keep] - alone_logits).abs().max())
            alone_gen = model.generate(one, **{**gen_kw, "attention_mask": torch.ones_like(one)})[0, one.shape[1]:]
            in_batch = _cut(batch_gen[i, width:].tolist(), tok.eos_id)
            alone_ids = _cut(alone_gen.tolist(), tok.eos_id)
            same = in_batch == alone_ids and diff < 1e-4
            ok &= same
            table.append((task or "(base model)", TASKS[task][0] if task else "-", prompt.strip(),
                          tok.decode(in_batch).strip(), tok.decode(alone_ids).strip(), response.strip(), diff, same))

    # The VeRA adapters alone: one shared A and B, every layer on the shared route.
    vera = [t for t in tasks if TASKS[t][0] == "vera"]
    shared_line = ""
    if len(vera) >= 2:
        vbank = AdapterBank(host, capacity=len(vera), rank=bank_rank)
        vslot = {t: vbank.add(dirs[t]) for t in vera}
        vrows = [i for i, (t, _, _) in enumerate(rows) if t in vera]
        vids = torch.tensor([vslot[rows[i][0]] for i in vrows], device=device)
        with _backend(serving_backend), torch.no_grad(), vbank.use(vids):
            vlogits = host(ids[vrows], attention_mask=mask[vrows], position_ids=positions[vrows]).logits
        vdiff = float((vlogits - logits[vrows]).abs().max())
        vok = set(vbank.routes().values()) == {"shared"} and vdiff < 1e-4
        ok &= vok
        shared_line = (f"VeRA adapters {vera} alone in a bank: routes {sorted(set(vbank.routes().values()))}, "
                       f"max |logit difference| to the mixed batch {vdiff:.1e} ({'ok' if vok else 'MISMATCH'})")

    _print_table(table)
    print(f"\n{len(rows)} rows, {len(tasks)} adapters ({', '.join(f'{t}: {TASKS[t][0]}' for t in tasks)}) and the base "
          f"model in one batch; {len(bank.routes())} adapted layers, routes {routes}; backend "
          f"{serving_backend}; one forward + one generate call in {1e3 * t_batch:.0f} ms")
    if shared_line:
        print(shared_line)
    print("every row matches its adapter run alone" if ok else "MISMATCH: some rows differ from their adapter alone")
    log(f"tiedlora serve: done in {time.perf_counter() - t0:.0f} s; adapters in {out}")
    return 0 if ok else 1


@contextlib.contextmanager
def _backend(name: str):
    """TIEDLORA_BACKEND=name inside the context (the rows alone always run on the torch reference)."""
    before = os.environ.get("TIEDLORA_BACKEND")
    os.environ["TIEDLORA_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TIEDLORA_BACKEND")
        else:
            os.environ["TIEDLORA_BACKEND"] = before


def _cut(ids: list[int], eos: Optional[int]) -> list[int]:
    return ids[:ids.index(eos)] if eos is not None and eos in ids else ids


def _print_table(table) -> None:
    head = ("task", "preset", "prompt", "answer in the batch", "alone", "task's answer", "max |dlogit|",
            "batch = alone")
    cells = [[t, p, _short(q, 38), _short(a, 22), _short(b, 22), _short(e, 22), f"{d:.1e}", "yes" if s else "NO"]
             for t, p, q, a, b, e, d, s in table]
    widths = [max(len(str(r[i])) for r in [head, *cells]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *cells]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print("(checked: each row of the mixed batch answers as its adapter alone does; the task's answer shows "
          "how well that small adapter learned its task, which is not what is checked)")


def _short(s: str, n: int) -> str:
    s = s.replace("\n", " | ")
    return s if len(s) <= n else s[:n - 3] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tiedlora serve", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_serve(p.parse_args(argv))
