"""Run the benchmark: ``python -m bench [--grid targets|full|smoke] [--out DIR] [--max-minutes M]``.

Side by side, on the same inputs, for every case: the frozen base layer alone (the limit), our
fused op (auto and each forward path), our unfused reference, the best plain-torch recipe (addmm),
HF PEFT LoRA / VeRA, and the merged layer; forward and forward+backward (dX and the trained
adapter tensors). Every impl's output and gradients are first checked against an fp32 oracle on
the case's own inputs; one that fails is flagged and gets no ratio. Writes ``results.json``
(device, driver, versions, command, commit and every raw figure) after every case, so a run cut
short still leaves its data, plus ``results.md`` and PNG plots. Without CUDA only the smoke grid
runs (tiny shapes, torch paths only), labelled as such: no speed claims.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from tiedlora_kernels import reference

from .cases import GRIDS, IMPLS, KERNEL_IMPLS, Case, Impl, env, flops, make_inputs, min_bytes

#: Tolerance rule (flash-attention's, STYLE.md): an impl's relative error against the fp32 oracle
#: may be at most TOL_FACTOR x the error of eager PyTorch in the same dtype (the reference on the same
#: factors) plus a floor per activation dtype, the op tests' table (tests/ops): the addmm recipe and
#: the kernels may round the rank-r path to bf16. A layer that drops its adapter term, or its u or v,
#: is off by ~0.1-1 on these inputs, far above either.
TOL_FACTOR = 2.0
TOL_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: Rough seconds per measurement on a GPU (build, check, do_bench's warm-up and reps), for the estimate.
SECONDS_PER_CASE_GPU = 0.6


def _rel_err(out: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    if out is None:  # a trained tensor that got no gradient: as wrong as can be
        return math.inf
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _run_once(fn, x, G, params) -> tuple[torch.Tensor, list]:
    """Output, and (with G) the gradients of x and of params, from one fresh fwd(+bwd)."""
    x = x.detach().clone().requires_grad_(G is not None)
    for p in params:
        p.grad = None
    if G is None:
        with torch.no_grad():
            return fn(x), []
    out = fn(x)
    out.backward(G)
    grads = [x.grad] + [p.grad for p in params]
    for p in params:
        p.grad = None
    return out.detach(), grads


def _oracle(fac: tuple, x, G, params):
    """fp32 reference on the impl's own factors: output, and dX plus the gradients of ``params``
    (those of the factors that train)."""
    W, b, A, B, u, v, s = fac
    f32 = {id(p): p.detach().float().requires_grad_(True) for p in params}
    lift = lambda p: None if p is None else f32.get(id(p), p.detach().float())  # noqa: E731
    fn = lambda x: reference.tied_lora_linear(x, W.detach().float(), lift(b), lift(A), lift(B), lift(u), lift(v), s)  # noqa: E731
    xx = x.detach().float().requires_grad_(G is not None)
    with torch.set_grad_enabled(G is not None):
        out = fn(xx)
    if G is None:
        return out, []
    out.backward(G.float())
    return out.detach(), [xx.grad] + [f32[id(p)].grad for p in params]


def check(impl: Impl, x: torch.Tensor, G: Optional[torch.Tensor]) -> dict:
    """Relative errors of output and gradients vs the fp32 oracle, next to eager bf16's, and the verdict."""
    if impl.factors is None:
        return {}
    named = [(n, p) for n, p in zip("ABuv", impl.factors[2:6]) if p is not None and p.requires_grad]
    params = [p for _, p in named]
    W, b, A, B, u, v, s = impl.factors
    with env(**impl.env):
        out, grads = _run_once(impl.fn, x, G, params)
    eager_out, eager_grads = _run_once(lambda x: reference.tied_lora_linear(x, W, b, A, B, u, v, s), x, G, params)
    ref_out, ref_grads = _oracle(impl.factors, x, G, params)
    rec = dict(rel_err=_rel_err(out, ref_out), rel_err_eager=_rel_err(eager_out, ref_out))
    floor = TOL_FLOOR[x.dtype]
    ok = rec["rel_err"] <= TOL_FACTOR * rec["rel_err_eager"] + floor
    if G is not None:
        # dX, then each trained factor (the merged layer has none: dX only).
        errs = [_rel_err(g, r) for g, r in zip(grads, ref_grads)]
        eager = [_rel_err(g, r) for g, r in zip(eager_grads, ref_grads)]
        rec["rel_err_grads"] = {n: (e if math.isfinite(e) else None) for n, e in zip(["x"] + [n for n, _ in named], errs)}
        finite = [e for e in errs if math.isfinite(e)]
        rec["rel_err_grad"] = max(finite) if finite else None  # JSON has no inf
        if len(finite) < len(errs):
            rec["missing_grad"] = True
        rec["rel_err_grad_eager"] = max(eager)
        ok = ok and all(e <= TOL_FACTOR * q + floor for e, q in zip(errs, eager))
    rec["ok"] = bool(ok)
    return rec


