"""SUMMARY.md of a GPU session (``bench/gpu_session.sh``): each phase's budget, what it did and what
it skipped. ``python -m bench.session_summary OUT [--budget S] [--tests-exit-code N] [--final]``.

Reads what the phases left in OUT: ``phases.tsv`` (one line per phase: name, share, cap, allowance,
start, end, exit code, status), the benchmark's ``bench/results.json`` and ``e2e/results.json``, and
the pytest phases' ``<phase>.json`` (bench/pytest_phase_report.py). With ``--tests-exit-code`` it
first records that exit code in ``bench/results.json`` (and the sweep's and serving's results):
``pending`` (the microbenchmark runs before the tests that gate it), -1 ("did not run") or a
nonzero code withdraws the speed claims, 0 after ``pending`` gives them back; results.md is
rewritten. Imports no torch unless a tile sweep or serving run is restamped: it runs in the
session's reserve in well under a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Union

from .claims import apply_tests_exit_code, tests_exit_code

PHASES = [("bench", "targets microbenchmark (python -m bench --no-e2e)"),
          ("cuda_tests", "cuda-marked tests (pytest -m cuda)"),
          ("host", "host time per call (python -m bench.host_overhead)"),
          ("tiles", "launch configurations against their floors (python -m bench.tile_sweep)"),
          ("e2e", "end-to-end training step (python -m bench --e2e-only)"),
          ("serving", "many adapters in one batch (python -m bench.serving)"),
          ("suite", "rest of the suite (pytest -m \"not cuda\")"),
          ("pybench", "pytest-benchmark (bench/test_bench_ops.py)")]
LIST = 25  # at most this many names per list in SUMMARY.md (the JSON files have all of them)


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_phases(out: Path) -> dict[str, dict]:
    rows = {}
    try:
        lines = (out / "phases.tsv").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        f = line.split("\t")
        if len(f) < 8:
            continue
        num = lambda v: int(v) if v.lstrip("-").isdigit() else None  # noqa: E731
        rows[f[0]] = dict(share=num(f[1]), cap=num(f[2]), allowed=num(f[3]), start=num(f[4]), end=num(f[5]),
                          rc=num(f[6]), status=f[7])
    return rows


def restamp(out: Path, code: Union[int, str]) -> None:
    """Record the cuda-marked tests' exit code (or ``pending``) in the microbenchmark's, the serving
    benchmark's and the tile sweep's results (once per code): anything but 0 withdraws their speed
    claims, their target verdicts and the sweep's fastest-per-case list; 0 after ``pending`` gives
    them back, the verdicts worked out again from the records."""
    for path in (out / "bench" / "results.json", out / "serving" / "results.json",
                 out / "tiles" / "tile_sweep.json"):
        data = _load(path)
        if not data or data["meta"].get("tests_exit_code") == code:
            continue
        apply_tests_exit_code(data["meta"], code)
        key = "fastest" if path.name == "tile_sweep.json" else "targets"
        data[key] = _verdicts(path, data) if data["meta"].get("speed_claims") else []
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
        if path.name == "tile_sweep.json":
            from .tile_sweep import markdown as tiles_markdown

            (path.parent / "tile_sweep.md").write_text(tiles_markdown(data["meta"], data["records"]))
        elif path.parent.name == "bench":
            from .report import markdown

            (path.parent / "results.md").write_text(markdown(data["meta"], data["records"], data["e2e"],
                                                             data.get("targets") or [], data.get("probes")))


def _verdicts(path: Path, data: dict) -> list[dict]:
    """A results file's verdicts from its records (its claims given back)."""
    if path.name == "tile_sweep.json":
        from .tile_sweep import fastest_per_case

        return fastest_per_case(data["records"])
    if path.parent.name == "serving":
        from .serving import verdicts

        return verdicts(data["ratios"], max(data["meta"]["distinct"]))
    from .targets import targets

    return targets(data["records"], data["e2e"], data["meta"].get("device"))


def _names(items: list[str]) -> list[str]:
    more = f" ... and {len(items) - LIST} more" if len(items) > LIST else ""
    return [f"  - `{n}`" for n in items[:LIST]] + ([f"  - {more.strip()}"] if more else [])


def _pytest_phase(out: Path, name: str) -> list[str]:
    rep = _load(out / f"{name}.json")
    if rep is None:
        try:
            tail = (out / f"{name}.log").read_text().strip().splitlines()[-1:]
        except OSError:
            tail = []
        return [f"- no report from the pytest plugin (killed before the end of the session?); last log line: "
                f"`{tail[0] if tail else '-'}`"]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(rep["counts"].items())) or "nothing ran"
    lines = [f"- collected {rep['collected']} (deselected {rep['deselected']}); {counts}; pytest exit "
             f"{rep['exitstatus']}, {rep['duration_s']} s"]
    if rep["failed"]:
        lines += [f"- failed or errored: {len(rep['failed'])}"] + _names(rep["failed"])
    if rep["not_run_count"]:
        lines += [f"- **skipped for lack of time: {rep['not_run_count']} collected tests never ran** "
                  f"(all listed in `{name}.json`)"] + _names(rep["not_run"])
    else:
        lines.append("- every collected test ran")
    return lines


