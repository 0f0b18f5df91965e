"""Run the benchmark: ``python -m bench [--grid targets|full|smoke] [--out DIR]``.

Side by side, on the same inputs, for every case: the frozen base layer alone (the limit), our
fused op (each forward path), our unfused reference, the best plain-torch recipe (addmm), HF PEFT
LoRA / VeRA, and the merged layer; forward and forward+backward. Writes ``results.json`` (device,
versions, command, commit and every raw figure), ``results.md`` and PNG plots, incrementally, so
a run cut short still leaves its data. Without CUDA only the smoke grid runs (tiny shapes, torch
paths only), labelled as such: no speed claims.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tiedlora_kernels import reference

from .cases import GRIDS, IMPLS, Case, flops, make_inputs, min_bytes

#: Relative error (vs the fp32 reference on the same inputs) above which a record is flagged and left
#: out of every ratio: a fast wrong kernel is not a result.
MAX_REL_ERR = 2e-2


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def time_ms(fn, device: str, grad_to_none=None) -> dict:
    """Median (and 20/80 percentiles) in ms. CUDA: triton's do_bench (warm-up, L2 flushed before
    every rep so caches do not flatter). CPU: wall clock, median of 5 after 2 warm-ups."""
    if device == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                              quantiles=[0.5, 0.2, 0.8])
        return dict(median_ms=med, p20_ms=lo, p80_ms=hi)
    for _ in range(2):
        fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5)
    return dict(median_ms=statistics.median(times), p20_ms=q[0], p80_ms=q[-1])


def saved_activation_bytes(fn, x, params) -> int:
    """Bytes of the distinct storages autograd saves for backward, frozen weights and trained params excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip and not (isinstance(t, torch.nn.Parameter)):
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def measure(case: Case, impl: str, op: str, device: str) -> dict:
    t = make_inputs(case, device)
    builder, _ = IMPLS[impl]
    fn, params = builder(t)
    frozen = [t.W, t.b] + [p for p in (t.A, t.B, t.u, t.v) if p is not None and not p.requires_grad]
    rec = dict(impl=impl, op=op, M=case.M, K=case.K, N=case.N, rank=case.rank, preset=case.preset,
               dtype=str(case.dtype).removeprefix("torch."))
    with torch.no_grad():
        out = fn(t.x)
        if impl not in ("limit", "peft_lora", "peft_vera"):
            ref = reference.tied_lora_linear(t.x.float(), t.W.float(), t.b.float(), t.A, t.B, t.u, t.v, t.scaling)
            rec["rel_err"] = _rel_err(out, ref)
            rec["ok"] = rec["rel_err"] < MAX_REL_ERR
    xs = [t.x] + [torch.randn_like(t.x) for _ in range(2)]  # rotate inputs between calls
    step = iter(range(1 << 62))
    if op == "fwd":
        def run():
            with torch.no_grad():
                return fn(xs[next(step) % 3])
        grads = None
    else:
        for x in xs:
            x.requires_grad_(True)
        G = torch.randn(case.M, case.N, device=device, dtype=case.dtype)

        def run():
            fn(xs[next(step) % 3]).backward(G)
        grads = xs + params
        rec["saved_bytes"] = saved_activation_bytes(fn, xs[0], params + frozen)
    rec.update(time_ms(run, device, grad_to_none=grads))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
    sec = rec["median_ms"] / 1e3
    rec["tflops"] = flops(case, op, impl) / sec / 1e12
    rec["gbps"] = min_bytes(case, op) / sec / 1e9
    return rec


def plan(grid: dict, device: str) -> list[tuple[Case, str, str]]:
    """Every (case, impl, op) of a grid, shape-level impls once per shape."""
    impls = [i for i in IMPLS if device == "cuda" or not i.startswith("ours")]
    jobs = []
    for K, N in grid["KN"]:
        for M in grid["M"]:
            for op in ("fwd", "fwd_bwd"):
                first = Case(M, K, N, grid["rank"][0], grid["preset"][0])
                jobs += [(first, i, op) for i in impls if IMPLS[i][1] == "shape"]
                for r in grid["rank"]:
                    for preset in grid["preset"]:
                        case = Case(M, K, N, r, preset)
                        jobs += [(case, i, op) for i in impls if IMPLS[i][1] is None]
                    for i in impls:
                        owner = IMPLS[i][1]
                        if owner not in (None, "shape"):
                            jobs.append((Case(M, K, N, r, owner), i, op))
    return jobs


