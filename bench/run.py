"""Run the benchmark: ``python -m bench [--grid targets|full|smoke] [--out DIR] [--max-minutes M]``.

Side by side, on the same inputs, for every case: the frozen base layer alone (the limit), our
op (``tied_lora_linear``, Triton backend), our unfused reference, the best plain-torch recipe
(addmm), HF PEFT LoRA / VeRA, and the merged layer; forward and forward+backward (dX and the
trained adapter tensors). Every impl's output and gradients are first checked against an fp32
oracle on the case's own inputs; one that fails is flagged and gets no ratio.

Each impl is timed call by call in alternation with the limit on the same inputs, so its ratio
compares two timings taken under the same clock, power and thermal state (the first H200 run
measured the limit first, on a cool GPU, and everything after it looked slower; see NOTES.md).
After all timings: three probes (copy bandwidth, cuBLAS addmm with beta = 1 against mm, the
merged weight's layout and speed) and a torch.profiler pass over the target shape (top kernels,
launches, host time per call, each Triton kernel against its bandwidth floor).

Writes ``results.json`` (device, driver, versions, command, commit and every raw figure) after
every case, so a run cut short still leaves its data, plus ``results.md`` and PNG plots. Without
CUDA only the smoke grid runs (tiny shapes, torch paths only), labelled as such: no speed claims.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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
from .claims import apply_tests_exit_code, measured_commit, tests_exit_code
from .floors import PRESET_TRAIN, kernel_floors, spec_bandwidth
from .profiling import host_ms, kernel_floor_rows, profile_steps
from .targets import targets

#: Tolerance rule (flash-attention's): an impl's relative error against the fp32 oracle
#: may be at most TOL_FACTOR x the error of eager PyTorch in the same dtype (the reference on the same
#: factors) plus a floor per activation dtype, the op tests' table (tests/ops): the addmm recipe and
#: the kernels may round the rank-r path to bf16. A layer that drops its adapter term, or its u or v,
#: is off by ~0.1-1 on these inputs, far above either.
TOL_FACTOR = 2.0
TOL_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: Rough seconds per measurement on a GPU (build, check, interleaved warm-up and reps), for the estimate.
SECONDS_PER_CASE_GPU = 0.8
#: Impls whose decode forward is also timed as a CUDA graph replay (the issue's "under CUDA graphs" target).
GRAPH_IMPLS = ("limit", "ours", "addmm")


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


def _stats(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return dict(median_ms=statistics.median(times), p20_ms=q[0], p80_ms=q[-1], reps=len(times))


def time_interleaved(fns: list, device: str, grads: Optional[list] = None, warmup_ms: float = 25,
                     rep_ms: float = 100, flush: bool = True) -> list[dict]:
    """Median (and 20 / 80 percentiles) in ms of each callable, timed call by call in alternation
    (A B A B ..., the order reversed every other round), so every variant sees the same clock,
    power and thermal state.

    CUDA: do_bench's method per call (the L2 flushed by a 256 MB write before each call, CUDA
    events around it, one sync at the end), ~``rep_ms`` of calls per callable after ~``warmup_ms``.
    grads[i]: tensors whose ``.grad`` is reset before each call of fns[i]. CPU (smoke mode, no
    claims): wall clock, 3 rounds after 1 warm-up round.
    """
    grads = grads or [[] for _ in fns]

    def reset(i):
        for t in grads[i]:
            t.grad = None

    if device != "cuda":
        for i, f in enumerate(fns):
            reset(i)
            f()
        times = [[] for _ in fns]
        for k in range(3):
            for i in (range(len(fns)) if k % 2 == 0 else reversed(range(len(fns)))):
                reset(i)
                t0 = time.perf_counter()
                fns[i]()
                times[i].append((time.perf_counter() - t0) * 1e3)
        return [_stats(t) for t in times]
    cache = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda") if flush else None
    for i, f in enumerate(fns):
        reset(i)
        f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        for i, f in enumerate(fns):
            reset(i)
            if cache is not None:
                cache.zero_()
            f()
    end.record()
    torch.cuda.synchronize()
    round_ms = max(start.elapsed_time(end) / 3, 1e-3)
    n_warm = max(1, int(warmup_ms / round_ms))
    n_rep = min(2000, max(10, int(rep_ms * len(fns) / round_ms)))
    for _ in range(n_warm):
        for i, f in enumerate(fns):
            reset(i)
            f()
    ev = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_rep)]
          for _ in fns]
    for k in range(n_rep):
        for i in (range(len(fns)) if k % 2 == 0 else reversed(range(len(fns)))):
            reset(i)
            if cache is not None:
                cache.zero_()
            ev[i][k][0].record()
            fns[i]()
            ev[i][k][1].record()
    torch.cuda.synchronize()
    return [_stats([s.elapsed_time(e) for s, e in pairs]) for pairs in ev]


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


def graph_ms(fn, calls: int = 200) -> float:
    """Per call, ``calls`` replays back to back of a CUDA graph that captured one ``fn()`` (what
    ``torch.compile(mode="reduce-overhead")`` gives a decode loop): launch overhead gone."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


