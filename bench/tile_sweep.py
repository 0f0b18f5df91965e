"""Launch configurations of the Triton kernels, each timed against its byte floor (issue 12: the
kernels measured 1.9-17x their floors with tiles chosen on paper, bench/NOTES.md section 3).

    python -m bench.tile_sweep [--out DIR] [--max-seconds S] [--cases SUBSTRINGS] [--smoke]
    python -m bench.tile_sweep --compile-only 90   # no GPU: does every configuration fit sm_90?

Cases: bf16 activations, fp32 adapters, every adapter tensor trained (tl6), K = N = 4096:
``_adapter_term_kernel`` as the forward (x, h stored) and as dX's term (G, B's columns scaled by v)
at M = 8192, r = 16 and 128, and as decode's forward (M = 1 and 16, no h); ``_grad_factors_kernel``
(with its ``_grad_finish_kernel``) at M = 8192, r = 16 and 128. Per case the current rule's
configuration comes first, then the alternatives NOTES.md section 3 argues for: taller row blocks
(fewer programs re-reading A and B from L2), A cast to x's dtype before the kernel (half the
re-read bytes and a bf16 dot in place of the fp32 (TF32) one: what fp32-accurate factor gradients
cost, ~4e-3 relative error on them in exchange), wider or narrower
column tiles, more warps, deeper pipelines, fewer column splits and longer K steps at decode.

Each configuration's outputs are compared with the current configuration's (``rel_err``: the same
math in another order, ~1e-3 in bf16; a configuration that does not compile or launch is recorded
with its error) and timed with ``triton.testing.do_bench`` (L2 flushed between calls, median); the
current configuration is timed again after the others, and another configuration is named the
case's fastest only when its gain beats that pair's spread and is at least ``MIN_GAIN``.
``ratio`` = time / the launch's bandwidth floor (``bench.floors``, data-sheet bandwidth). The
cases run in order of what they decide, and the sweep stops at ``--max-seconds`` with what it has:
each configuration compiles once (~1-2 s), so a full sweep takes a few minutes of a GPU.

Writes ``tile_sweep.json`` (device, versions, commit, command, every record, the current
configurations' spreads) and ``tile_sweep.md`` (per case: the current configuration, the fastest,
and its gain). On a CPU (``--smoke``, the kernels on the Triton interpreter) the shapes are tiny
and no time is a kernel speed: the harness is what is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .claims import apply_tests_exit_code, measured_commit, tests_exit_code
from .floors import design_costs, spec_bandwidth

# The package's kernels are imported where used: on a CPU, ``main`` first selects the Triton
# interpreter, which must happen before the kernels are defined.


@dataclass
class SweepCase:
    """One kernel use: ``run(config, variant)`` launches it and returns its outputs; ``floor_bytes``
    its compulsory bytes; ``configs`` (label, config, variant) with the current rule's first."""

    name: str
    kernel: str
    shape: dict
    floor_bytes: float
    run: Callable
    configs: list = field(default_factory=list)


def _generator(device, seed: int) -> Optional[torch.Generator]:
    """The seeded source of a case's inputs; None on the meta device (:func:`compile_check`: shapes,
    no values)."""
    return None if torch.device(device).type == "meta" else torch.Generator(device=device).manual_seed(seed)


def _rnd(g, *shape, scale=1.0, dtype=torch.float32, device="cpu"):
    if g is None:
        return torch.empty(*shape, dtype=dtype, device="meta")
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


