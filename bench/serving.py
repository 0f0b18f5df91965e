"""Many adapters in one batch (issue 14): ``python -m bench.serving [--out DIR] [--max-minutes M]``.

The end-to-end benchmark's model (``bench/e2e.py``'s GPU_MODEL: a 16-layer LLaMA, hidden 2048, bf16,
every linear layer of the decoder adapted, rank 16) serves a batch of 256 sequences x 128 tokens
(``prefill``) and a decode-shaped step (``decode``: one new token per sequence, 256 rows, no KV
cache: every adapted layer sees exactly a decode step's shapes), each sequence with its own adapter
from an :class:`~tiedlora_kernels.serving.AdapterBank` of up to 1024, the batch drawing on 1, 16, 256
or 1024 distinct adapters, fewest first, the bank filled as far as each needs (filling all 1024 is
~30 s of host time on the H200's machine; a short share would spend it before its first timing).
A batch of 256 sequences holds at most 256 adapters: for 1024
the same tokens come as 1024 sequences of 32, and decode as 1024 rows, and ``base`` and ``one`` are
timed on that shape too). Two kinds of adapters:

- ``shared``: VeRA-style, one seeded frozen A and B, per-adapter u and v (the shared route: one
  launch per layer, rows gather their u and v);
- ``full``: LoRA, every adapter its own A and B (the segmented route).

Adapters are in the model's dtype everywhere (bank and ``one`` alike: the same kernels, the same
factor bytes).

Against the same batch: ``base`` (the model without adapters), ``one`` (the model with one adapter
of the kind, the single-adapter path) and ``loop`` (the naive way: for each distinct adapter of the
batch, load it into the model, copying its tensors into the adapter parameters, and run its rows).
Targets on a GPU (issue 14): bank of 1024 shared adapters within 1.10x of ``one``, 1024 full within
1.5x, both at least 10x faster than ``loop``. Every bank config is first checked against the loop
on the same batch (the last hidden state, relative error); a failure withdraws the speed claims.

Timing: the whole forward (``model.model``, the decoder: the LM head's GEMM is the same in every
config), CUDA events around each call after warm-up, median of the reps; the bank's ``use`` (its
one host sync, the ids' validation) is inside the timed call, as a request pays it. Without CUDA a
smoke run (tiny model, 4 sequences, 4 adapters, fp32, torch route) checks the harness: no speed
claims. Writes ``results.json`` (device, versions, command, commit, every median, ratios, checks,
verdicts) after every record, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from tiedlora_kernels import TiedLoRAConfig, adapted_layers, inject
from tiedlora_kernels.serving import AdapterBank, LayerAdapter

from .claims import apply_tests_exit_code, measured_commit, tests_exit_code
from .e2e import GPU_MODEL, SMOKE_MODEL
from .run import Stopped, stop_on_signal

#: (sequences, tokens per sequence) of each phase, GPU and smoke.
PHASES = {"gpu": {"prefill": (256, 128), "decode": (256, 1)}, "smoke": {"prefill": (4, 8), "decode": (4, 1)}}
#: Distinct adapters the batch draws on, in the order measured, and the bank's capacity (its slots
#: loaded as far as the distinct count being measured needs).
DISTINCT = {"gpu": (1, 16, 256, 1024), "smoke": (1, 2, 4, 8)}
CAPACITY = {"gpu": 1024, "smoke": 8}
RANK = {"gpu": 16, "smoke": 4}
KINDS = {"shared": "vera", "full": "lora"}
#: Issue 14's targets: (kind, what, bound) at the most distinct adapters measured, prefill and decode alike.
TARGETS = [("shared", "bank / one", 1.10, "<="), ("full", "bank / one", 1.5, "<="),
           ("shared", "loop / bank", 10.0, ">="), ("full", "loop / bank", 10.0, ">=")]
#: Relative error of the bank's last hidden state against the loop's (bf16 activations; fp32 in smoke).
CHECK_TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}


def environment(device: str, mode: str, argv: list[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import transformers

    meta = dict(mode=mode, speed_claims=device == "cuda", command="python -m bench.serving " + shlex.join(argv),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                python=platform.python_version(), torch=torch.__version__, triton=triton_version,
                transformers=transformers.__version__, cuda=torch.version.cuda, host=platform.node(),
                backend=os.environ.get("TIEDLORA_BACKEND", "auto"))
    meta["commit"], meta["dirty"] = measured_commit()
    if device == "cuda":
        meta["device"] = torch.cuda.get_device_name()
        meta["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    else:
        meta["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return meta


def timed(fn: Callable[[], object], device: str, reps: int, warmup: int) -> dict:
    """Median / min / max ms of ``fn`` after ``warmup`` calls: CUDA events around each call (one sync
    at the end), wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in ev:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in ev]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), reps=reps)