def _bench_phase(out: Path) -> list[str]:
    data = _load(out / "bench" / "results.json")
    if data is None:
        return ["- no results.json (stopped before its first measurement was written)"]
    meta, recs = data["meta"], data["records"]
    done = [r for r in recs if "median_ms" in r]
    lines = [f"- {len(done)} of {meta.get('planned', '?')} planned measurements timed on {meta.get('device')} "
             f"(grid {meta.get('grid')}), {meta.get('wall_s', '?')} s"]
    if meta.get("truncated"):
        lines.append(f"- **cut short**: {meta['truncated']}")
    skipped = meta.get("not_measured") or []
    if skipped:
        lines += [f"- **not measured: {len(skipped)}**"] + _names(skipped)
    errs = [f"{r['impl']} {r['op']} M={r['M']} r={r['rank']} {r['preset']}: {r['error'][:100]}"
            for r in recs if "error" in r]
    wrong = [f"{r['impl']} {r['op']} M={r['M']} r={r['rank']} {r['preset']}" for r in recs if r.get("ok") is False]
    if errs:
        lines += [f"- errored: {len(errs)}"] + _names(errs)
    if wrong:
        lines += [f"- **wrong results (no ratio): {len(wrong)}**"] + _names(wrong)
    probes = data.get("probes") or {}
    state = lambda v: ("skipped (out of time)" if isinstance(v, dict) and "skipped" in v else  # noqa: E731
                       f"error: {v['error'][:80]}" if isinstance(v, dict) and "error" in v else "done")
    lines.append("- probes: " + (", ".join(f"{k} {state(v)}" for k, v in probes.items()) or "none ran"))
    if "profile_planned" in meta:
        complete = meta.get("profiled", 0) == meta["profile_planned"]
        lines.append(f"- profiler pass: {meta.get('profiled', 0)} of {meta['profile_planned']} planned records profiled"
                     + ("" if complete else " (the rest: out of time or error)"))
    else:
        lines.append("- profiler pass: did not run")
    claims = "yes" if meta.get("speed_claims") else f"no ({meta.get('no_claims_reason', meta.get('mode'))})"
    lines.append(f"- speed claims: {claims}")
    return lines + _targets(data)


def _e2e_phase(out: Path) -> list[str]:
    data = _load(out / "e2e" / "results.json")
    if data is None:
        return ["- no results.json (stopped before its first config was written)"]
    e2e = data["e2e"]
    ok = [e for e in e2e if "step_ms" in e]
    skipped = [e["config"] for e in e2e if "error" in e and e["error"].startswith("skipped")]
    errs = [f"{e['config']}: {e['error'][:100]}" for e in e2e if "error" in e and not e["error"].startswith("skipped")]
    lines = [f"- {len(ok)} configs timed: " + ", ".join(
        f"{e['config']} {e['step_ms']:.1f} ms ({_ratio(e.get('ratio_to_no_adapter'))})" for e in ok)]
    if data["meta"].get("truncated"):
        lines.append(f"- **cut short**: {data['meta']['truncated']}")
    if skipped:
        lines.append(f"- **skipped for lack of time**: {', '.join(skipped)}")
    if errs:
        lines += [f"- errored: {len(errs)}"] + _names(errs)
    unprofiled = [e["config"] for e in ok if not e.get("profile")]
    if unprofiled:
        lines.append(f"- not profiled: {', '.join(unprofiled)}")
    return lines + _targets(data)


def _ratio(value) -> str:
    """A ratio as '1.23x', or '-' where there is none (its baseline missing): never 0.00x."""
    return "-" if value is None else f"{value:.2f}x"


def _host_phase(out: Path) -> list[str]:
    data = _load(out / "host" / "host_overhead.json")
    if data is None:
        return ["- no host_overhead.json (stopped before it was written)"]
    return [f"- us per call on {data['device']}: "
            + ", ".join(f"{name} {us:.1f}" for name, us in data["us_per_call"].items())]


