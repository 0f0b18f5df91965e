"""Where the time goes, per step: torch.profiler's top kernels, launches, GPU busy time, host time.

Run only after every timed measurement of the process (microbenchmark) or of the config (e2e), so
a profiler session never overlaps a timing. Kineto tears CUPTI down at the end of a session
(``TEARDOWN_CUPTI``, the default without CUDA graphs; set here explicitly), so launches after a
session are not slowed; a warm-up step inside each session keeps CUPTI's cold start (events dropped
or late at the head of a session) out of the recorded steps.

On a CPU (smoke mode) only CPU events exist: the summary lists the top operators by self CPU time
and reports no launches; it checks that the plumbing works, nothing more.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections import defaultdict
from typing import Callable, Optional

import torch

#: CUDA runtime / driver calls that launch work (counted per step on the host side).
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def host_ms(step: Callable[[], object], device: str, n: int = 5) -> float:
    """Median wall time of issuing one ``step`` with the device idle at its start (a sync before
    each): the host's share. A step with more launches than the queue holds (~1,000) also waits for
    the device, so for big steps this is an upper bound on pure host time."""
    times = []
    for _ in range(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    if device == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams may overlap)."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(events, steps: int, device: str, top: int = 12) -> dict:
    """Per-step summary of profiler events (``prof.events()`` of ``steps`` recorded steps)."""
    by_name: dict[str, list[float]] = defaultdict(list)
    spans: list[tuple[float, float]] = []
    launches = 0
    step_cpu_us = []
    for e in events:
        user = bool(getattr(e, "is_user_annotation", False))
        if e.name.startswith("ProfilerStep"):
            if e.device_type == torch.autograd.DeviceType.CPU:
                step_cpu_us.append(e.time_range.elapsed_us())
            continue
        if device == "cuda":
            if e.device_type == torch.autograd.DeviceType.CUDA and not user:
                by_name[e.name].append(e.time_range.elapsed_us())
                spans.append((e.time_range.start, e.time_range.end))
            elif e.device_type == torch.autograd.DeviceType.CPU and e.name in LAUNCH_CALLS:
                launches += 1
        elif e.device_type == torch.autograd.DeviceType.CPU and not user:
            by_name[e.name].append(e.self_cpu_time_total)
    total = sum(sum(v) for v in by_name.values()) or 1.0
    rows = sorted(((n, len(v), sum(v)) for n, v in by_name.items()), key=lambda t: -t[2])
    out = dict(
        steps=steps,
        what="GPU kernels and copies (device time)" if device == "cuda" else "CPU operators (self CPU time)",
        top=[dict(name=n[:160], calls_per_step=c / steps, us_per_step=t / steps, us_per_call=t / c, share=t / total)
             for n, c, t in rows[:top]],
        distinct=len(rows),
        cpu_ms_per_step_profiled=statistics.median(step_cpu_us) / 1e3 if step_cpu_us else None,
    )
    if device == "cuda":
        kernels = sum(len(v) for n, v in by_name.items() if not n.startswith(("Memcpy", "Memset")))
        out.update(kernels_per_step=kernels / steps, launch_calls_per_step=launches / steps,
                   gpu_busy_ms_per_step=_union_us(spans) / steps / 1e3,
                   gpu_span_ms_per_step=((max(e for _, e in spans) - min(s for s, _ in spans)) / steps / 1e3
                                         if spans else None),
                   # name -> GPU us per step of every kernel, for the per-kernel floors (not only the top ones)
                   kernel_us_per_step={n[:160]: sum(v) / steps for n, v in by_name.items()})
    return out


def profile_steps(step: Callable[[], object], device: str, steps: int = 3, top: int = 12) -> dict:
    """Profile ``steps`` calls of ``step`` (after one warm-up call inside the session) and summarize."""
    from torch.profiler import ProfilerActivity, profile, schedule

    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    got: dict = {}

    def ready(p):
        got["events"] = list(p.events())

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*clears events at the end of each cycle.*")
        with profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=steps), on_trace_ready=ready,
                     record_shapes=False, with_stack=False, profile_memory=False) as prof:
            for _ in range(steps + 1):
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                prof.step()
    return summarize(got.get("events", []), steps, device, top)


def kernel_floor_rows(profile: Optional[dict], floors: dict[str, dict],
                      bandwidths: dict[str, Optional[float]]) -> list[dict]:
    """Each modelled Triton kernel's GPU time per step against its bandwidth floor.

    floors: name -> {calls, bytes, floor_us} (bench.floors.kernel_floors at the spec bandwidth).
    bandwidths: label -> bytes/s (``spec``, ``copy`` measured); ratio = time / (bytes / bandwidth).
    A kernel matches every profiled kernel whose name contains its name.
    """
    times = (profile or {}).get("kernel_us_per_step") or {}
    rows = []
    for name, f in floors.items():
        hits = {n: us for n, us in times.items() if name in n}
        us = sum(hits.values()) if hits else None
        row = dict(kernel=name, calls_modelled=f["calls"], mb=f["bytes"] / 1e6, us_per_step=us,
                   matched=sorted(hits))
        for label, bw in bandwidths.items():
            floor_us = f["bytes"] / bw * 1e6 if bw else None
            row[f"floor_us_{label}"] = floor_us
            row[f"ratio_{label}"] = us / floor_us if us is not None and floor_us else None
        rows.append(row)
    return rows