def random_adapter(host, kind: str, rank: int, gen: torch.Generator) -> dict:
    """layer name -> LayerAdapter of a random adapter of ``kind`` for the injected ``host``: ``shared``
    keeps the host's seeded frozen A and B (VeRA) and draws u, v; ``full`` draws its own A and B."""
    out = {}
    for name, layer in adapted_layers(host):
        K, N, dev = layer.in_features, layer.out_features, layer.weight.device
        rnd = lambda *s: torch.randn(*s, generator=gen, device=dev)  # noqa: E731
        if kind == "shared":
            A, B, _, _, _ = layer.op_tensors()
            out[name] = LayerAdapter(A, B, 0.1 + 0.02 * rnd(rank), 0.05 * rnd(N), None, layer.scaling)
        else:
            out[name] = LayerAdapter(rnd(rank, K) / math.sqrt(K), 0.02 * rnd(N, rank), None, None, None,
                                     layer.scaling)
    return out


def load_slot(host, bank: AdapterBank, slot: int) -> None:
    """The naive loop's "load adapter": copy the slot's tensors into the host's own adapter parameters."""
    with torch.no_grad():
        for name, layer in adapted_layers(host):
            s = bank._layers[name]
            r = layer.rank
            if layer.adapter_u is not None:
                layer.adapter_u.copy_(s.U[slot, :r] / layer.scaling)
            if layer.adapter_v is not None:
                layer.adapter_v.copy_(s.V[slot])
            # per slot (S, R, K) / (S, N, R), or one shared by every slot (R, K) / (N, R)
            layer.factors.A.copy_(s.A[slot, :r] if s.A.dim() == 3 else s.A[:r])
            layer.factors.B.copy_(s.B[slot, :, :r] if s.B.dim() == 3 else s.B[:, :r])


