"""The demo's outputs: the Table-2-shaped table (terminal, markdown, JSON) and the plot.

Everything here reads only the results dict, so the table and the plot can be redrawn from a
saved ``results.json`` without training (``tiedlora demo --replot --out DIR``).
"""

from __future__ import annotations

import json
import math
import os
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
    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    if results.get("missing"):
        lines.append(f"(not done yet: {', '.join(results['missing'])})")
    return "\n".join(lines)


def _versions(env: dict) -> str:
    names = (("torch", "torch"), ("transformers", "transformers"), ("tiedlora_kernels", "tiedlora-kernels"),
             ("python", "Python"), ("platform", "platform"))
    return ", ".join(f"{label} {env[k]}" for k, label in names if env.get(k))


def markdown_report(results: dict) -> str:
    s = results["settings"]
    env = results["environment"]
    status = results.get("status", "complete")
    head = "# Tied-LoRA demo results\n\n"
    if status != "complete":
        head += (f"**{'Interrupted' if status == 'interrupted' else 'In progress'}: not done yet: "
                 f"{', '.join(results.get('missing', [])) or '-'}.** Rerun the same command to resume.\n\n")
    sessions = results.get("sessions", 1)
    head += (f"Base model: {s['model_desc']}. Task: arithmetic word problems (GSM8K style, generated), "
             f"{s['steps']} adapter steps of batch {s['batch_size']}, seed {s['seed']}.\n"
             f"Losses: cross entropy of the response tokens in bits per token; exact match: the integer after "
             f"`Answer:` in the greedy continuation of {s['acc_examples']} test questions.\n"
             f"Device: {env['device_name']} (adapter backend: {env['backend']}); "
             f"wall time {results['seconds_total']:.0f} s"
             + (f" over {sessions} runs (resumed)" if sessions > 1 else "") + ".\n")
    versions = _versions(env)
    if versions:
        head += f"Versions: {versions}.\n"
    return head + "\n" + markdown_table(results) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    # A kill mid-write leaves the previous file, never half of one.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_outputs(results: dict, out: Path, plot: bool = True, json_too: bool = True) -> list[Path]:
    """Write ``results.json`` (unless ``json_too`` is false), ``results.md`` and, with
    matplotlib and ``plot``, ``curves.png`` into ``out``. Each file is replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if json_too:
        p = out / "results.json"
        _write_atomic(p, (json.dumps(results, indent=1) + "\n").encode())
        written.append(p)
    p = out / "results.md"
    _write_atomic(p, markdown_report(results).encode())
    written.append(p)
    if plot and results["rows"]:
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


#: (colour, line style, marker) per preset: the Tied-LoRA paper's presets solid, the variants of
#: "Parameter Efficient Fine Tuning Ideas" dashed, LoRA (the reference) black, drawn on top.
STYLES = {
    "lora": ("black", "-", "o"),
    "vera": ("#7f7f7f", "-", "v"),
    "tl1": ("#1f77b4", "-", "^"),
    "tl2": ("#ff7f0e", "-", "<"),
    "tl3": ("#2ca02c", "-", ">"),
    "tl4": ("#d62728", "-", "s"),
    "tl5": ("#9467bd", "-", "D"),
    "tl6": ("#8c564b", "-", "P"),
    "partial": ("#e377c2", "--", "X"),
    "tl_extra": ("#bcbd22", "--", "*"),
    "tensor_embed": ("#17becf", "--", "h"),
    "dora": ("#1a3a6e", "--", "d"),
    "simple_dora": ("#b8860b", "--", "p"),
}
_SPARE = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def _style(preset: str, i: int) -> tuple[str, str, str]:
    return STYLES.get(preset, (_SPARE[i % len(_SPARE)], ":", "o"))


def _log_ticks(lo: float, hi: float, max_ticks: int = 8) -> list[float]:
    """Round values (1, 1.5, 2, 3, ... times a power of ten) between ``lo`` and ``hi`` for a log
    axis, at most ``max_ticks`` of them, so tick labels read "1.5", not "1.5x10^0"."""
    for mantissas in ((1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 9), (1, 1.5, 2, 3, 4, 6), (1, 2, 3, 5), (1, 2, 5), (1, 3),
                      (1,)):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in mantissas]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) <= max_ticks:
            return ticks
    return [lo, hi]


def _plain(v: float, _pos=None) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:g}"


def _place_labels(ax, points: list[tuple[float, float, str, str]], renderer, fontsize: float = 8.5) -> None:
    """Label each (x, y, text, colour) point next to it without overlaps: candidate offsets are
    tried around the point, nearest first, and the first whose box hits no other label, no
    marker and stays inside the axes is kept (a thin leader line marks the farther ones)."""
    ax_box = ax.get_window_extent(renderer)
    markers = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    taken = []
    near = [(6, 3, "left", "bottom"), (6, -3, "left", "top"), (-6, 3, "right", "bottom"), (-6, -3, "right", "top"),
            (0, 8, "center", "bottom"), (0, -8, "center", "top")]
    candidates = near + [(dx * k, dy * k, ha, va) for k in (2.5, 4, 5.5, 7) for dx, dy, ha, va in near]
    for i in sorted(range(len(points)), key=lambda j: points[j][1]):
        x, y, text, colour = points[i]
        chosen = None
        for dx, dy, ha, va in candidates:
            far = abs(dx) > 6 or abs(dy) > 8
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              fontsize=fontsize, color=colour, zorder=6,
                              arrowprops=dict(arrowstyle="-", color=colour, lw=0.6, alpha=0.7,
                                              shrinkA=0, shrinkB=4) if far else None)
            box = ann.get_window_extent(renderer).expanded(1.04, 1.15)
            inside = (box.x0 >= ax_box.x0 and box.x1 <= ax_box.x1 and box.y0 >= ax_box.y0 and box.y1 <= ax_box.y1)
            clear = (not any(box.overlaps(t) for t in taken)
                     and not any(box.contains(mx, my) for j, (mx, my) in enumerate(markers) if j != i))
            if inside and clear:
                chosen = ann
                break
            ann.remove()
        if chosen is None:  # crowded beyond every candidate: the nearest spot, overlap and all
            dx, dy, ha, va = near[0]
            chosen = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                                 fontsize=fontsize, color=colour, zorder=6)
        taken.append(chosen.get_window_extent(renderer).expanded(1.04, 1.15))


def plot_curves(results: dict, path: Path) -> Optional[Path]:
    """Two panels: the training loss per preset over the adapter steps, and the final test loss
    against trainable parameters (the comparison the table makes, as a picture). Returns
    ``None`` (with a note on stderr) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator
    except ImportError:
        print("tiedlora demo: matplotlib is not installed, skipping curves.png "
              "(pip install 'tiedlora-kernels[bench]')", file=sys.stderr)
        return None
    rows = results["rows"]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    style = {p: _style(p, i) for i, p in enumerate(presets)}
    ranks = sorted({r["rank"] for r in rows})
    s = results["settings"]

    fig, (ax_loss, ax_par) = plt.subplots(1, 2, figsize=(14, 6.2))

    # Left: training loss, smoothed, of the largest rank (one curve per preset).
    curve_rank = ranks[-1]
    curves = [r for r in rows if r["rank"] == curve_rank]
    lo, hi, finals = math.inf, 0.0, []
    for i, r in enumerate(curves):
        colour, ls, marker = style[r["preset"]]
        n = len(r["step_bits"])
        ys = _smooth(r["step_bits"], max(1, n // 20))
        is_lora = r["preset"] == "lora"
        every = max(1, n // 6)  # markers staggered per preset so they do not pile up at the same steps
        ax_loss.plot(range(1, n + 1), ys, color=colour, ls=ls, lw=2.2 if is_lora else 1.3,
                     marker=marker, markevery=(i * every // len(curves), every), ms=6 if is_lora else 5,
                     zorder=5 if is_lora else 3, alpha=1.0 if is_lora else 0.9)
        lo, hi = min(lo, min(ys)), max(hi, max(ys))
        finals.append(ys[-1])
    # The interesting part is the end, where presets separate: cap the top at 3x the worst final loss.
    top = min(hi * 1.05, 3.0 * max(finals))
    bottom = lo / 1.04
    ax_loss.set_ylim(bottom, top)
    log_y = top / bottom >= 2.5  # a log axis only where the range spans enough to need one
    if log_y:
        ax_loss.set_yscale("log")
        ax_loss.set_ylim(bottom, top)
        ax_loss.yaxis.set_major_locator(FixedLocator(_log_ticks(bottom, top)))
        ax_loss.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax_loss.yaxis.set_minor_locator(NullLocator())
        ax_loss.yaxis.set_minor_formatter(NullFormatter())
    ax_loss.set_xlabel("adapter training step")
    ax_loss.set_ylabel("training loss, response tokens (bits/token" + (", log scale)" if log_y else ")"))
    rank_note = f", rank {curve_rank}" if len(ranks) > 1 else ""
    ax_loss.set_title(f"Training loss per preset (smoothed{rank_note})", fontsize=11)
    ax_loss.grid(alpha=0.3)

    # Right: final test loss against trainable parameters (log x); one line per preset across ranks.
    labels = []
    for i, preset in enumerate(presets):
        pts = sorted((r for r in rows if r["preset"] == preset), key=lambda r: r["rank"])
        colour, ls, marker = style[preset]
        xs = [max(r["trainable"], 1) for r in pts]
        ys = [r["test_bits"] for r in pts]
        is_lora = preset == "lora"
        ax_par.plot(xs, ys, color=colour, ls=ls if len(pts) > 1 else "none", lw=1.2, marker=marker,
                    ms=9 if is_lora else (11 if marker == "*" else 8), markeredgecolor="white", markeredgewidth=0.6,
                    zorder=5 if is_lora else 4)
        labels.append((xs[-1], ys[-1], preset if len(ranks) == 1 else f"{preset} r={pts[-1]['rank']}", colour))
    all_x = [max(r["trainable"], 1) for r in rows]
    all_y = [r["test_bits"] for r in rows]
    ax_par.set_xscale("log")
    ax_par.set_xlim(min(all_x) / 1.8, max(all_x) * 1.8)
    span = max(all_y) - min(all_y) or 0.1 * max(all_y)
    ax_par.set_ylim(min(all_y) - 0.12 * span, max(all_y) + 0.18 * span)
    ax_par.xaxis.set_major_locator(FixedLocator(_log_ticks(*ax_par.get_xlim())))
    ax_par.xaxis.set_major_formatter(FuncFormatter(_plain))
    ax_par.xaxis.set_minor_locator(NullLocator())
    ax_par.xaxis.set_minor_formatter(NullFormatter())
    lora = [r for r in rows if r["preset"] == "lora" and r["rank"] == curve_rank]
    if lora:
        ax_par.axhline(lora[0]["test_bits"], color="black", ls=":", lw=0.9, zorder=1)
    ax_par.set_xlabel("trainable parameters (log scale)")
    ax_par.set_ylabel("test loss after training (bits/token)")
    title = "Test loss vs trainable parameters (lower left is better)"
    ax_par.set_title(title, fontsize=11)
    ax_par.grid(alpha=0.3)
    base = results.get("baseline")
    if base is not None:
        ax_par.text(0.99, 0.98, f"base model, no adapter: {base['test_bits']:.2f} bits/token"
                    + ("\ndotted: LoRA's test loss" if lora else ""),
                    transform=ax_par.transAxes, ha="right", va="top", fontsize=8.5, color="#444444")

    handles = [Line2D([], [], color=style[p][0], ls=style[p][1], marker=style[p][2], lw=2.2 if p == "lora" else 1.3,
                      ms=6) for p in presets]
    fig.legend(handles, presets, loc="lower center", ncol=min(len(presets), 7), frameon=False, fontsize=9.5,
               handlelength=3.2)
    status = results.get("status", "complete")
    partial = "" if status == "complete" else f"  [partial: {len(results.get('missing', []))} not done]"
    fig.suptitle(f"{s['model_desc']}\n{s['steps']} adapter steps of batch {s['batch_size']}, seed {s['seed']}; "
                 f"solid: Tied-LoRA paper presets, dashed: variants{partial}", fontsize=10)
    n_legend_rows = math.ceil(len(presets) / 7)
    fig.tight_layout(rect=(0, 0.045 * n_legend_rows + 0.01, 1, 1))
    _place_labels(ax_par, labels, fig.canvas.get_renderer())
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