def _term_case(kind: str, M: int, K: int, N: int, r: int, device, dtype, smoke: bool) -> SweepCase:
    """``_adapter_term_kernel`` as the forward ("fwd": x -> L, h), dX's term ("dx": G -> Ldx, g, B's
    columns scaled by v) or decode ("decode": x -> L, no h)."""
    from tiedlora_kernels.ops.adapter_term import _tiles, adapter_term
    from tiedlora_kernels.ops.common import block_r

    g = _generator(device, M + r)
    A = _rnd(g, r, K, scale=K ** -0.5, device=device)
    B = _rnd(g, N, r, scale=0.1, device=device)
    u, v, b = _rnd(g, r, device=device), _rnd(g, N, device=device), _rnd(g, N, dtype=dtype, device=device)
    if kind == "dx":
        src = _rnd(g, M, N, dtype=dtype, device=device)
        down, up, scale_cols = B.t(), A.t(), v
    else:
        src = _rnd(g, M, K, dtype=dtype, device=device)
        down, up, scale_cols = A, B, None
    store_h = kind != "decode"
    down_low = down.to(dtype) if scale_cols is None else None  # the cast shared per kind (NOTES.md lever)

    def run(cfg, variant: str):
        d = down_low if variant == "down in x dtype" else down
        if kind == "dx":
            return adapter_term(src, d, up, u, None, None, 0.5, 0.0, None, in_dropout=False, out_dropout=False,
                                store_h=True, down_scale=scale_cols, tiles=cfg)
        return adapter_term(src, d, up, u, v, b, 0.5, 0.0, None, in_dropout=False, out_dropout=False,
                            store_h=store_h, tiles=cfg)

    op, phase = ("fwd", "fwd") if kind == "decode" else ("fwd_bwd", "fwd" if kind == "fwd" else "bwd")
    costs = [c for c in design_costs(M, K, N, r, op) if c.name == "_adapter_term_kernel" and c.phase == phase]
    # dX's term reads G (M, N) and writes Ldx (M, K): design_costs names the same launch for both roles
    case = SweepCase(f"{kind} r={r} M={M}", "_adapter_term_kernel", dict(M=M, K=K, N=N, r=r, dtype=str(dtype)),
                     costs[0].bytes, run)
    # bf16 activations on a GPU (fp32 only on the interpreter, whose tiles are fixed): the launcher's
    # IEEE-fp32 rule never applies here
    cur = _tiles(M, block_r(r), src.device)
    case.configs.append(("current rule", cur, ""))
    if smoke:
        case.configs += [("BLOCK_M 16", cur._replace(block_m=16), ""), ("splits 1", cur._replace(splits=1), "")]
        if down_low is not None:
            case.configs.append(("current, A in x dtype", cur, "down in x dtype"))
        return case
    alts: list[tuple] = []
    if kind == "decode":
        for splits in (4, 8, 16):
            alts.append((f"splits {splits}", cur._replace(splits=splits), ""))
        alts += [("BLOCK_K 256", cur._replace(block_k=256), ""),
                 ("BLOCK_K 256, splits 8", cur._replace(block_k=256, splits=8), ""),
                 ("BLOCK_N 64", cur._replace(block_n=64), ""),
                 ("BLOCK_K 256, 8 warps", cur._replace(block_k=256, num_warps=8), "")]
    elif r <= 64:
        alts += [("BLOCK_M 64", cur._replace(block_m=64), ""),
                 ("BLOCK_M 64, 8 warps", cur._replace(block_m=64, num_warps=8), ""),
                 ("BLOCK_M 128, BLOCK_K 64, 8 warps", cur._replace(block_m=128, block_k=64, num_warps=8), ""),
                 ("4 stages", cur._replace(num_stages=4), ""),
                 ("BLOCK_M 64, BLOCK_K 64, 4 stages", cur._replace(block_m=64, block_k=64, num_stages=4), ""),
                 ("BLOCK_N 256, 8 warps", cur._replace(block_n=256, num_warps=8), ""),
                 ("BLOCK_M 16", cur._replace(block_m=16), "")]
    else:
        alts += [("BLOCK_M 64", cur._replace(block_m=64), ""),
                 # both together with the default 3 stages need 240 KiB of shared memory, over sm_90's 227
                 ("BLOCK_M 64, BLOCK_N 128, 2 stages", cur._replace(block_m=64, block_n=128, num_stages=2), ""),
                 ("BLOCK_N 128", cur._replace(block_n=128), ""),
                 ("BLOCK_K 32, 4 stages", cur._replace(block_k=32, num_stages=4), ""),
                 ("BLOCK_M 128, BLOCK_K 32", cur._replace(block_m=128, block_k=32), ""),
                 ("4 warps", cur._replace(num_warps=4), "")]
    if down_low is not None:
        alts.insert(0, ("current, A in x dtype", cur, "down in x dtype"))
        if kind != "decode":
            alts.insert(2, ("BLOCK_M 64, A in x dtype", cur._replace(block_m=64), "down in x dtype"))
    case.configs += alts
    return case


