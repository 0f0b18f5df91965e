"""Markdown table and PNG plots of a benchmark run."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(meta: dict, records: list[dict], e2e: list[dict]) -> str:
    head = [f"# Benchmark ({meta['mode']})", "",
            f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
            f"driver {meta.get('driver')}; commit {meta.get('commit')}; {meta['date']}", "",
            f"Command: `{meta['command']}`", ""]
    if not meta["speed_claims"]:
        head += ["**Smoke mode on a CPU: these timings check that the benchmark runs; they are not speed claims.**", ""]
    if meta.get("truncated"):
        head += [f"Truncated: {meta['truncated']}", ""]
    rows = ["| op | M | K | N | r | preset | impl | median ms | x limit | vs PEFT LoRA | TFLOP/s | saved MB | ok |",
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['rank']} | {r['preset']} | {r['impl']} | "
                        f"error: {r['error'][:60]} | | | | | no |")
            continue
        saved = r.get("saved_bytes")
        rows.append(f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['rank']} | {r['preset']} | {r['impl']} | "
                    f"{r['median_ms']:.4f} | {_fmt(r.get('ratio_to_limit'))} | {_fmt(r.get('speedup_vs_peft_lora'))} | "
                    f"{r['tflops']:.2f} | {_fmt(saved / 2**20 if saved is not None else None, '.1f')} | "
                    f"{'yes' if r.get('ok', True) else 'NO'} |")
    out = head + rows
    if e2e:
        out += ["", "## End-to-end training step", "",
                "| config | layers | hidden | tokens/step | step ms | tokens/s | x no-adapter | peak MB | trainable |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        base = next((e["step_ms"] for e in e2e if e["config"] == "no_adapter"), None)
        for e in e2e:
            ratio = e["step_ms"] / base if base else None
            peak = e.get("peak_mem_bytes")
            out.append(f"| {e['config']} | {e['layers']} | {e['hidden']} | {e['tokens']} | {e['step_ms']:.2f} | "
                       f"{e['tokens_per_s']:.0f} | {_fmt(ratio)} | {_fmt(peak / 2**20 if peak else None, '.0f')} | "
                       f"{e['trainable']} |")
    return "\n".join(out) + "\n"


def plots(records: list[dict], out: Path) -> list[Path]:
    """ratio to limit vs M, one PNG per (op, K, N), one line per (impl, preset, rank)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    series = defaultdict(lambda: defaultdict(list))
    for r in records:
        if "ratio_to_limit" in r and r["impl"] not in ("limit",):
            series[(r["op"], r["K"], r["N"])][(r["impl"], r["preset"], r["rank"])].append((r["M"], r["ratio_to_limit"]))
    paths = []
    for (op, K, N), lines in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(8, 5))
        for (impl, preset, rank), pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{impl} {preset} r{rank}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows M")
        ax.set_ylabel("time / limit (base layer alone)")
        ax.set_title(f"{op}, K={K}, N={N}")
        ax.legend(fontsize=6, ncol=2)
        path = out / f"ratio_{op}_K{K}_N{N}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