def _tiles_phase(out: Path) -> list[str]:
    data = _load(out / "tiles" / "tile_sweep.json")
    if data is None:
        return ["- no tile_sweep.json (stopped before it was written)"]
    recs = data["records"]
    lines = [f"- {sum('us' in r for r in recs)} configurations timed, {sum('error' in r for r in recs)} failed, "
             f"{sum('skipped' in r for r in recs)} skipped at the deadline (tiles/tile_sweep.md)"]
    if not data["meta"].get("speed_claims", True):
        lines.append(f"- no fastest configuration claimed: {data['meta'].get('no_claims_reason', 'no GPU')}")
    spread = lambda f: "-" if f.get("current_spread") is None else f"{100 * f['current_spread']:.1f}%"  # noqa: E731
    return lines + [f"- {f['case']}: current ({f['current']}) {f['current_us']} us ({f['current_ratio']}x floor, "
                    f"spread {spread(f)}), fastest {f['fastest']} {f['fastest_us']} us ({f['fastest_ratio']}x)"
                    for f in data["fastest"]]


def _serving_phase(out: Path) -> list[str]:
    data = _load(out / "serving" / "results.json")
    if data is None:
        return ["- no results.json (stopped before it was written)"]
    meta = data["meta"]
    timed = [r for r in data["records"] if "median_ms" in r]
    lines = [f"- {len(timed)} measurements ({meta.get('mode')}); checks against the loop: "
             f"{sum(c['ok'] for c in data['checks'])} of {len(data['checks'])} ok"]
    if meta.get("truncated"):
        lines.append(f"- **cut short**: {meta['truncated']}")
    for t in data.get("targets") or []:
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        verdict = ("not measured" if t["value"] is None else "not judged (cut short of the targets' count)") \
            if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"- {t['phase']}, {t['kind']} adapters, {t['figure']} at {t['distinct']} distinct: {value} "
                     f"(target {t['target']}): {verdict}")
    if not meta.get("speed_claims"):
        lines.append(f"- speed claims: no ({meta.get('no_claims_reason', meta.get('mode'))})")
    return lines


def _targets(data: dict) -> list[str]:
    tg = [t for t in data.get("targets") or [] if t.get("binding")]
    if not tg:
        return []
    out = ["", "| target | impl | preset | M | measured | goal | status |", "|---|---|---|---:|---:|---|---|"]
    for t in tg:
        val = "-" if t["value"] is None else f"{t['value']:.3f}"
        out.append(f"| {t['target']} | {t['impl']} | {t['preset'] or '-'} | {t['M'] or '-'} | {val} | "
                   f"{t['goal']} | {t['status']} |")
    return out


def summary(out: Path, budget: int, final: bool) -> str:
    phases = read_phases(out)
    env = ""
    try:
        env = next((ln for ln in (out / "env.txt").read_text().splitlines() if ln.startswith("torch ")), "")
    except OSError:
        pass
    used = max((p["end"] for p in phases.values() if p["end"] is not None), default=0)
    lines = [f"# GPU session summary{'' if final else ' (in progress)'}", "",
             f"- {env or 'environment: see env.txt'}",
             f"- budget {budget} s (start-up excluded), {used} s used by the phases; every phase below is "
             "guaranteed its share and stopped at its allowance (see bench/gpu_session.sh)", "",
             "| # | phase | share s | cap s | allowed s | start s | end s | ran s | within allowance | exit | status |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for i, (name, what) in enumerate(PHASES, 1):
        p = phases.get(name)
        if p is None:
            lines.append(f"| {i} | {name} | | | | | | | | | {'not reached' if final else 'pending'} |")
            continue
        ran = p["end"] - p["start"] if None not in (p["end"], p["start"]) else None
        within = "-" if ran is None or p["allowed"] is None else ("yes" if ran <= p["allowed"] else "**NO**")
        cap = p["cap"] if p["cap"] else "-"
        lines.append(f"| {i} | {name} | {p['share']} | {cap} | {p['allowed']} | {p['start']} | {p['end']} | "
                     f"{ran if ran is not None else '-'} | {within} | {p['rc'] if p['rc'] is not None else '-'} | "
                     f"{p['status']} |")
    lines.append("")
    detail = {"bench": _bench_phase, "host": _host_phase, "tiles": _tiles_phase, "e2e": _e2e_phase,
              "serving": _serving_phase}
    for i, (name, what) in enumerate(PHASES, 1):
        lines += [f"## {i}. {name}: {what}", ""]
        p = phases.get(name)
        if p is None:
            lines += ["- not reached" if final else "- pending", ""]
            continue
        if p["status"].startswith("skipped"):
            lines += [f"- {p['status']}", ""]
            continue
        lines.append(f"- {p['status']} ({p['end'] - p['start']} s of {p['allowed']} s allowed)")
        lines += (detail[name](out) if name in detail else _pytest_phase(out, name)) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0])
    budget = int(args[args.index("--budget") + 1]) if "--budget" in args else 480
    if "--tests-exit-code" in args:
        restamp(out, tests_exit_code(args[args.index("--tests-exit-code") + 1]))
    text = summary(out, budget, "--final" in args)
    (out / "SUMMARY.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