def _factors_case(M: int, K: int, N: int, r: int, device, dtype, smoke: bool) -> SweepCase:
    """``_grad_factors_kernel`` (dA over x, dB / dv / du over G) and its finish, every factor trained."""
    from tiedlora_kernels.ops.common import precisions
    from tiedlora_kernels.ops.grad_factors import _factor_tiles, grad_factors

    g = _generator(device, M + r + 1)
    x = _rnd(g, M, K, dtype=dtype, device=device)
    G = _rnd(g, M, N, dtype=dtype, device=device)
    h, gr = _rnd(g, M, r, device=device), _rnd(g, M, r, device=device)
    A = _rnd(g, r, K, scale=K ** -0.5, device=device)
    B = _rnd(g, N, r, scale=0.1, device=device)
    u, v = _rnd(g, r, device=device), _rnd(g, N, device=device)

    def run(cfg, variant: str):
        return grad_factors(x, G, h, gr, A, B, u, v, 0.5, 0.0, None, False, True, True, True, True, tiles=cfg)

    names = ("_grad_factors_kernel", "_grad_finish_kernel")
    nbytes = sum(c.bytes for c in design_costs(M, K, N, r, "fwd_bwd") if c.name in names)
    case = SweepCase(f"grad_factors r={r} M={M}", "_grad_factors_kernel + _grad_finish_kernel",
                     dict(M=M, K=K, N=N, r=r, dtype=str(dtype)), nbytes, run)
    cur = _factor_tiles(r, precisions(dtype)["SMALL_PREC"])
    case.configs.append(("current rule", cur, ""))
    if smoke:
        case.configs.append(("BLOCK_M 16", cur._replace(block_m_a=16, block_m_p=16), ""))
        return case
    if r <= 64:
        case.configs += [("cols 128", cur._replace(block_cols=128), ""),
                         ("cols 128, 8 warps", cur._replace(block_cols=128, num_warps=8), ""),
                         ("BLOCK_M 128", cur._replace(block_m_a=128, block_m_p=128), ""),
                         ("BLOCK_M 32", cur._replace(block_m_a=32, block_m_p=32), ""),
                         ("4 stages", cur._replace(num_stages=4), "")]
    else:
        case.configs += [("cols 64", cur._replace(block_cols=64), ""),
                         ("BLOCK_M 32", cur._replace(block_m_a=32, block_m_p=32), ""),
                         ("cols 64, BLOCK_M 32", cur._replace(block_cols=64, block_m_a=32, block_m_p=32), ""),
                         ("2 stages", cur._replace(num_stages=2), ""),
                         ("cols 16", cur._replace(block_cols=16), "")]
    return case