def time_ms(fn, device: str, grad_to_none=None) -> dict:
    """Median (and 20 / 80 percentiles) in ms. CUDA: triton's do_bench (warm-up, L2 flushed before
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


def back_to_back_ms(fn, calls: int = 200) -> float:
    """Decode as an eager loop sees it: ``calls`` calls queued back to back, one sync, wall time per
    call. Includes the Python / launch overhead that do_bench's cache flush hides, and an L2 kept
    warm (W of 32 MB fits in an H100's 50 MB): a diagnostic next to median_ms, not a replacement."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


def saved_bytes(fn, x, weights) -> tuple[int, int]:
    """(activation bytes, weight bytes) of the distinct storages autograd saves for backward.
    Storages of the frozen weights and trained tensors (``weights``) and of any Parameter are
    weights: they exist without the adapter; everything else (x, h, casts, masks) is activation."""
    weight_ptrs = {w.untyped_storage().data_ptr() for w in weights}
    act: dict[int, int] = {}
    wts: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        (wts if st.data_ptr() in weight_ptrs or isinstance(t, torch.nn.Parameter) else act)[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(act.values()), sum(wts.values())


class _InputCache:
    """The inputs of the latest case: every impl of a case sees the very same tensors."""

    def __init__(self, device):
        self.device, self.key, self.value = device, None, None

    def get(self, case: Case):
        key = (case.M, case.K, case.N, case.rank, case.preset)
        if key != self.key:
            self.key, self.value = None, None
            if self.device == "cuda":
                torch.cuda.empty_cache()
            t = make_inputs(case, self.device)
            g = torch.Generator(device=self.device).manual_seed(1)
            # Three activation buffers rotated between timed calls, and one upstream gradient.
            xs = [t.x] + [torch.randn(t.x.shape, generator=g, device=self.device).to(t.x.dtype) for _ in range(2)]
            G = torch.randn(case.M, case.N, generator=g, device=self.device).to(case.dtype)
            self.key, self.value = key, (t, xs, G)
        return self.value


def measure(case: Case, impl_name: str, op: str, device: str, cache: _InputCache) -> dict:
    t, xs, G = cache.get(case)
    impl = IMPLS[impl_name][0](t)
    rec = dict(impl=impl_name, op=op, M=case.M, K=case.K, N=case.N, rank=case.rank, preset=case.preset,
               dtype=str(case.dtype).removeprefix("torch."), adapter_dtype=impl.adapter_dtype)
    if impl.env:
        rec["env"] = dict(impl.env)
    with env(**impl.env):  # around forward and backward: the kernels read the env at call time
        rec.update(check(impl, t.x, G if op == "fwd_bwd" else None))
        step = iter(range(1 << 62))
        if op == "fwd":
            def run():
                with torch.no_grad():
                    return impl.fn(xs[next(step) % len(xs)])
            grads = None
        else:
            xg = [x.detach().requires_grad_(True) for x in xs]

            def run():
                impl.fn(xg[next(step) % len(xg)]).backward(G)
            grads = xg + impl.params
            rec["saved_bytes"], rec["saved_weight_bytes"] = saved_bytes(impl.fn, xg[0], impl.weights + impl.params)
        rec.update(time_ms(run, device, grad_to_none=grads))
        if device == "cuda" and op == "fwd" and case.M <= 64:
            rec["back_to_back_ms"] = back_to_back_ms(run)
        if device == "cuda":
            if grads:
                for g in grads:
                    g.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
        if grads:
            for g in grads:
                g.grad = None
    sec = rec["median_ms"] / 1e3
    rec["tflops"] = flops(case, op, impl_name) / sec / 1e12
    rec["gbps"] = min_bytes(case, op) / sec / 1e9
    return rec


def plan(grid: dict, device: str) -> list[tuple[Case, str, str]]:
    """Every (case, impl, op) of a grid; the limit once per shape, PEFT at its own preset, the kernels on CUDA only."""
    impls = [i for i in IMPLS if device == "cuda" or i not in KERNEL_IMPLS]
    jobs = []
    for K, N in grid["KN"]:
        for M in grid["M"]:
            for op in ("fwd", "fwd_bwd"):
                jobs += [(Case(M, K, N, grid["rank"][0], grid["preset"][0]), i, op) for i in impls
                         if IMPLS[i][1] == "shape"]
                for r in grid["rank"]:
                    for preset in grid["preset"]:
                        case = Case(M, K, N, r, preset)
                        jobs += [(case, i, op) for i in impls if IMPLS[i][1] is None]
                        jobs += [(case, i, op) for i in impls if IMPLS[i][1] == preset]
    return jobs


def _key(r: dict) -> tuple:
    return (r["impl"], r["op"], r["M"], r["K"], r["N"], r["rank"], r["preset"])


def add_ratios(records: list[dict]) -> None:
    """ratio_to_limit, speedup_vs_peft_lora and speedup_vs_peft_vera, from medians of the same run
    and shape (PEFT at the same rank). Records that failed their check or errored get none."""
    shape = lambda r: (r["op"], r["M"], r["K"], r["N"])  # noqa: E731
    usable = lambda r: "median_ms" in r and r.get("ok") is not False  # noqa: E731
    limit = {shape(r): r["median_ms"] for r in records if r["impl"] == "limit" and "median_ms" in r}
    peft = {name: {(*shape(r), r["rank"]): r["median_ms"] for r in records if r["impl"] == name and usable(r)}
            for name in ("peft_lora", "peft_vera")}
    for r in records:
        for f in ("ratio_to_limit", "speedup_vs_peft_lora", "speedup_vs_peft_vera"):
            r.pop(f, None)
        if not usable(r):
            continue
        if shape(r) in limit:
            r["ratio_to_limit"] = r["median_ms"] / limit[shape(r)]
        for name, med in peft.items():
            if (*shape(r), r["rank"]) in med:
                r["speedup_vs_" + name] = med[(*shape(r), r["rank"])] / r["median_ms"]


#: The issue's goals for the kernels: (name, impl, op, M filter, K, N, rank, field, bound, "<=" or ">=").
TARGETS = [
    ("fwd+bwd <= 1.10x limit, r=16", "ours", "fwd_bwd", (8192,), 4096, 4096, 16, "ratio_to_limit", 1.10, "<="),
    ("fwd+bwd <= 1.25x limit, r=128", "ours", "fwd_bwd", (8192,), 4096, 4096, 128, "ratio_to_limit", 1.25, "<="),
    (">= 1.3x faster than PEFT LoRA, fwd+bwd, r=16", "ours", "fwd_bwd", (8192,), 4096, 4096, 16,
     "speedup_vs_peft_lora", 1.3, ">="),
    (">= 1.3x faster than PEFT LoRA, fwd+bwd, r=128", "ours", "fwd_bwd", (8192,), 4096, 4096, 128,
     "speedup_vs_peft_lora", 1.3, ">="),
    (">= 1.3x faster than PEFT LoRA, fwd, r=16", "ours", "fwd", (8192,), 4096, 4096, 16,
     "speedup_vs_peft_lora", 1.3, ">="),
    ("decode fwd <= 1.15x limit, r=16", "ours", "fwd", (1, 16), 4096, 4096, 16, "ratio_to_limit", 1.15, "<="),
    ("decode fwd <= 1.15x limit, r=128", "ours", "fwd", (1, 16), 4096, 4096, 128, "ratio_to_limit", 1.15, "<="),
]
E2E_TARGET = ("e2e step, TL6 <= 1.10x no adapter", "ours_tl6", 1.10)


def targets(records: list[dict], e2e: list[dict]) -> list[dict]:
    """Where the kernels stand against the issue's goals: one row per goal and matching record
    (each preset, and the forward paths as information), status met / missed / no data."""
    rows = []
    for name, impl, op, Ms, K, N, rank, fld, bound, cmp in TARGETS:
        hits = [r for r in records if r["op"] == op and r["M"] in Ms and r["K"] == K and r["N"] == N
                and r["rank"] == rank and r["impl"] in (impl, impl + "_fused", impl + "_epilogue")]
        for r in sorted(hits, key=lambda r: (r["impl"] != impl, r["impl"], r["preset"], r["M"])):
            val = r.get(fld)
            status = ("no data" if val is None else
                      "met" if (val <= bound if cmp == "<=" else val >= bound) else "missed")
            if r.get("ok") is False:
                status = "wrong result"
            rows.append(dict(target=name, impl=r["impl"], preset=r["preset"], M=r["M"], field=fld, value=val,
                             goal=f"{cmp} {bound}", status=status, binding=r["impl"] == impl))
        if not hits:
            rows.append(dict(target=name, impl=impl, preset=None, M=None, field=fld, value=None,
                             goal=f"{cmp} {bound}", status="no data", binding=True))
    name, config, bound = E2E_TARGET
    base = next((e["step_ms"] for e in e2e if e["config"] == "no_adapter" and "step_ms" in e), None)
    ours = next((e["step_ms"] for e in e2e if e["config"] == config and "step_ms" in e), None)
    val = ours / base if base and ours else None
    rows.append(dict(target=name, impl=config, preset="tl6", M=None, field="step_ratio_to_no_adapter", value=val,
                     goal=f"<= {bound}", status="no data" if val is None else "met" if val <= bound else "missed",
                     binding=True))
    return rows


def _kernel_module() -> Optional[str]:
    """The module the dispatcher imports its Triton function from (the kernels are being rewritten)."""
    try:
        import inspect

        from tiedlora_kernels import ops

        m = re.search(r"from \.(\w+) import tied_lora_linear_triton", inspect.getsource(ops.tied_lora_linear))
        return f"tiedlora_kernels.ops.{m.group(1)}" if m else None
    except Exception:
        return None


def environment(device: str, mode: str, argv: list[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(mode=mode, speed_claims=device == "cuda",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m bench " + " ".join(shlex.quote(a) for a in argv), python=platform.python_version(),
                torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, host=platform.node(),
                kernel_module=_kernel_module(),
                tolerance=(f"rel err of output and of every gradient vs an fp32 oracle <= {TOL_FACTOR} x eager "
                           f"PyTorch's + {TOL_FLOOR[torch.bfloat16]} (bf16)"),
                timing=("triton.testing.do_bench: median of reps after warm-up, L2 flushed before each rep, "
                        "3 activation buffers rotated" if device == "cuda" else
                        "CPU wall clock, median of 5 after 2 warm-ups (smoke mode: not a speed claim)"))
    try:
        root = Path(__file__).resolve().parent
        meta["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=root).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root).stdout.strip()
        meta["dirty"] = bool(dirty) if meta["commit"] else None
    except OSError:
        meta["commit"], meta["dirty"] = None, None
    if not meta["commit"]:  # a copy of the tree without .git (the GPU session script passes it in)
        meta["commit"] = os.environ.get("BENCH_COMMIT") or None
    if device == "cuda":
        meta["device"] = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        meta["device_memory_bytes"] = props.total_memory
        meta["sm_count"] = props.multi_processor_count
        try:
            meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip() or None
        except OSError:
            meta["driver"] = None
    else:
        meta["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
        meta["driver"] = None
    for pkg in ("transformers", "peft"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except ImportError:
            meta[pkg] = None
    return meta


def write_json(out: Path, meta: dict, records: list[dict], e2e: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    add_ratios(records)
    data = dict(meta=meta, records=records, e2e=e2e, targets=targets(records, e2e) if meta["speed_claims"] else [])
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / "results.json")  # atomic: a kill mid-write leaves the previous file


def write(out: Path, meta: dict, records: list[dict], e2e: list[dict], with_plots: bool = True) -> None:
    from .report import markdown, plot_note, plots

    write_json(out, meta, records, e2e)
    tg = targets(records, e2e) if meta["speed_claims"] else []
    (out / "results.md").write_text(markdown(meta, records, e2e, tg))
    if with_plots:
        meta["plots"] = [p.name for p in plots(records, out, plot_note(meta))]
        write_json(out, meta, records, e2e)


class _Stop(Exception):
    pass


def _on_term(signum, frame):
    raise _Stop(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default=None,
                    help="shape grid (default: targets on CUDA, smoke on CPU)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: bench/results/<date>-<device> on CUDA, "
                         "bench/results/smoke-cpu on a CPU, which git ignores)")
    ap.add_argument("--max-minutes", type=float, default=8.0,
                    help="overall budget: no new case starts after it (the end-to-end part included)")
    ap.add_argument("--e2e-minutes", type=float, default=None,
                    help="minutes of --max-minutes kept for the end-to-end benchmark (default: a third on CUDA, none on CPU)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training-step benchmark")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end benchmark")
    ap.add_argument("--impls", default=None, help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--resume", action="store_true",
                    help="keep the records of OUT/results.json and measure only the missing ones (same grid)")
    ap.add_argument("--tests-exit-code", type=int, default=None,
                    help="exit code of the GPU test run before this one; nonzero withdraws every speed claim")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid_name = args.grid or ("targets" if device == "cuda" else "smoke")
    if device != "cuda" and grid_name != "smoke":
        ap.error("without CUDA only --grid smoke runs (the kernels' speed needs a GPU)")
    mode = "gpu" if device == "cuda" else "smoke-cpu"
    if mode == "smoke-cpu":
        print("SMOKE MODE (no CUDA): tiny shapes, torch paths only. These timings are NOT speed claims.",
              file=sys.stderr)
    meta = environment(device, mode, argv)
    if args.out is None:
        name = (f"{datetime.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9.-]+', '_', meta['device'])}"
                if device == "cuda" else "smoke-cpu")
        args.out = Path(__file__).resolve().parent / "results" / name
    meta["grid"] = grid_name
    if args.tests_exit_code is not None:
        meta["tests_exit_code"] = args.tests_exit_code
        if args.tests_exit_code != 0:
            meta["speed_claims"] = False
            meta["no_claims_reason"] = f"the GPU tests failed (exit code {args.tests_exit_code})"
    jobs = [] if args.e2e_only else plan(GRIDS[grid_name], device)
    if args.impls:
        keep = set(args.impls.split(","))
        unknown = keep - set(IMPLS)
        if unknown:
            ap.error(f"unknown impls {sorted(unknown)}; known: {list(IMPLS)}")
        jobs = [j for j in jobs if j[1] in keep | {"limit"}]
    records: list[dict] = []
    if args.resume and (args.out / "results.json").exists():
        old = json.loads((args.out / "results.json").read_text())
        records = [r for r in old["records"] if "error" not in r]
        done = {_key(r) for r in records}
        jobs = [j for j in jobs if (j[1], j[2], j[0].M, j[0].K, j[0].N, j[0].rank, j[0].preset) not in done]
        meta["resumed_from"] = old["meta"].get("date")
    e2e_budget = 0.0 if args.no_e2e else (args.e2e_minutes if args.e2e_minutes is not None else
                                          args.max_minutes / 3 if device == "cuda" else 0.0)
    est = len(jobs) * SECONDS_PER_CASE_GPU / 60
    print(f"{len(jobs)} measurements ({grid_name} grid) on {meta['device']}"
          + (f"; estimate ~{est:.0f} min plus kernel compilation" if device == "cuda" else ""), file=sys.stderr)
    start = time.monotonic()
    bench_deadline = start + max(args.max_minutes - e2e_budget, 0.0) * 60
    deadline = start + args.max_minutes * 60
    old_term = signal.signal(signal.SIGTERM, _on_term)
    cache = _InputCache(device)
    e2e: list[dict] = []
    try:
        try:
            from tqdm import tqdm
            bar = tqdm(jobs, file=sys.stderr, desc="bench", dynamic_ncols=True)
        except ImportError:
            bar = jobs
        for i, (case, impl, op) in enumerate(bar):
            if time.monotonic() > bench_deadline:
                meta["truncated"] = f"stopped after {i} of {len(jobs)} measurements (--max-minutes {args.max_minutes})"
                break
            if bar is jobs and i % 10 == 0:
                print(f"[{i}/{len(jobs)}] {impl} {op} M={case.M} K={case.K} N={case.N} r={case.rank} {case.preset}",
                      file=sys.stderr)
            try:
                records.append(measure(case, impl, op, device, cache))
            except _Stop:
                raise
            except Exception as e:  # a failing impl is recorded, not fatal: the others still run
                records.append(dict(impl=impl, op=op, M=case.M, K=case.K, N=case.N, rank=case.rank,
                                    preset=case.preset, error=f"{type(e).__name__}: {e}"[:500]))
                if device == "cuda":
                    torch.cuda.empty_cache()
            write_json(args.out, meta, records, e2e)
            if i % 25 == 24:
                write(args.out, meta, records, e2e, with_plots=False)
        cache = None  # release the last case's tensors before the model is built
        if device == "cuda":
            torch.cuda.empty_cache()
        if not args.no_e2e:
            from .e2e import run_e2e

            run_e2e(device, smoke=mode == "smoke-cpu", deadline=deadline, sink=e2e,
                    on_record=lambda: write_json(args.out, meta, records, e2e))
    except (_Stop, KeyboardInterrupt) as e:
        meta["truncated"] = f"interrupted ({e or 'KeyboardInterrupt'}) after {len(records)} measurements"
    finally:
        signal.signal(signal.SIGTERM, old_term)
    meta["wall_s"] = round(time.monotonic() - start, 1)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second interrupt must not cut the last write
    try:
        write(args.out, meta, records, e2e)
    finally:
        signal.signal(signal.SIGINT, old_int)
    bad = [r for r in records if r.get("ok") is False or "error" in r]
    print(f"wrote {args.out}/results.json, results.md and plots; {len(records)} measurements, {len(bad)} failed "
          f"or errored, {len(e2e)} end-to-end configs", file=sys.stderr)
    return 0