def batch_shape(shape: tuple[int, int], distinct: int) -> tuple[int, int]:
    """(sequences, tokens) of a phase's batch drawing on ``distinct`` adapters: the phase's own, or as
    many sequences as adapters with the same tokens in all (at least one token each)."""
    b, t = shape
    return (b, t) if distinct <= b else (distinct, max(1, b * t // distinct))


def batch_ids(n_seq: int, distinct: int, loaded: int, gen: torch.Generator) -> list[int]:
    """One slot per sequence drawing on ``distinct`` of the ``loaded`` adapters (at most ``n_seq`` of
    them in the batch)."""
    pool = torch.randperm(loaded, generator=gen)[:distinct].tolist()
    return [pool[i % len(pool)] for i in torch.randperm(n_seq, generator=gen).tolist()]


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default bench/results/serving-<date>-<device> on CUDA, "
                         "bench/results/serving-smoke-cpu on a CPU)")
    ap.add_argument("--smoke", action="store_true", help="the CPU smoke sizes, also on a GPU")
    ap.add_argument("--max-minutes", type=float, default=6.0, help="no new measurement starts after this budget")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    ap.add_argument("--phases", default="prefill,decode", help="comma-separated subset of prefill,decode")
    ap.add_argument("--no-loop", action="store_true", help="skip the naive loop (its timing is the slow part)")
    ap.add_argument("--tests-exit-code", type=tests_exit_code, default=None,
                    help="exit code of the GPU tests run before (nonzero withdraws the speed claims)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = "smoke" if args.smoke or device != "cuda" else "gpu"
    mode = "gpu" if size == "gpu" else f"smoke-{device}"
    if size == "smoke":
        print("SMOKE MODE: tiny model and batch. These timings are NOT speed claims.", file=sys.stderr)
    deadline = time.monotonic() + 60 * args.max_minutes
    meta = environment(device, mode, argv)
    meta["speed_claims"] = size == "gpu"
    apply_tests_exit_code(meta, args.tests_exit_code)
    if args.out is None:
        tag = "smoke-" + device if size == "smoke" else f"{datetime.date.today()}-{meta['device'].replace(' ', '_')}"
        args.out = Path(__file__).resolve().parent / "results" / f"serving-{tag}"
    kinds = [k for k in args.kinds.split(",") if k]
    phases = {p: PHASES[size][p] for p in args.phases.split(",") if p}
    shape = SMOKE_MODEL if size == "smoke" else GPU_MODEL
    dtype = torch.float32 if size == "smoke" else torch.bfloat16
    rank, capacity = RANK[size], CAPACITY[size]
    reps, warmup, loop_reps = (5, 2, 2) if size == "gpu" else (3, 1, 1)
    meta.update(model=dict(shape, dtype=str(dtype).removeprefix("torch.")), rank=rank, capacity=capacity,
                phases={p: dict(sequences=b, tokens=t) for p, (b, t) in phases.items()},
                distinct=list(DISTINCT[size]), factor_dtype=str(dtype).removeprefix("torch."),
                timing=f"median of {reps} calls after {warmup} warm-up (loop: {loop_reps} after 1); "
                       + ("CUDA events" if device == "cuda" else "wall clock"))
    result = dict(meta=meta, records=[], checks=[], ratios={}, targets=[])

    def save():
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out / "results.json")

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    seq_max = max(t for _, t in phases.values())
    with torch.device(device):
        base = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=max(seq_max, 8))).to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    host_gen = torch.Generator().manual_seed(0)
    inputs: dict = {}

    def ids_of(batch: tuple[int, int]) -> torch.Tensor:
        if batch not in inputs:
            inputs[batch] = torch.randint(0, shape["vocab_size"], batch, device=device, generator=gen)
        return inputs[batch]

    def record(**rec):
        result["records"].append(rec)
        save()
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}), file=sys.stderr)

    def out_of_time() -> bool:
        return time.monotonic() > deadline

    def measure_all():
        timed_base: set = set()
        with torch.no_grad():
            for kind in kinds:
                t0 = time.perf_counter()
                adapter_dtype = str(dtype).removeprefix("torch.")
                host = inject(copy.deepcopy(base), TiedLoRAConfig(rank=rank, preset=KINDS[kind],
                                                                  adapter_dtype=adapter_dtype))
                bank = AdapterBank(host, capacity=capacity, rank=rank, factor_dtype=dtype)
                setup_s = meta.setdefault("bank_setup_s", {})
                setup_s[kind] = time.perf_counter() - t0
                timed_one: set = set()
                # The bank filled as far as each distinct count needs: a full bank is ~4 M small ops.
                for n in DISTINCT[size]:
                    for phase, phase_shape in phases.items():
                        batch = batch_shape(phase_shape, n)
                        where = dict(phase=phase, sequences=batch[0], tokens=batch[1])
                        if out_of_time():
                            record(**where, kind=kind, config="bank", distinct=n, skipped="out of time")
                            continue
                        if len(bank) < n:
                            t0 = time.perf_counter()
                            while len(bank) < n:
                                bank.add(random_adapter(host, kind, rank, gen), name=f"{kind}{len(bank)}")
                            setup_s[kind] += time.perf_counter() - t0
                            meta.setdefault("bank_bytes", {})[kind] = bank.nbytes()
                            meta.setdefault("routes", {})[kind] = sorted(set(bank.routes().values()))
                        ids = ids_of(batch)
                        if (phase, batch) not in timed_base:
                            timed_base.add((phase, batch))
                            record(**where, config="base", **timed(lambda: base.model(ids), device, reps, warmup))
                        if (phase, batch) not in timed_one:  # "one": the single-adapter path, holding slot 0
                            timed_one.add((phase, batch))
                            load_slot(host, bank, 0)
                            record(**where, kind=kind, config="one",
                                   **timed(lambda: host.model(ids), device, reps, warmup))
                        slots = batch_ids(ids.shape[0], n, len(bank), host_gen)
                        adapter_ids = torch.tensor(slots, device=device)

                        def bank_forward():
                            with bank.use(adapter_ids):
                                return host.model(ids).last_hidden_state

                        groups = [(a, torch.tensor([i for i, s in enumerate(slots) if s == a], device=device))
                                  for a in sorted(set(slots))]

                        def loop_forward():
                            out = None
                            for a, rows in groups:
                                load_slot(host, bank, a)
                                h = host.model(ids[rows]).last_hidden_state
                                out = h.new_empty((ids.shape[0], *h.shape[1:])) if out is None else out
                                out[rows] = h
                            return out

                        # Correctness first: the bank against the loop on this batch.
                        err = _rel_err(bank_forward(), loop_forward())
                        ok = err <= CHECK_TOL[dtype]
                        result["checks"].append(dict(phase=phase, kind=kind, distinct=n, rel_err=err, ok=ok))
                        if not ok:
                            meta["speed_claims"] = False
                            meta["no_claims_reason"] = f"the bank differs from the loop ({phase}, {kind}, {n}: {err:.2e})"
                        record(**where, kind=kind, config="bank", distinct=n, in_batch=len(set(slots)),
                               **timed(bank_forward, device, reps, warmup))
                        if not args.no_loop and not out_of_time():
                            record(**where, kind=kind, config="loop", distinct=n, in_batch=len(set(slots)),
                                   **timed(loop_forward, device, loop_reps, 1))
                host = bank = None  # release this kind before the next is built
                if device == "cuda":
                    torch.cuda.empty_cache()

    old_term = signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        measure_all()
    except (KeyboardInterrupt, Stopped) as e:  # gpu_session.sh's SIGINT at the phase's allowance
        meta["truncated"] = f"interrupted ({e or 'SIGINT'}) after {len(result['records'])} records"
    finally:
        signal.signal(signal.SIGTERM, old_term)
    skipped = sum("skipped" in r for r in result["records"])
    if skipped and "truncated" not in meta:
        meta["truncated"] = f"out of time (--max-minutes {args.max_minutes}): {skipped} measurements skipped"
    result["ratios"] = ratios(result["records"])
    if meta["speed_claims"]:
        result["targets"] = verdicts(result["ratios"], max(DISTINCT[size]))
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second interrupt must not cut the last write
    try:
        save()
    finally:
        signal.signal(signal.SIGINT, old_int)
    print(markdown(result))
    print(f"wrote {args.out / 'results.json'}", file=sys.stderr)
    return 0


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def ratios(records: list[dict]) -> dict:
    """phase -> kind -> distinct -> {bank / one, bank / base, loop / bank, one / base}, each bank
    time against ``one`` and ``base`` on the same batch shape."""
    def ms(**key):
        for r in records:
            if all(r.get(k) == v for k, v in key.items()) and "median_ms" in r:
                return r["median_ms"]
        return None

    out: dict = {}
    for r in records:
        if r.get("config") != "bank" or "median_ms" not in r:
            continue
        phase, kind, n = r["phase"], r["kind"], r["distinct"]
        batch = dict(sequences=r["sequences"], tokens=r["tokens"])
        one, base = ms(phase=phase, kind=kind, config="one", **batch), ms(phase=phase, config="base", **batch)
        loop = ms(phase=phase, kind=kind, config="loop", distinct=n)
        bank = r["median_ms"]
        out.setdefault(phase, {}).setdefault(kind, {})[str(n)] = {
            "bank / one": bank / one if one else None, "bank / base": bank / base if base else None,
            "loop / bank": loop / bank if loop else None, "one / base": one / base if one and base else None}
    return out