def _decode_layer_case(M: int, K: int, N: int, r: int, device, dtype, smoke: bool) -> SweepCase:
    """The whole layer at decode: the general path (``adapter_term`` + cuBLAS ``addmm_``: two
    launches), the one-launch ``decode_linear`` in its configurations, and the base layer alone
    (``F.linear``, the limit: its output differs, no rel err). Decides ``FUSED_DECODE_MAX_ROWS``."""
    import torch.nn.functional as F

    from tiedlora_kernels.ops.adapter_term import adapter_term
    from tiedlora_kernels.ops.common import block_r
    from tiedlora_kernels.ops.decode_linear import _decode_tiles, decode_linear

    g = _generator(device, M + r + 2)
    x = _rnd(g, M, K, dtype=dtype, device=device)
    W = _rnd(g, N, K, scale=K ** -0.5, dtype=dtype, device=device)
    A = _rnd(g, r, K, scale=K ** -0.5, device=device)
    B = _rnd(g, N, r, scale=0.1, device=device)
    u, v, b = _rnd(g, r, device=device), _rnd(g, N, device=device), _rnd(g, N, dtype=dtype, device=device)
    A_low = A.to(dtype)

    def run(cfg, variant: str):
        if variant == "limit":
            return (F.linear(x, W, b),)
        if variant == "general":
            L, _ = adapter_term(x, A, B, u, v, b, 0.5, 0.0, None, in_dropout=False, out_dropout=False, store_h=False)
            return (L.addmm_(x, W.t()),)
        return (decode_linear(x, W, b, A_low if variant == "fused, A in x dtype" else A, B, u, v, None, 0.5, tiles=cfg),)

    # the layer's compulsory bytes: W, x and out once (the adapter's own are small at decode)
    case = SweepCase(f"decode layer r={r} M={M}", "whole layer", dict(M=M, K=K, N=N, r=r, dtype=str(dtype)),
                     x.element_size() * (N * K + M * K + M * N), run)
    cur = _decode_tiles(M, N, block_r(r), x.device)
    case.configs += [("general path: adapter_term + addmm_", None, "general"), ("fused, current rule", cur, "fused")]
    if smoke:
        case.configs.append(("fused, BLOCK_N 16", cur._replace(block_n=16), "fused"))
    else:
        case.configs += [("fused, A in x dtype", cur, "fused, A in x dtype"),
                         ("fused, BLOCK_N 64", cur._replace(block_n=64), "fused"),
                         ("fused, BLOCK_K 128", cur._replace(block_k=128), "fused"),
                         ("fused, 8 warps", cur._replace(num_warps=8), "fused"),
                         ("fused, 4 stages", cur._replace(num_stages=4), "fused"),
                         ("fused, BLOCK_N 64, BLOCK_K 128, 8 warps",
                          cur._replace(block_n=64, block_k=128, num_warps=8), "fused")]
    case.configs.append(("limit: F.linear alone", None, "limit"))
    return case


def cases(device, smoke: bool) -> list[SweepCase]:
    """The sweep's cases, most decisive first (the forward at r = 16 is the issue's forward target)."""
    dtype = torch.bfloat16
    if smoke:  # the interpreter: tiny shapes, fp32 (its bf16 dot is upcast anyway)
        K, N, M = 40, 24, 37
        return [_term_case("fwd", M, K, N, 3, device, torch.float32, True),
                _term_case("dx", M, K, N, 3, device, torch.float32, True),
                _term_case("decode", 1, K, N, 3, device, torch.float32, True),
                _factors_case(M, K, N, 3, device, torch.float32, True),
                _decode_layer_case(1, K, N, 3, device, torch.float32, True)]
    K = N = 4096
    return [_term_case("fwd", 8192, K, N, 16, device, dtype, False),
            _factors_case(8192, K, N, 16, device, dtype, False),
            _term_case("dx", 8192, K, N, 16, device, dtype, False),
            _term_case("decode", 1, K, N, 16, device, dtype, False),
            _decode_layer_case(1, K, N, 16, device, dtype, False),
            _decode_layer_case(16, K, N, 16, device, dtype, False),
            _term_case("fwd", 8192, K, N, 128, device, dtype, False),
            _factors_case(8192, K, N, 128, device, dtype, False),
            _term_case("dx", 8192, K, N, 128, device, dtype, False),
            _term_case("decode", 16, K, N, 16, device, dtype, False)]


def select_cases(chosen: list[SweepCase], wanted: str) -> list[SweepCase]:
    """The cases ``--cases`` names: comma-separated, each a full case name (that case alone: "decode
    r=16 M=1" is also part of "decode r=16 M=16") or a part of the names it selects."""
    names = {c.name for c in chosen}
    parts = [w.strip() for w in wanted.split(",") if w.strip()]
    return [c for c in chosen if any(w == c.name if w in names else w in c.name for w in parts)]