_NVML = {}
#: NVML clock-event reasons (bit -> name): why the SM clock is below its maximum.
_THROTTLE = {0x1: "idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x10: "sync_boost",
             0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake", 0x100: "display_clock"}


def gpu_state() -> Optional[dict]:
    """SM clock (MHz), power (W), temperature (C) and clock-limiting reasons now, through NVML
    (``nvidia-ml-py``, read-only); None where NVML is not there. Read right after a timing, it
    tells a throttled measurement from a slow kernel."""
    try:
        if "h" not in _NVML:
            import pynvml

            pynvml.nvmlInit()
            _NVML["m"], _NVML["h"] = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        m, h = _NVML["m"], _NVML["h"]
        get_reasons = (getattr(m, "nvmlDeviceGetCurrentClocksEventReasons", None)
                       or m.nvmlDeviceGetCurrentClocksThrottleReasons)
        bits = get_reasons(h)
        return dict(sm_mhz=m.nvmlDeviceGetClockInfo(h, m.NVML_CLOCK_SM), power_w=m.nvmlDeviceGetPowerUsage(h) / 1e3,
                    temp_c=m.nvmlDeviceGetTemperature(h, m.NVML_TEMPERATURE_GPU),
                    limits=[n for b, n in _THROTTLE.items() if bits & b])
    except Exception:
        return None


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


def _runner(impl: Impl, op: str, xs: list, G: torch.Tensor):
    """(run, tensors whose .grad each call resets): one forward (no grad) or forward + backward,
    rotating the activation buffers."""
    step = iter(range(1 << 62))
    if op == "fwd":
        def run():
            with torch.no_grad():
                return impl.fn(xs[next(step) % len(xs)])
        return run, []
    xg = [x.detach().requires_grad_(True) for x in xs]

    def run():
        impl.fn(xg[next(step) % len(xg)]).backward(G)
    return run, xg + impl.params


def measure(case: Case, impl_name: str, op: str, device: str, cache: _InputCache) -> dict:
    t, xs, G = cache.get(case)
    impl = IMPLS[impl_name][0](t)
    rec = dict(impl=impl_name, op=op, M=case.M, K=case.K, N=case.N, rank=case.rank, preset=case.preset,
               dtype=str(case.dtype).removeprefix("torch."), adapter_dtype=impl.adapter_dtype)
    if impl.env:
        rec["env"] = dict(impl.env)
    rec.update(impl.info)
    with env(**impl.env):  # around forward and backward: the kernels read the env at call time
        rec.update(check(impl, t.x, G if op == "fwd_bwd" else None))
        run, grads = _runner(impl, op, xs, G)
        if op == "fwd_bwd":
            rec["saved_bytes"], rec["saved_weight_bytes"] = saved_bytes(impl.fn, grads[0], impl.weights + impl.params)
        if impl_name == "limit":
            rec.update(time_interleaved([run], device, [grads])[0])
        else:  # interleaved with the limit on the same inputs: the ratio shares one clock state
            limit_run, limit_grads = _runner(IMPLS["limit"][0](t), op, xs, G)
            mine, lim = time_interleaved([run, limit_run], device, [grads, limit_grads])
            rec.update(mine)
            rec["limit_paired_ms"] = lim["median_ms"]
        if device == "cuda":
            rec["gpu_state"] = gpu_state()
        if device == "cuda" and op == "fwd" and case.M <= 64:
            rec["back_to_back_ms"] = back_to_back_ms(run)
            if impl_name != "limit":
                rec["limit_back_to_back_ms"] = back_to_back_ms(limit_run)
            if impl_name in GRAPH_IMPLS:
                try:
                    rec["graph_ms"] = graph_ms(run)
                    if impl_name != "limit":
                        rec["limit_graph_ms"] = graph_ms(limit_run)
                except Exception as e:  # a capture that fails is a finding, not a crash
                    rec["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                    torch.cuda.synchronize()
        if device == "cuda":
            for g in grads:
                g.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
        for g in grads:
            g.grad = None
    sec = rec["median_ms"] / 1e3
    rec["tflops"] = flops(case, op, impl_name) / sec / 1e12
    rec["gbps"] = min_bytes(case, op) / sec / 1e9
    return rec


def profile_record(case: Case, impl_name: str, op: str, device: str, cache: _InputCache) -> dict:
    """Host time per call (no profiler) and the profiler's per-call summary of one impl on one case."""
    t, xs, G = cache.get(case)
    impl = IMPLS[impl_name][0](t)
    with env(**impl.env):
        run, grads = _runner(impl, op, xs, G)

        def step():
            for g in grads:
                g.grad = None
            run()
        step()
        cuda = device == "cuda"  # a CPU smoke run checks the plumbing only: fewer calls
        out = dict(host_ms_per_call=host_ms(step, device, n=5 if cuda else 2),
                   profile=profile_steps(step, device, steps=3 if cuda else 2))
        for g in grads:
            g.grad = None
    return out


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
    """ratio_to_limit (to the limit timed in alternation with the record, ``limit_paired_ms``, else to
    the limit record of the same shape), b2b_ / graph_ratio_to_limit (decode), and speedup_vs_peft_lora /
    _vera (PEFT's ratio / this ratio at the same shape and rank: each side normalised by its own paired
    limit). Records that failed their check or errored get none."""
    shape = lambda r: (r["op"], r["M"], r["K"], r["N"])  # noqa: E731
    usable = lambda r: "median_ms" in r and r.get("ok") is not False  # noqa: E731
    limits = {shape(r): r for r in records if r["impl"] == "limit" and "median_ms" in r}
    fields = ("ratio_to_limit", "b2b_ratio_to_limit", "graph_ratio_to_limit", "speedup_vs_peft_lora",
              "speedup_vs_peft_vera")
    for r in records:
        for f in fields:
            r.pop(f, None)
        if not usable(r):
            continue
        lim = limits.get(shape(r), {})
        base = r.get("limit_paired_ms", lim.get("median_ms"))
        if base:
            r["ratio_to_limit"] = r["median_ms"] / base
        for f, mine in (("b2b_ratio_to_limit", "back_to_back_ms"), ("graph_ratio_to_limit", "graph_ms")):
            other = r.get("limit_" + mine, lim.get(mine))
            if r.get(mine) and other:
                r[f] = r[mine] / other
    for name in ("peft_lora", "peft_vera"):
        peft = {(*shape(r), r["rank"]): r for r in records if r["impl"] == name and usable(r)}
        for r in records:
            p = peft.get((*shape(r), r["rank"]))
            if p is None or not usable(r):
                continue
            if "ratio_to_limit" in p and "ratio_to_limit" in r:
                r["speedup_vs_" + name] = p["ratio_to_limit"] / r["ratio_to_limit"]
            else:
                r["speedup_vs_" + name] = p["median_ms"] / r["median_ms"]


def add_kernel_floors(records: list[dict], meta: dict) -> None:
    """Each profiled record of ours: every modelled Triton kernel's GPU time per call against its
    bandwidth floor, at the data-sheet bandwidth (``ratio_spec``, the target's) and at the measured
    copy bandwidth (``ratio_copy``)."""
    bws = dict(spec=meta.get("spec_bandwidth"), copy=meta.get("copy_bandwidth"))
    for r in records:
        if r["impl"] in KERNEL_IMPLS and r.get("profile") and r["preset"] in PRESET_TRAIN:
            floors = kernel_floors(r["M"], r["K"], r["N"], r["rank"], r["op"], r["preset"], bws["spec"] or 1.0)
            r["kernel_floors"] = kernel_floor_rows(r["profile"], floors, bws)


def profile_plan(records: list[dict], grid: dict) -> list[tuple[Case, str, str]]:
    """What the profiler pass covers: at the target M every impl (preset tl6, PEFT at its own), and
    at the smallest M the decode forward of the limit, ours and PEFT LoRA at the first rank."""
    big, small, r0 = max(grid["M"]), min(grid["M"]), grid["rank"][0]
    out = []
    for r in records:
        if "median_ms" not in r or r.get("ok") is False:
            continue
        own = r["preset"] == "tl6" or r["impl"] in ("limit", "peft_lora", "peft_vera")
        if (r["M"] == big and own) or (r["M"] == small and r["op"] == "fwd" and r["rank"] == r0 and own
                                       and r["impl"] in ("limit", "ours", "peft_lora")):
            out.append((Case(r["M"], r["K"], r["N"], r["rank"], r["preset"]), r["impl"], r["op"]))
    # Ours first (the per-kernel floors), then the limit and PEFT LoRA: what a short pass must not miss.
    rank = {"ours": 0, "limit": 1, "peft_lora": 2}
    return sorted(out, key=lambda j: (rank.get(j[1], 3), j[0].M != big))


def _kernel_module() -> Optional[str]:
    """The modules the dispatcher imports its Triton path from (the kernels are being rewritten):
    the ``from .<module> import`` lines of ``tiedlora_kernels.ops.tied_lora_linear``, else the list of
    ``tiedlora_kernels.ops`` submodules."""
    try:
        import inspect
        import pkgutil

        from tiedlora_kernels import ops

        found = re.findall(r"from \.(\w+) import", inspect.getsource(ops.tied_lora_linear))
        if not found:
            found = [m.name for m in pkgutil.iter_modules(ops.__path__)]
        return ", ".join(f"tiedlora_kernels.ops.{m}" for m in found) or None
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
                timing=("each impl timed call by call in alternation with the limit on the same inputs (do_bench's "
                        "method per call: L2 flushed by a 256 MB write, CUDA events, median), 3 activation buffers "
                        "rotated; ratio_to_limit uses the paired limit; profiler pass only after every timing"
                        if device == "cuda" else
                        "CPU wall clock, median of 3 interleaved rounds after 1 warm-up (smoke mode: not a speed claim)"))
    meta["commit"], meta["dirty"] = measured_commit()
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
        meta["gpu_state_at_start"] = gpu_state()
    else:
        meta["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
        meta["driver"] = None
    meta["spec_bandwidth"] = spec_bandwidth(meta["device"]) if device == "cuda" else None
    for pkg in ("transformers", "peft"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except ImportError:
            meta[pkg] = None
    return meta


def write_json(out: Path, meta: dict, records: list[dict], e2e: list[dict], probes: Optional[dict] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    add_ratios(records)
    data = dict(meta=meta, records=records, e2e=e2e, probes=probes or {},
                targets=targets(records, e2e, meta.get("device")) if meta["speed_claims"] else [])
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / "results.json")  # atomic: a kill mid-write leaves the previous file


def write(out: Path, meta: dict, records: list[dict], e2e: list[dict], probes: Optional[dict] = None,
          with_plots: bool = True) -> None:
    from .report import markdown, plot_note, plots

    write_json(out, meta, records, e2e, probes)
    tg = targets(records, e2e, meta.get("device")) if meta["speed_claims"] else []
    (out / "results.md").write_text(markdown(meta, records, e2e, tg, probes))
    if with_plots:
        meta["plots"] = [p.name for p in plots(records, out, plot_note(meta))]
        write_json(out, meta, records, e2e, probes)


class Stopped(BaseException):
    """A benchmark stopped from outside (SIGTERM): what it measured is written, marked as cut short.
    A BaseException, as KeyboardInterrupt is: no ``except Exception`` that records a failing
    measurement swallows it."""


def stop_on_signal(signum, frame):
    """SIGTERM handler of the benchmarks: raise :class:`Stopped` where the run is."""
    raise Stopped(f"signal {signum}")


def _job_name(case: Case, impl: str, op: str) -> str:
    return f"{impl} {op} M={case.M} K={case.K} N={case.N} r={case.rank} {case.preset}"


def run_probes(grid: dict, device: str, probes: dict, deadline: float) -> None:
    """Copy bandwidth, addmm vs mm, the merged weight's layout and speed: each skipped once past ``deadline``."""
    from . import probes as P

    K, N = grid["KN"][0]
    steps = [("copy", lambda: P.copy_bandwidth(device, time_interleaved)),
             ("gemm_epilogue",
              lambda: P.gemm_epilogue(device, sorted(grid["M"], reverse=True), K, N, time_interleaved)),
             ("merge_layout", lambda: P.merge_layout(device, max(grid["M"]), K, N, grid["rank"][0], time_interleaved))]
    for name, fn in steps:
        if time.monotonic() > deadline:
            probes[name] = dict(skipped="out of time")
            continue
        try:
            probes[name] = fn()
        except Exception as e:
            probes[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default=None,
                    help="shape grid (default: targets on CUDA, smoke on CPU)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: bench/results/<date>-<device> on CUDA, "
                         "bench/results/smoke-cpu on a CPU)")
    ap.add_argument("--max-minutes", type=float, default=8.0,
                    help="overall budget: no new measurement, probe, profile or e2e config starts after it")
    ap.add_argument("--e2e-minutes", type=float, default=None,
                    help="minutes of --max-minutes kept for the end-to-end benchmark (default: a third on CUDA, none on CPU)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training-step benchmark")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end benchmark")
    ap.add_argument("--e2e-configs", default=None, help="comma-separated subset of the e2e configs (bench.e2e.CONFIGS)")
    ap.add_argument("--impls", default=None, help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--profile", choices=("target", "none"), default="target",
                    help="torch.profiler pass after all timings (target: the target M's impls and the decode forward)")
    ap.add_argument("--no-probes", action="store_true", help="skip the copy / addmm-vs-mm / merged-layout probes")
    ap.add_argument("--serving", action="store_true",
                    help="then the multi-adapter serving benchmark (bench.serving) into OUT/serving, for "
                         "--serving-minutes (on a GPU it needs ~3 minutes of its own)")
    ap.add_argument("--serving-minutes", type=float, default=3.0, help="the serving benchmark's budget")
    ap.add_argument("--resume", action="store_true",
                    help="keep the records of OUT/results.json and measure only the missing ones (same grid)")
    ap.add_argument("--tests-exit-code", type=tests_exit_code, default=None,
                    help="exit code of the GPU test run, or 'pending' (a run made before the tests end): "
                         "anything but 0 withdraws every speed claim (or later: python -m bench.report OUT "
                         "--tests-exit-code N)")
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
    apply_tests_exit_code(meta, args.tests_exit_code)
    grid = GRIDS[grid_name]
    jobs = [] if args.e2e_only else plan(grid, device)
    if args.impls:
        keep = set(args.impls.split(","))
        unknown = keep - set(IMPLS)
        if unknown:
            ap.error(f"unknown impls {sorted(unknown)}; known: {list(IMPLS)}")
        jobs = [j for j in jobs if j[1] in keep | {"limit"}]
    e2e_configs = args.e2e_configs.split(",") if args.e2e_configs else None
    records: list[dict] = []
    probes: dict = {}
    kept_e2e: list[dict] = []
    if args.resume and (args.out / "results.json").exists():
        old = json.loads((args.out / "results.json").read_text())
        records = [r for r in old["records"] if "error" not in r]
        probes = old.get("probes") or {}
        kept_e2e = (old.get("e2e") or []) if args.no_e2e else []  # a run without e2e keeps the earlier one's
        done = {_key(r) for r in records}
        jobs = [j for j in jobs if (j[1], j[2], j[0].M, j[0].K, j[0].N, j[0].rank, j[0].preset) not in done]
        meta["resumed_from"] = old["meta"].get("date")
    meta["planned"] = len(records) + len(jobs)  # the whole grid: what earlier runs measured counts
    e2e_budget = 0.0 if args.no_e2e else (args.e2e_minutes if args.e2e_minutes is not None else
                                          args.max_minutes / 3 if device == "cuda" and not args.e2e_only else 0.0)
    est = len(jobs) * SECONDS_PER_CASE_GPU / 60
    print(f"{len(jobs)} measurements ({grid_name} grid) on {meta['device']}"
          + (f"; estimate ~{est:.0f} min plus kernel compilation" if device == "cuda" else ""), file=sys.stderr)
    start = time.monotonic()
    deadline = start + args.max_minutes * 60
    micro_end = start + max(args.max_minutes - e2e_budget, 0.0) * 60
    # Probes and the profiler pass come after every timing; keep them a share (they are short).
    post = 0.0 if (args.no_probes and args.profile == "none") or not jobs else min(45.0, 0.25 * (micro_end - start))
    timing_end = micro_end - post
    old_term = signal.signal(signal.SIGTERM, stop_on_signal)
    cache = _InputCache(device)
    e2e: list[dict] = list(kept_e2e)
    # Until the final write says otherwise, every save is of a run in progress: a process killed
    # before it (SIGKILL, out of memory) leaves a file that says it is partial.
    meta["truncated"] = "in progress: the run did not reach its final write"
    save = lambda: write_json(args.out, meta, records, e2e, probes)  # noqa: E731
    try:
        try:
            from tqdm import tqdm
            bar = tqdm(jobs, file=sys.stderr, desc="bench", dynamic_ncols=True)
        except ImportError:
            bar = jobs
        for i, (case, impl, op) in enumerate(bar):
            if time.monotonic() > timing_end:
                meta["truncated"] = f"stopped after {i} of {len(jobs)} measurements (--max-minutes {args.max_minutes})"
                meta["not_measured"] = [_job_name(*j) for j in jobs[i:]]
                break
            if bar is jobs and i % 10 == 0:
                print(f"[{i}/{len(jobs)}] {_job_name(case, impl, op)}", file=sys.stderr)
            try:
                records.append(measure(case, impl, op, device, cache))
            except Exception as e:  # a failing impl is recorded, not fatal: the others still run
                records.append(dict(impl=impl, op=op, M=case.M, K=case.K, N=case.N, rank=case.rank,
                                    preset=case.preset, error=f"{type(e).__name__}: {e}"[:500]))
                if device == "cuda":
                    torch.cuda.empty_cache()
            save()
            if i % 25 == 24:
                write(args.out, meta, records, e2e, probes, with_plots=False)
        cache = _InputCache(device)  # release the last case's tensors
        if jobs and not args.no_probes:
            run_probes(grid, device, probes, micro_end)
            if isinstance(probes.get("copy"), dict) and device == "cuda":
                meta["copy_bandwidth"] = probes["copy"].get("bytes_per_s")
            save()
        if jobs and args.profile != "none":
            todo = profile_plan(records, grid)
            by_key = {_key(r): r for r in records}
            meta["profiled"] = 0
            for case, impl, op in todo:
                rec = by_key[(impl, op, case.M, case.K, case.N, case.rank, case.preset)]
                if time.monotonic() > micro_end:
                    rec["profile_skipped"] = "out of time"
                    continue
                try:
                    rec.update(profile_record(case, impl, op, device, cache))
                    meta["profiled"] += 1
                except Exception as e:
                    rec["profile_error"] = f"{type(e).__name__}: {e}"[:300]
            meta["profile_planned"] = len(todo)
            add_kernel_floors(records, meta)
            save()
        cache = None
        if device == "cuda":
            torch.cuda.empty_cache()
        if not args.no_e2e:
            from .e2e import run_e2e

            run_e2e(device, smoke=mode == "smoke-cpu", deadline=deadline, sink=e2e, on_record=save,
                    configs=e2e_configs)
    except (Stopped, KeyboardInterrupt) as e:
        meta["truncated"] = f"interrupted ({e or 'KeyboardInterrupt'}) after {len(records)} measurements"
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if meta["truncated"].startswith("in progress"):
        del meta["truncated"]  # it finished, or says above where it stopped
    meta["wall_s"] = round(time.monotonic() - start, 1)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second interrupt must not cut the last write
    try:
        write(args.out, meta, records, e2e, probes)
    finally:
        signal.signal(signal.SIGINT, old_int)
    bad = [r for r in records if r.get("ok") is False or "error" in r]
    print(f"wrote {args.out}/results.json, results.md and plots; {len(records)} of {meta['planned']} measurements, "
          f"{len(bad)} failed or errored, {len(e2e)} end-to-end configs", file=sys.stderr)
    if args.serving:
        from . import serving

        return serving.main(["--out", str(args.out / "serving"), "--max-minutes", str(args.serving_minutes)])
    return 0