def verdicts(rat: dict, target_distinct: int) -> list[dict]:
    """Issue 14's targets at the most distinct adapters measured per phase and kind (``distinct``
    says which); judged (``met``) only at ``target_distinct``, the count the targets are set at: a run
    cut short before it reports its largest figure with ``met`` None."""
    out = []
    for phase in rat:
        for kind, what, bound, cmp in TARGETS:
            measured = rat[phase].get(kind, {})
            largest = max(measured, key=int, default=None)
            val = measured[largest].get(what) if largest is not None else None
            judged = val is not None and int(largest) == target_distinct
            met = (val <= bound if cmp == "<=" else val >= bound) if judged else None
            out.append(dict(phase=phase, kind=kind, figure=what, distinct=None if largest is None else int(largest),
                            value=val, target=f"{cmp} {bound}", met=met))
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Many adapters in one batch ({meta['mode']}, {meta['device']})", "",
             f"`{meta['command']}`, torch {meta['torch']}, triton {meta['triton']}, commit {meta.get('commit')}", "",
             "| phase | kind | distinct | batch | bank ms | one ms | base ms | loop ms | bank / one | loop / bank |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    recs = result["records"]

    def ms(**key):
        r = next((r for r in recs if all(r.get(k) == v for k, v in key.items()) and "median_ms" in r), None)
        return r["median_ms"] if r else None

    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for phase, kinds in result["ratios"].items():
        for kind, by_n in kinds.items():
            for n, rat in by_n.items():
                n = int(n)
                rec = next(r for r in recs if r.get("config") == "bank" and r.get("phase") == phase
                           and r.get("kind") == kind and r.get("distinct") == n and "median_ms" in r)
                batch = dict(sequences=rec["sequences"], tokens=rec["tokens"])
                bank = rec["median_ms"]
                one, base = ms(phase=phase, kind=kind, config="one", **batch), ms(phase=phase, config="base", **batch)
                lines.append(f"| {phase} | {kind} | {n} | {batch['sequences']} x {batch['tokens']} | {fmt(bank)} | "
                             f"{fmt(one)} | {fmt(base)} | "
                             f"{fmt(ms(phase=phase, kind=kind, config='loop', distinct=n))} | "
                             f"{fmt(rat['bank / one'])} | {fmt(rat['loop / bank'])} |")
    bad = [c for c in result["checks"] if not c["ok"]]
    lines += ["", f"Checks (bank vs loop, last hidden state): {len(result['checks']) - len(bad)} ok, {len(bad)} failed"
              + (f": {bad}" if bad else "")]
    if result["targets"]:
        lines += ["", "| phase | target | value | met |", "|---|---|---:|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['phase']} | {t['kind']} {t['figure']} {t['target']} at {t['distinct']} distinct | "
                         f"{fmt(t['value'])} | {t['met']} |")
    elif not meta["speed_claims"]:
        lines += ["", "No speed claims: " + meta.get("no_claims_reason", "smoke mode")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