def compile_check(arch: int) -> list[dict]:
    """Every GPU configuration of the sweep compiled for sm_``arch`` without a GPU (meta tensors under
    ``bench.compile_report``'s compile-only driver; ``TRITON_INTERPRET`` unset): per launched kernel
    its shared memory against the architecture's limit, or the configuration's compile error. A
    configuration that cannot launch costs a GPU session its compile time and its place in the sweep."""
    from .compile_report import SMEM_LIMIT, compile_only

    with compile_only(arch):  # the tile rules read the device's size from the driver it replaces
        chosen = cases(torch.device("meta"), False)
    rows = []
    for case in chosen:
        for label, cfg, variant in case.configs:
            with compile_only(arch) as launched:
                try:
                    case.run(cfg, variant)
                except Exception as e:
                    rows.append(dict(case=case.name, config=label, error=f"{type(e).__name__}: {str(e)[:300]}"))
            for kernel_name, _, kernel in launched:
                shared = int(kernel.metadata.shared)
                rows.append(dict(case=case.name, config=label, kernel=kernel_name, shared_bytes=shared,
                                 fits_smem=shared <= SMEM_LIMIT[arch]))
    return rows


def _rel_err(outs, refs) -> float:
    """The worst ||out - ref|| / ||ref|| over the outputs; inf where an output is not finite where
    its reference is (a NaN must never read as a match)."""
    worst = 0.0
    for o, ref in zip(outs, refs):
        if o is None or ref is None:
            continue
        o, ref = o.double(), ref.double()
        if not torch.equal(torch.isfinite(o), torch.isfinite(ref)):
            return float("inf")
        keep = torch.isfinite(ref)
        worst = max(worst, float((o[keep] - ref[keep]).norm() / ref[keep].norm().clamp_min(1e-30)))
    return worst


