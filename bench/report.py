"""Markdown table and PNG plots of a benchmark run (``results.json`` -> ``results.md``, ``ratio_*.png``).

``python -m bench.report DIR`` rebuilds both from ``DIR/results.json`` (e.g. after merging runs).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from .claims import apply_tests_exit_code, tests_exit_code

IMPL_ORDER = ["limit", "merged", "ours", "reference", "addmm", "peft_lora", "peft_vera"]


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def _mb(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


def _header(meta: dict) -> list[str]:
    dirty = " (with uncommitted changes)" if meta.get("dirty") else ""
    out = [f"# Benchmark: {meta['device']} ({meta['mode']}, grid {meta.get('grid')})", "",
           f"- date: {meta['date']}; commit {meta.get('commit')}{dirty}",
           f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, driver {meta.get('driver')}, "
           f"transformers {meta.get('transformers')}, peft {meta.get('peft')}; kernels: {meta.get('kernel_module')}",
           f"- command: `{meta['command']}`",
           f"- timing: {meta.get('timing')}",
           f"- correctness: {meta.get('tolerance')}; a record that fails gets no ratio", ""]
    if meta["mode"] != "gpu":
        out += ["**Smoke mode on a CPU: these timings only show that the benchmark runs; they are not speed "
                "claims.**", ""]
    elif not meta["speed_claims"]:
        out += [f"**No speed claims: {meta.get('no_claims_reason', 'see meta')}.**", ""]
    if meta.get("truncated"):
        out += [f"Truncated: {meta['truncated']}.", ""]
    return out


def targets_table(rows: list[dict]) -> list[str]:
    out = ["## Targets of the kernel work (issue 12)", "",
           "Ratios to the limit come from timings interleaved call by call with the limit; a Triton kernel's "
           "floor is its compulsory bytes (bench/floors.py) at the data-sheet bandwidth.", "",
           "| target | impl | preset | M | measured | goal | status |", "|---|---|---|---:|---:|---|---|"]
    for t in rows:
        status = f"**{t['status']}**" if t["binding"] else t["status"]
        out.append(f"| {t['target']} | {t['impl']} | {t['preset'] or '-'} | {t['M'] or '-'} | {_fmt(t['value'])} | "
                   f"{t['goal']} | {status} |")
    return out + [""]


PIVOT_COLS = ["ours", "addmm", "reference", "merged"]


def pivot(records: list[dict]) -> list[str]:
    """One row per (op, M, K, N, rank, preset): the limit's median and every impl's time / limit.
    PEFT LoRA / VeRA do not depend on our preset: their ratio at the same shape and rank is shown in every row."""
    limit = {(r["op"], r["M"], r["K"], r["N"]): r["median_ms"] for r in records if r["impl"] == "limit" and "median_ms" in r}
    cell = {}
    for r in records:
        val = ("err" if "error" in r else "WRONG" if r.get("ok") is False else _fmt(r.get("ratio_to_limit"), ".2f"))
        key = (r["op"], r["M"], r["K"], r["N"], r["rank"])
        cell[(*key, r["preset"], r["impl"])] = val
        if r["impl"].startswith("peft_"):
            cell[(*key, r["impl"])] = val
    rows = sorted({k[:6] for k in cell if len(k) == 7 and k[6] in PIVOT_COLS})
    if not rows:
        return []
    out = ["## At a glance: time / limit (lower is better; 1.00 = the frozen base layer alone)", "",
           "| op | M | K | N | r | preset | limit ms | " + " | ".join(PIVOT_COLS) + " | PEFT LoRA (same r) | PEFT VeRA (same r) |",
           "|---|---:|---:|---:|---:|---|---:|" + "---:|" * (len(PIVOT_COLS) + 2)]
    for op, M, K, N, rank, preset in sorted(rows, key=lambda k: (k[2], k[3], k[0], k[1], k[4], k[5])):
        cols = [cell.get((op, M, K, N, rank, preset, c), "-") for c in PIVOT_COLS]
        cols += [cell.get((op, M, K, N, rank, c), "-") for c in ("peft_lora", "peft_vera")]
        out.append(f"| {op} | {M} | {K} | {N} | {rank} | {preset} | {_fmt(limit.get((op, M, K, N)), '.4f')} | "
                   + " | ".join(cols) + " |")
    return out + [""]


def e2e_table(e2e: list[dict]) -> list[str]:
    out = []
    first = next((e for e in e2e if "step_ms" in e), None)
    if first:
        out += [f"LLaMA-style, {first['layers']} layers, hidden {first['hidden']}, intermediate "
                f"{first['intermediate']}, rank {first['rank']}, batch {first['batch']} x {first['seq']} tokens, "
                f"{first['dtype']}, AdamW; median of {first['steps']} steps run back to back (CUDA events at step "
                "boundaries, one sync at the end) after the warm-up steps listed.", ""]
    out += ["| config | step ms | tokens/s | x no-adapter | peak MiB | trainable | warm-up steps | wall ms/step "
            "| compiles in timed steps |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in e2e:
        if "error" in e:
            out.append(f"| {e['config']} | error: {e['error'][:80].replace('|', '/')} | | | | | | | |")
            continue
        out.append(f"| {e['config']} | {e['step_ms']:.2f} | {e['tokens_per_s']:.0f} | "
                   f"{_fmt(e.get('ratio_to_no_adapter'))} | {_mb(e.get('peak_mem_bytes'))} | {e['trainable']} | "
                   f"{e.get('warmup_steps', '-')} | {_fmt(e.get('wall_ms_per_step'), '.2f')} | "
                   f"{_fmt(e.get('triton_compiles_in_timed_steps'), 'd')} |")
    return out


def e2e_profile_table(e2e: list[dict]) -> list[str]:
    """Per config: where a step's time goes (after its timing: syncs, host time, profiler)."""
    rows = [e for e in e2e if "step_ms" in e and (e.get("profile") or e.get("profile_error"))]
    if not rows:
        return []
    out = ["", "### Where a training step's time goes (torch.profiler, after the timing)", "",
           "host ms = issuing one step with the device idle at its start (an upper bound when a step "
           "launches more than the queue holds); GPU busy = union of kernel times per step; syncs = "
           "synchronizing host calls in one step.", "",
           "| config | step ms | host ms/step | GPU busy ms/step | kernels/step | launch calls/step | syncs/step "
           "| top kernels (us per step, calls per step) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for e in rows:
        p = e.get("profile") or {}
        if e.get("profile_error"):
            out.append(f"| {e['config']} | {e['step_ms']:.2f} | error: {e['profile_error'][:80].replace('|', '/')} "
                       "| | | | | |")
            continue
        out.append(f"| {e['config']} | {e['step_ms']:.2f} | {_fmt(e.get('host_ms_per_step'), '.2f')} | "
                   f"{_fmt(p.get('gpu_busy_ms_per_step'), '.2f')} | {_fmt(p.get('kernels_per_step'), '.0f')} | "
                   f"{_fmt(p.get('launch_calls_per_step'), '.0f')} | {_fmt(e.get('host_syncs_per_step'), 'd')} | "
                   f"{_top(p, 4)} |")
    return out


def _top(profile: dict, n: int) -> str:
    return "; ".join(f"`{t['name'][:48].replace('|', '/')}` {t['us_per_step']:.0f} ({t['calls_per_step']:.0f})"
                     for t in (profile or {}).get("top", [])[:n]) or "-"


def profile_tables(records: list[dict]) -> list[str]:
    """The microbenchmark's profiler pass: per profiled record, host and GPU figures and the top
    kernels; then each Triton kernel of ours against its bandwidth floor."""
    prof = [r for r in records if r.get("profile")]
    if not prof:
        return []
    out = ["## Where the time goes per call (torch.profiler pass after every timing)", "",
           "| op | M | r | preset | impl | median ms | host ms/call | GPU busy ms/call | kernels/call "
           "| top kernels (us per call, calls) |", "|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
    for r in prof:
        p = r["profile"]
        out.append(f"| {r['op']} | {r['M']} | {r['rank']} | {r['preset']} | {r['impl']} | {_fmt(r.get('median_ms'), '.4f')} | "
                   f"{_fmt(r.get('host_ms_per_call'), '.3f')} | {_fmt(p.get('gpu_busy_ms_per_step'), '.4f')} | "
                   f"{_fmt(p.get('kernels_per_step'), '.0f')} | {_top(p, 5)} |")
    floors = [(r, k) for r in prof for k in r.get("kernel_floors") or []]
    if floors:
        out += ["", "### Each Triton kernel against its own bandwidth floor (target <= 1.3 at the data-sheet bandwidth, judged at M = 8192; at decode the kernels are launch bound)", "",
                "| op | M | r | preset | kernel | MB | us per call | floor us (spec) | x floor (spec) | x floor (copy) "
                "| profiled names |", "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
        for r, k in floors:
            out.append(f"| {r['op']} | {r['M']} | {r['rank']} | {r['preset']} | `{k['kernel']}` | {k['mb']:.1f} | "
                       f"{_fmt(k.get('us_per_step'), '.1f')} | {_fmt(k.get('floor_us_spec'), '.1f')} | "
                       f"{_fmt(k.get('ratio_spec'), '.2f')} | {_fmt(k.get('ratio_copy'), '.2f')} | "
                       f"{', '.join(k.get('matched') or []) or 'not in the profile'} |")
    return out + [""]


def probe_tables(probes: dict | None) -> list[str]:
    if not probes:
        return []
    out = ["## Probes", ""]
    c = probes.get("copy")
    if isinstance(c, dict) and "bytes_per_s" in c:
        out += [f"Device-to-device copy: {c['bytes_per_s'] / 1e12:.2f} TB/s (bytes read + written, "
                f"{c['bytes'] / 2**30:.2f} GiB in {c['median_ms']:.3f} ms).", ""]
    g = probes.get("gemm_epilogue")
    if isinstance(g, list) and g:
        out += ["cuBLAS with beta = 1 (the redesigned op's `L.addmm_(x, W.T)` / `Ldx.addmm_(G, W)`) against the "
                "plain GEMM, timed interleaved:", "",
                "| M | K | N | mm ms | addmm(C, x, W^T) ms | x mm | C.addmm_ ms | x mm | dX: mm(G, W) ms | "
                "Ldx.addmm_(G, W) ms | x mm | mm TFLOP/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in g:
            out.append(f"| {e['M']} | {e['K']} | {e['N']} | {e['mm_ms']:.4f} | {e['addmm_ms']:.4f} | "
                       f"{e['addmm_over_mm']:.3f} | {e['addmm_inplace_ms']:.4f} | {e['addmm_inplace_over_mm']:.3f} | "
                       f"{e['dx_mm_ms']:.4f} | {e['dx_addmm_inplace_ms']:.4f} | {e['dx_addmm_inplace_over_mm']:.3f} | "
                       f"{e['tflops_mm']:.1f} |")
        out.append("")
    elif isinstance(g, dict):
        out += [f"addmm vs mm: {g}", ""]
    m = probes.get("merge_layout")
    if isinstance(m, list) and m:
        out += ["The merged layer's weight: F.linear forward with each weight, timed interleaved (ratio to W):", "",
                "| preset | weight | median ms | p20-p80 ms | x W | stride | dtype | align B | mean abs |",
                "|---|---|---:|---|---:|---|---|---:|---:|"]
        for e in m:
            for v in e["variants"]:
                lay = v["layout"]
                out.append(f"| {e['preset']} | {v['weight']} | {v['median_ms']:.4f} | {v['p20_ms']:.4f}-{v['p80_ms']:.4f} | "
                           f"{v['ratio']:.3f} | {lay['stride']} | {lay['dtype']} | {lay['align_bytes']} | "
                           f"{v['abs_mean']:.4g} |")
        pm = m[0].get("package_merge") or {}
        if "error" in pm:
            out += ["", f"Package merge check: error {pm['error']}"]
        elif pm:
            out += ["", f"Package merge (`tiedlora_kernels.merge`): same storage {pm['same_storage']}, layout kept "
                    f"{pm['keeps_layout']}, values changed {pm['changed_values']}."]
        out.append("")
    elif isinstance(m, dict):
        out += [f"merged layout: {m}", ""]
    return out


def gpu_state_line(records: list[dict], meta: dict) -> list[str]:
    states = [r["gpu_state"] for r in records if r.get("gpu_state")]
    if not states:
        return []
    clocks = sorted(s["sm_mhz"] for s in states)
    power = sorted(s["power_w"] for s in states)
    reasons = sorted({x for s in states for x in s.get("limits", [])})
    start = meta.get("gpu_state_at_start") or {}
    return [f"- GPU state right after each timing: SM clock {clocks[0]}-{clocks[-1]} MHz (median "
            f"{clocks[len(clocks) // 2]}), power {power[0]:.0f}-{power[-1]:.0f} W, clock limits seen: "
            f"{', '.join(reasons) or 'none'}; at start {start.get('sm_mhz')} MHz, {start.get('temp_c')} C", ""]


def decode_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("back_to_back_ms") and r["impl"] != "limit"]
    if not rows:
        return []
    out = ["## Decode: eager back to back and CUDA graph replay (per call, ratio to the limit's same figure)", "",
           "| M | r | preset | impl | do_bench x limit | back-to-back ms | x limit | graph ms | x limit |",
           "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["M"], r["rank"], r["preset"], r["impl"])):
        g = r.get("graph_error")
        out.append(f"| {r['M']} | {r['rank']} | {r['preset']} | {r['impl']} | {_fmt(r.get('ratio_to_limit'), '.2f')} | "
                   f"{r['back_to_back_ms']:.4f} | {_fmt(r.get('b2b_ratio_to_limit'), '.2f')} | "
                   f"{_fmt(r.get('graph_ms'), '.4f') if not g else 'error: ' + g[:40].replace('|', '/')} | "
                   f"{_fmt(r.get('graph_ratio_to_limit'), '.2f')} |")
    return out + [""]


def markdown(meta: dict, records: list[dict], e2e: list[dict], targets: list[dict] | None = None,
             probes: dict | None = None) -> str:
    out = _header(meta)
    out += gpu_state_line(records, meta)
    if targets:
        out += targets_table(targets)
    out += pivot(records)
    out += decode_table(records)
    out += probe_tables(probes)
    out += profile_tables(records)
    out += ["## Per-layer microbenchmarks, every figure", "",
            "ratio = median time / the base layer alone (`limit`, F.linear) on the same shape, timed in alternation "
            "with it; vs PEFT = PEFT LoRA's ratio at the same rank / this ratio; saved = activation bytes autograd "
            "keeps for backward (frozen weights excluded); peak = extra device memory during one call.", ""]
    rows = ["| op | M | K | N | r | preset | impl | median ms | x limit | vs PEFT LoRA | TFLOP/s | GB/s | saved MiB "
            "| peak MiB | rel err | ok |",
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = {n: i for i, n in enumerate(IMPL_ORDER)}
    recs = sorted(records, key=lambda r: (r["K"], r["N"], r["op"], r["M"], r["rank"], r["preset"],
                                          order.get(r["impl"], 99)))
    for r in recs:
        lead = f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['rank']} | {r['preset']} | {r['impl']} |"
        if "error" in r:
            rows.append(f"{lead} error: {r['error'][:80].replace('|', '/')} | | | | | | | | | no |")
            continue
        err = max(r.get("rel_err", 0.0), r.get("rel_err_grad") or 0.0) if "rel_err" in r else None
        ok = "-" if "ok" not in r else "yes" if r["ok"] else "**NO**"
        rows.append(f"{lead} {r['median_ms']:.4f} | {_fmt(r.get('ratio_to_limit'))} | "
                    f"{_fmt(r.get('speedup_vs_peft_lora'), '.2f')} | {r['tflops']:.1f} | {r['gbps']:.0f} | "
                    f"{_mb(r.get('saved_bytes'))} | {_mb(r.get('peak_mem_bytes'))} | {_fmt(err, '.1e')} | {ok} |")
    out += rows
    if e2e:
        out += ["", "## End-to-end training step", ""] + e2e_table(e2e) + e2e_profile_table(e2e)
    return "\n".join(out) + "\n"


PRESET_STYLE = {"lora": "-", "vera": "--", "tl6": ":"}


def plots(records: list[dict], out: Path, note: str = "") -> list[Path]:
    """Ratio to the limit vs M: one PNG per (op, K, N), one panel per rank; colour = impl, line style = preset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    colours = {impl: plt.get_cmap("tab10")(i) for i, impl in enumerate(IMPL_ORDER)}
    series = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        if "ratio_to_limit" in r and r["impl"] != "limit":
            series[(r["op"], r["K"], r["N"])][r["rank"]][(r["impl"], r["preset"])].append((r["M"], r["ratio_to_limit"]))
    paths = []
    order = lambda kv: (IMPL_ORDER.index(kv[0][0]) if kv[0][0] in IMPL_ORDER else 99, kv[0][1])  # noqa: E731
    for (op, K, N), by_rank in sorted(series.items()):
        ranks = sorted(by_rank)
        fig, axes = plt.subplots(1, len(ranks), figsize=(4.5 * len(ranks), 4.2), sharey=True, squeeze=False)
        for ax, rank in zip(axes[0], ranks):
            for (impl, preset), pts in sorted(by_rank[rank].items(), key=order):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], PRESET_STYLE.get(preset, "-"), marker="o",
                        markersize=3, color=colours.get(impl), label=f"{impl} {preset}")
            ax.axhline(1.0, color="black", linewidth=0.8)
            for goal in (1.12, 1.25):  # the H200's fwd+bwd targets at r = 16 / 128 (H100: +0.04), for the eye
                ax.axhline(goal, color="grey", linewidth=0.6, linestyle="-.")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rows M")
            ax.set_title(f"rank {rank}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("time / base layer alone")
        axes[0][-1].legend(fontsize=6, ncol=1, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"{op}, K={K}, N={N}{note}")
        path = out / f"ratio_{op}_K{K}_N{N}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_note(meta: dict) -> str:
    return (f" ({meta['device']})" if meta["mode"] == "gpu" else
            " - SMOKE MODE on a CPU: not a speed claim")


def readme_snippet(meta: dict, records: list[dict], e2e: list[dict], targets: list[dict], folder: str) -> str:
    """The README's speed section for one GPU run: where it came from, the targets, the target shape's ratios."""
    if meta["mode"] != "gpu":
        raise ValueError("only a GPU run goes into the README (this one is %r)" % meta["mode"])
    dirty = " plus uncommitted changes" if meta.get("dirty") else ""
    out = [f"Latest GPU run: {meta['date'][:10]}, {meta['device']} (driver {meta.get('driver')}), torch "
           f"{meta['torch']}, triton {meta['triton']}, commit `{(meta.get('commit') or 'unknown')[:12]}`{dirty}; "
           f"`{meta['command']}`; full tables and plots in [`{folder}`]({folder}).", ""]
    if meta.get("truncated"):
        out += [f"**Cut short: {meta['truncated']}.**", ""]
    if not meta["speed_claims"]:  # the measurements only: no target is judged
        out += [f"**No speed claims from this run: {meta.get('no_claims_reason', 'see results.json')}.**", ""]
    else:
        out += targets_table([t for t in targets if t["binding"]])[2:]
    glance = pivot([r for r in records if r["K"] == 4096 and r["N"] == 4096])
    out += glance[2:] if glance else []
    if e2e:
        out += [""] + e2e_table(e2e)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report DIR [--readme] [--tests-exit-code N]``: rebuild DIR's results.md and
    plots from its JSON; with --tests-exit-code, first record the exit code of a test run made after
    the benchmark (nonzero withdraws the speed claims); with --readme, print the README speed section
    for that run instead."""
    from .run import add_ratios
    from .targets import targets

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0])
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    if "--tests-exit-code" in args:
        apply_tests_exit_code(meta, tests_exit_code(args[args.index("--tests-exit-code") + 1]))
    add_ratios(data["records"])
    tg = targets(data["records"], data["e2e"], meta.get("device")) if meta["speed_claims"] else []
    if "--readme" in args:
        print(readme_snippet(meta, data["records"], data["e2e"], targets(data["records"], data["e2e"], meta.get("device")),
                             out.as_posix()), end="")
        return 0
    data["targets"] = tg
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(markdown(meta, data["records"], data["e2e"], tg, data.get("probes")))
    if "--no-plots" not in args:
        plots(data["records"], out, plot_note(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
