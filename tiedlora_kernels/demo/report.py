"""The demo's outputs: the Table-2-shaped table (terminal, markdown, JSON) and the plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

COLUMNS = ("preset", "rank", "trainable params", "P% of LoRA", "train bits/tok", "test bits/tok", "exact match %")


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def table_rows(results: dict) -> list[list[str]]:
    """One row per (preset, rank), after a row for the base model without adapters."""
    rows = []
    base = results.get("baseline")
    if base is not None:
        rows.append(["base (no adapter)", "-", "0", "0.0", _fmt(base["train_bits"]), _fmt(base["test_bits"]),
                     _fmt(100 * base["accuracy"], 1)])
    for r in results["rows"]:
        rows.append([r["preset"], str(r["rank"]), f"{r['trainable']:,}", _fmt(r["p_of_lora"], 1),
                     _fmt(r["final_train_bits"]), _fmt(r["test_bits"]), _fmt(100 * r["accuracy"], 1)])
    return rows


def markdown_table(results: dict) -> str:
    rows = table_rows(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in
                                                            range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(results: dict) -> str:
    rows = [list(COLUMNS)] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def markdown_report(results: dict) -> str:
    s = results["settings"]
    env = results["environment"]
    head = (f"# Tied-LoRA demo results\n\n"
            f"Base model: {s['model_desc']}. Task: arithmetic word problems (GSM8K style, generated), "
            f"{s['steps']} adapter steps of batch {s['batch_size']}, seed {s['seed']}.\n"
            f"Losses: cross entropy of the response tokens in bits per token; exact match: the integer after "
            f"`Answer:` in the greedy continuation of {s['acc_examples']} test questions.\n"
            f"Device: {env['device_name']} (adapter backend: {env['backend']}); "
            f"wall time {results['seconds_total']:.0f} s.\n\n")
    return head + markdown_table(results) + "\n"


def write_outputs(results: dict, out: Path, plot: bool = True) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (with matplotlib) ``curves.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "results.json"
    p.write_text(json.dumps(results, indent=1) + "\n")
    written.append(p)
    p = out / "results.md"
    p.write_text(markdown_report(results))
    written.append(p)
    if plot:
        png = plot_curves(results, out / "curves.png")
        if png is not None:
            written.append(png)
    return written


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(results: dict, path: Path) -> Optional[Path]:
    """Loss curves per preset (train, smoothed; test at the evaluation points) and exact match vs
    trainable parameters. Returns ``None`` (with a note on stderr) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tiedlora demo: matplotlib is not installed, skipping curves.png "
              "(pip install 'tiedlora-kernels[bench]')", file=sys.stderr)
        return None
    rows = results["rows"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    labels = sorted({(r["preset"], r["rank"]) for r in rows}, key=lambda k: [(x["preset"], x["rank"]) for x in
                                                                            rows].index(k))
    color = {k: cmap(i % cmap.N) for i, k in enumerate(labels)}
    multi_rank = len({r["rank"] for r in rows}) > 1
    for r in rows:
        key = (r["preset"], r["rank"])
        name = f"{r['preset']} r={r['rank']}" if multi_rank else r["preset"]
        steps = range(1, len(r["step_bits"]) + 1)
        window = max(1, len(r["step_bits"]) // 20)
        ax_loss.plot(steps, _smooth(r["step_bits"], window), color=color[key], lw=1.4, label=name)
        if r["eval_steps"]:
            ax_loss.plot(r["eval_steps"], r["eval_test_bits"], color=color[key], ls="--", marker="o", ms=3,
                         lw=0.9)
        ax_acc.scatter(max(r["trainable"], 1), 100 * r["accuracy"], color=color[key], s=40, zorder=3)
        ax_acc.annotate(name, (max(r["trainable"], 1), 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("adapter training step")
    ax_loss.set_ylabel("response loss (bits/token)")
    ax_loss.set_title("Loss per preset (solid: train, smoothed; dashed: test)")
    ax_loss.legend(fontsize=8, ncol=2)
    ax_loss.grid(alpha=0.3, which="both")
    base = results.get("baseline")
    if base is not None:
        ax_acc.axhline(100 * base["accuracy"], color="gray", ls=":", lw=1, label="base model, no adapter")
        ax_acc.legend(fontsize=8, loc="lower right")
    ax_acc.set_xscale("log")
    ax_acc.set_xlabel("trainable parameters")
    ax_acc.set_ylabel("exact match on test (%)")
    ax_acc.set_title("Exact match vs trainable parameters")
    ax_acc.grid(alpha=0.3, which="both")
    fig.suptitle(f"Tied-LoRA demo: {results['settings']['model_desc']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