def _time_us(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")) * 1e3
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def sweep(case_list: list[SweepCase], cuda: bool, bandwidth: Optional[float], deadline: float,
          write: Callable[[list], None]) -> list[dict]:
    """Run every configuration of every case until ``deadline`` (time.monotonic()), then time the
    case's current configuration again (:func:`_retime_current`); ``write`` is called with the
    records after each case."""
    records: list[dict] = []
    for case in case_list:
        floor_us = case.floor_bytes / bandwidth * 1e6 if bandwidth else None
        ref = None  # the current configuration's outputs: every other one is checked against them
        first = len(records)
        for i, (label, cfg, variant) in enumerate(case.configs):
            if time.monotonic() > deadline:
                records.append(dict(case=case.name, config=label, current=i == 0, skipped="deadline"))
                continue
            rec = dict(case=case.name, kernel=case.kernel, shape=case.shape, config=label, current=i == 0,
                       variant=variant or None, tiles=cfg._asdict() if cfg is not None else None,
                       floor_bytes=case.floor_bytes, floor_us=floor_us)
            try:
                outs = [t for t in case.run(cfg, variant) if t is not None]
                if i == 0:
                    ref = outs
                # the limit computes no adapter, and without the current outputs there is no reference
                rec["rel_err_vs_current"] = None if variant == "limit" or ref is None else _rel_err(outs, ref)
                us = _time_us(lambda: case.run(cfg, variant), cuda)
                rec["us" if cuda else "cpu_wall_us_not_kernel_speed"] = round(us, 2)
                if cuda and floor_us:
                    rec["ratio_to_floor"] = round(us / floor_us, 3)
            except Exception as e:  # a configuration that does not compile or launch (shared memory, ...)
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            records.append(rec)
        _retime_current(case, records[first], cuda)
        write(records)
    return records


def _retime_current(case: SweepCase, current: dict, cuda: bool) -> None:
    """Time the current configuration once more, after the others (one do_bench median each, in
    order: clocks and temperature drift over a case): its record keeps both timings
    (``timings_us``), the faster as its time, and their ``spread`` (slower / faster - 1), the noise
    an alternative must beat to be named the case's fastest (:func:`fastest_per_case`). Done past
    the deadline too: the kernel is compiled, a timing is a fraction of a second."""
    key = "us" if cuda else "cpu_wall_us_not_kernel_speed"
    if key not in current:
        return
    _, cfg, variant = case.configs[0]
    try:
        again = round(_time_us(lambda: case.run(cfg, variant), cuda), 2)
    except Exception as e:
        current["retime_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return
    timings = [current[key], again]
    current["timings_us"] = timings
    current["spread"] = round(max(timings) / min(timings) - 1, 4)
    current[key] = min(timings)
    if "ratio_to_floor" in current:
        current["ratio_to_floor"] = round(min(timings) / current["floor_us"], 3)


#: Variants that change what is computed, not only how: the bf16 down-projection dot where fp32 factors
#: on bf16 activations take an fp32 (TF32) one (~4e-3 relative error on h and the factor gradients).
#: Timed and shown, never the "fastest" of a case: adopting one is a precision decision.
PRECISION_VARIANTS = ("down in x dtype", "fused, A in x dtype")


#: The least gain (current time / its time) that names another configuration a case's fastest, on
#: top of beating the current configuration's own spread: each configuration is one do_bench median,
#: and a 1.001 "gain" is noise, not a reason to change a tile rule.
MIN_GAIN = 1.03


def fastest_per_case(records: list[dict]) -> list[dict]:
    """Per timed case: its current configuration (the first) and the fastest: the quickest other one
    that computes the same thing (same precision: no :data:`PRECISION_VARIANTS`), whose outputs agree
    with the current one's (rel err <= 1e-2, a different summation order rounded to bf16; the limit
    computes no adapter and is no option), and whose gain over the current one's faster timing is
    at least :data:`MIN_GAIN` and above 1 + the current one's ``spread``; else the current one (also
    without a spread: a current configuration timed once cannot tell a gain from noise)."""
    rows = []
    for name in dict.fromkeys(r["case"] for r in records):
        mine = [r for r in records if r["case"] == name and r.get("us") and "error" not in r]
        current = next((r for r in mine if r.get("current")), None)
        if current is None:
            continue
        others = [r for r in mine if not r.get("current") and r.get("variant") not in PRECISION_VARIANTS
                  and r.get("rel_err_vs_current") is not None and r["rel_err_vs_current"] <= 1e-2]
        spread = current.get("spread")
        best = min(others, key=lambda r: r["us"], default=None)
        gain = current["us"] / best["us"] if best else None
        if gain is None or spread is None or gain < MIN_GAIN or gain <= 1 + spread:
            best = current
        rows.append(dict(case=name, current=current["config"], current_us=current["us"],
                         current_ratio=current.get("ratio_to_floor"), current_spread=spread, fastest=best["config"],
                         fastest_us=best["us"], fastest_ratio=best.get("ratio_to_floor"),
                         gain=round(current["us"] / best["us"], 3)))
    return rows


def markdown(meta: dict, records: list[dict]) -> str:
    """Per case every configuration against the case's current one (its first), then
    :func:`fastest_per_case`."""
    how = (f"time = do_bench median (L2 flushed); ratio = time / byte floor at {meta['bandwidth']} B/s"
           if meta["cuda"] else "CPU interpreter: no time here is a kernel speed")
    lines = [f"# Tile sweep: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"commit {meta['commit']}", "", f"`{meta['command']}`; {how}.", "",
             "| case | config | us | ratio to floor | gain vs current | rel err vs current |",
             "|---|---|---:|---:|---:|---:|"]
    current = {r["case"]: r.get("us") for r in records if r.get("current")}
    for r in records:
        problem = r.get("error") or r.get("skipped")
        us = r.get("us")
        gain = f"{current[r['case']] / us:.2f}x" if us and current.get(r["case"]) else "-"
        err = r.get("rel_err_vs_current")
        err = "-" if err is None else f"{err:.1e}"
        lines.append(f"| {r['case']} | {r['config']} | {problem or us or '-'} | {r.get('ratio_to_floor', '-')} "
                     f"| {gain} | {err} |")
    lines += ["", "## Fastest per case (same precision, outputs within 1e-2 of the current configuration's; "
              f"the {', '.join(repr(v) for v in PRECISION_VARIANTS)} rows above trade precision and are not candidates; "
              f"another configuration only with a gain of at least {MIN_GAIN} and above the current one's spread, "
              "its two timings, first and last of the case: else the current one)", "",
              "| case | current us | current spread | fastest | us | gain |", "|---|---:|---:|---|---:|---:|"]
    if meta.get("speed_claims", True):
        spread = lambda f: "-" if f["current_spread"] is None else f"{100 * f['current_spread']:.1f}%"  # noqa: E731
        lines += [f"| {f['case']} | {f['current_us']} | {spread(f)} | {f['fastest']} | {f['fastest_us']} | "
                  f"{f['gain']:.2f}x |" for f in fastest_per_case(records)]
    else:
        lines += ["", f"None claimed: {meta.get('no_claims_reason') or 'not measured on a GPU'}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/tile-sweep")
    ap.add_argument("--max-seconds", type=float, default=240.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU interpreter's harness check)")
    ap.add_argument("--cases", default="", help="comma-separated substrings: only the cases whose name holds one, "
                    "or is one (e.g. 'r=128,decode layer': a second call for the cases a first one did not reach)")
    ap.add_argument("--compile-only", type=int, metavar="ARCH", default=None,
                    help="compile every GPU configuration for sm_ARCH (e.g. 90) without a GPU and list each "
                         "kernel's shared memory; exit 1 if one does not fit or compile (TRITON_INTERPRET unset)")
    ap.add_argument("--tests-exit-code", type=tests_exit_code, default=None,
                    help="the cuda-marked tests' exit code (bench/gpu_session.sh passes it): nonzero withdraws the "
                         "sweep's speed claims, its fastest-per-case list included")
    args = ap.parse_args(argv)
    if args.compile_only is not None:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("bench.tile_sweep --compile-only: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        rows = compile_check(args.compile_only)
        for r in rows:
            print(f"{r['case']} | {r['config']} | " + (f"ERROR {r['error']}" if "error" in r else
                  f"{r['kernel']}: {r['shared_bytes'] // 1024} KiB shared" + ("" if r["fits_smem"] else " DOES NOT FIT")))
        bad = [r for r in rows if "error" in r or not r["fits_smem"]]
        print(f"{len(rows)} kernels compiled for sm_{args.compile_only}; {len(bad)} do not fit or compile")
        return 1 if bad else 0
    cuda = torch.cuda.is_available()
    if not cuda:  # the harness on the interpreter (tiny shapes): set before the kernels are defined
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    meta = dict(device=name, cuda=cuda, torch=torch.__version__, triton=triton.__version__,
                bandwidth=spec_bandwidth(name) if cuda else None,
                commit=measured_commit()[0], mode="gpu" if cuda else "smoke-cpu", speed_claims=cuda,
                command="python -m bench.tile_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    apply_tests_exit_code(meta, args.tests_exit_code)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(records):
        tmp = out / "tile_sweep.json.tmp"
        fastest = fastest_per_case(records) if meta["speed_claims"] else []
        tmp.write_text(json.dumps(dict(meta=meta, records=records, fastest=fastest), indent=1))
        tmp.replace(out / "tile_sweep.json")
        (out / "tile_sweep.md").write_text(markdown(meta, records))

    deadline = time.monotonic() + args.max_seconds
    chosen = cases(device, args.smoke or not cuda)
    if args.cases.strip():
        chosen = select_cases(chosen, args.cases)
        if not chosen:
            raise SystemExit(f"bench.tile_sweep: --cases {args.cases!r} matches none of the cases")
    records = sweep(chosen, cuda, meta["bandwidth"], deadline, write)
    write(records)
    print((out / "tile_sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