def add_ratios(records: list[dict]) -> None:
    """ratio_to_limit and speedup_vs_peft_lora, from medians of the same run and shape."""
    key = lambda r: (r["op"], r["M"], r["K"], r["N"])  # noqa: E731
    limit = {key(r): r["median_ms"] for r in records if r["impl"] == "limit"}
    peft = {(*key(r), r["rank"]): r["median_ms"] for r in records if r["impl"] == "peft_lora"}
    for r in records:
        if r.get("ok") is False:
            continue
        if key(r) in limit:
            r["ratio_to_limit"] = r["median_ms"] / limit[key(r)]
        if (*key(r), r["rank"]) in peft:
            r["speedup_vs_peft_lora"] = peft[(*key(r), r["rank"])] / r["median_ms"]


def environment(device: str, mode: str, argv: list[str]) -> dict:
    import triton

    meta = dict(mode=mode, speed_claims=device == "cuda", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                command="python -m bench " + " ".join(shlex.quote(a) for a in argv), python=platform.python_version(),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, host=platform.node())
    try:
        meta["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        meta["commit"] = None
    if device == "cuda":
        meta["device"] = torch.cuda.get_device_name()
        try:
            meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip()
        except OSError:
            meta["driver"] = None
    else:
        meta["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    for pkg in ("transformers", "peft"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except ImportError:
            meta[pkg] = None
    return meta


def write(out: Path, meta: dict, records: list[dict], e2e: list[dict]) -> None:
    from .report import markdown, plots

    out.mkdir(parents=True, exist_ok=True)
    add_ratios(records)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, records=records, e2e=e2e), indent=1))
    (out / "results.md").write_text(markdown(meta, records, e2e))
    plots(records, out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default=None,
                    help="shape grid (default: targets on CUDA, smoke on CPU)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/latest"), help="output directory")
    ap.add_argument("--max-minutes", type=float, default=8.0, help="stop starting new cases after this long")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training-step benchmark")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid_name = args.grid or ("targets" if device == "cuda" else "smoke")
    if device != "cuda" and grid_name != "smoke":
        ap.error("without CUDA only --grid smoke runs (the kernels' speed needs a GPU)")
    mode = "gpu" if device == "cuda" else "smoke-cpu"
    if mode == "smoke-cpu":
        print("SMOKE MODE (no CUDA): tiny shapes, torch paths only. These timings are not speed claims.",
              file=sys.stderr)
    meta = environment(device, mode, argv)
    meta["grid"] = grid_name
    jobs = plan(GRIDS[grid_name], device)
    print(f"{len(jobs)} cases on {meta['device']}", file=sys.stderr)
    deadline = time.monotonic() + args.max_minutes * 60
    records: list[dict] = []
    try:
        from tqdm import tqdm
        bar = tqdm(jobs, file=sys.stderr, desc="bench")
    except ImportError:
        bar = jobs
    for i, (case, impl, op) in enumerate(bar):
        if time.monotonic() > deadline:
            meta["truncated"] = f"stopped after {i} of {len(jobs)} cases (--max-minutes {args.max_minutes})"
            break
        try:
            records.append(measure(case, impl, op, device))
        except Exception as e:  # a failing impl is recorded, not fatal: the others still run
            records.append(dict(impl=impl, op=op, M=case.M, K=case.K, N=case.N, rank=case.rank, preset=case.preset,
                                error=f"{type(e).__name__}: {e}"[:500]))
        if i % 20 == 0:
            write(args.out, meta, records, [])
    e2e = []
    if not args.no_e2e:
        from .e2e import run_e2e

        e2e = run_e2e(device, smoke=mode == "smoke-cpu")
    write(args.out, meta, records, e2e)
    print(f"wrote {args.out}/results.json, results.md and plots", file=sys.stderr)
    return 0
