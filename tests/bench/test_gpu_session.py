"""bench/gpu_session.sh on a CPU: the phases run in order, each gets its guaranteed share and ends
within its allowance (a phase that hangs is stopped there and the later ones still get theirs), and
SUMMARY.md says what each phase did and what it skipped.

Short runs of the real script (about 45 s, 20 s and 20 s on a busy 2-core machine; CI runs them):
a dry run of the whole flow at BUDGET_S=150 with small selections, a run in which every phase
hangs (a stand-in interpreter that sleeps for the phase commands), so every phase must be stopped
by its own deadline, and the documented GPU plan with phases that end at once (their shares).
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.session_summary import main as summary_main  # noqa: E402

SCRIPT = ROOT / "bench" / "gpu_session.sh"
PHASES = ["bench", "cuda_tests", "host", "tiles", "e2e", "serving", "suite", "pybench"]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")


def _phases(out: Path) -> list[dict]:
    rows = []
    for line in (out / "phases.tsv").read_text().splitlines():
        name, share, cap, allowed, start, end, rc, status = line.split("\t")
        rows.append(dict(name=name, share=int(share), cap=int(cap), allowed=int(allowed), start=int(start),
                         end=int(end), rc=rc, status=status))
    return rows


def _stand_in_python(tmp: Path, phase_command: str) -> Path:
    """An interpreter that runs ``phase_command`` (shell) in place of each phase's own command and is
    the real one for the rest (the environment capture, the summaries)."""
    stub = tmp / "python"
    stub.write_text("#!/usr/bin/env bash\n"
                    'case " $* " in *" -m pytest "*|*" -m bench --"*|*" -m bench.host_overhead "*|*" -m bench.serving "*|'
                    f'*" -m bench.tile_sweep "*) {phase_command} ;; esac\n'
                    f'exec "{sys.executable}" "$@"\n')
    stub.chmod(0o755)
    return stub


def _run(tmp: Path, budget: int, **env) -> tuple[Path, Path, subprocess.CompletedProcess, float]:
    out, pack = tmp / "out", tmp / "pack"
    full = dict(os.environ, BUDGET_S=str(budget), OUT=str(out), PACK_TO=str(pack), BENCH_GRID="smoke",
                PYTHON=env.pop("PYTHON", sys.executable), **env)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=budget + 90)
    return out, pack, proc, time.monotonic() - t0


def _check_shares(rows: list[dict], budget: int, reserve: int = 15, step: int = 2) -> None:
    """Every phase started after the previous one ended, was allowed at least its share (and at most
    its cap), and ended within its allowance (1 s of clock granularity)."""
    assert [r["name"] for r in rows] == PHASES
    prev_end = 0
    for i, r in enumerate(rows):
        assert r["start"] >= prev_end, rows
        assert r["share"] <= r["allowed"], r
        if r["cap"] > 0:
            assert r["allowed"] <= r["cap"], r
        assert r["end"] - r["start"] <= r["allowed"] + 1, r
        later = sum(x["share"] + step for x in rows[i + 1:])
        assert r["start"] + r["allowed"] + step + later + reserve <= budget + 1, r  # the later shares were kept
        prev_end = r["end"]


@cpu_only
def test_dry_run_every_phase_gets_its_share_and_the_summary_says_what_ran(tmp_path):
    # 150 s is the smallest budget whose scaled shares, per-phase steps and reserve fit; the phases
    # finish early on these small selections, so the run takes well under that.
    out, pack, proc, wall = _run(tmp_path, 150, BENCH_IMPLS="limit,merged", E2E_CONFIGS="no_adapter,ours_tl6",
                                 TEST_PATHS="tests/test_config.py")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "WARNING" not in (out / "env.txt").read_text()
    rows = _phases(out)
    _check_shares(rows, 150)
    assert wall < 150 + 30  # the budget plus the environment capture before the clock starts
    status = {r["name"]: r["status"] for r in rows}
    assert status["bench"] == "ran" and status["e2e"] == "ran", status
    bench = json.loads((out / "bench" / "results.json").read_text())
    assert bench["records"] and bench["probes"] and bench["meta"]["profiled"] > 0
    # it ran before the tests, so it claimed nothing until restamped (-m cuda on a CPU selects nothing: 5)
    assert "--tests-exit-code pending" in bench["meta"]["command"] and bench["meta"]["tests_exit_code"] == 5
    e2e = json.loads((out / "e2e" / "results.json").read_text())
    assert [e["config"] for e in e2e["e2e"]] == ["no_adapter", "ours_tl6"] and not e2e["records"]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["collected"] == suite["counts"]["passed"] > 0 and suite["not_run_count"] == 0
    cuda = json.loads((out / "cuda_tests.json").read_text())
    assert cuda["collected"] == 0 and cuda["deselected"] > 0  # no test in test_config.py is cuda-marked
    summary = (out / "SUMMARY.md").read_text()
    assert "in progress" not in summary and summary.count("| yes |") == len(PHASES)  # every phase within its allowance
    for i, name in enumerate(PHASES, 1):
        assert f"## {i}. {name}" in summary
    assert "every collected test ran" in summary and "profiler pass:" in summary and "probes: copy done" in summary
    # what comes back from the device tool: at most 8 files; the tarball holds everything
    assert sorted(p.name for p in pack.iterdir()) == ["SUMMARY.md", "gpu_session.tar.gz"]
    with tarfile.open(pack / "gpu_session.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./SUMMARY.md", "./phases.tsv", "./env.txt", "./bench/results.json", "./e2e/results.json"} <= names


@cpu_only
def test_every_hanging_phase_is_stopped_at_its_allowance_and_later_phases_keep_their_share(tmp_path):
    stub = _stand_in_python(tmp_path, "exec sleep 300")
    out, pack, proc, wall = _run(tmp_path, 70, PYTHON=str(stub),
                                 PHASE_MINS="bench=4,cuda_tests=4,host=4,tiles=4,e2e=4,serving=4,suite=4,pybench=4",
                                 PHASE_CAPS="bench=6,cuda_tests=6,host=6,tiles=6,e2e=6,serving=6,suite=7,pybench=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _phases(out)
    _check_shares(rows, 70)
    # pybench runs only with pytest-benchmark installed; every phase that ran was stopped, none ran long
    for r in rows:
        stopped = r["status"] == "stopped at its allowance (SIGINT)"
        assert stopped or r["status"].startswith("skipped: pytest-benchmark"), r
        assert r["end"] - r["start"] <= r["allowed"] + 1
    summary = (out / "SUMMARY.md").read_text()
    assert "no results.json" in summary and "no report from the pytest plugin" in summary


@cpu_only
def test_a_second_call_runs_only_the_phases_it_names(tmp_path):
    """SESSION_PHASES picks phases (the rest of a tile sweep, say): only those run, in order, each
    with its share; TESTS_EXIT_CODE carries the first call's test result into the claims."""
    out, _, proc, _ = _run(tmp_path, 60, SESSION_PHASES="tiles,host", TESTS_EXIT_CODE="0",
                           PHASE_MINS="host=15,tiles=15", PHASE_CAPS="host=20,tiles=20")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = _phases(out)
    assert [r["name"] for r in rows] == ["host", "tiles"] and all(r["status"] == "ran" for r in rows), rows
    assert (out / "cuda_tests.rc").read_text().strip() == "0"
    assert json.loads((out / "tiles" / "tile_sweep.json").read_text())["records"]
    bad = subprocess.run(["bash", str(SCRIPT)], env=dict(os.environ, SESSION_PHASES="tiles,e2ee", OUT=str(tmp_path / "x")),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no phase named 'e2ee'" in bad.stderr


def test_a_misspelt_phase_in_phase_mins_or_caps_stops_the_script_before_anything_runs(tmp_path):
    """Ignored, a misspelt override would leave that phase its default share unnoticed."""
    for knob, value, says in (("PHASE_MINS", "tilse=10", "no phase named 'tilse'"),
                              ("PHASE_CAPS", "cuda_tests=150,serving=200,e2ee=9", "no phase named 'e2ee'"),
                              ("PHASE_MINS", "tiles=ten", "'tiles=ten' is not name=seconds")):
        out = tmp_path / f"{knob}-{len(value)}"
        proc = subprocess.run(["bash", str(SCRIPT)], env=dict(os.environ, OUT=str(out), **{knob: value}),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and f"{knob}: {says}" in proc.stderr, proc.stderr
        assert not list(out.iterdir())  # no environment capture, no phase


def _documented_calls() -> tuple[str, str]:
    """The two calls of bench/NOTES.md's plan for the next GPU session (their environment variables)."""
    notes = (ROOT / "bench" / "NOTES.md").read_text()
    calls = re.findall(r"`(PACK_TO=\$OUT OUT=/tmp/gpu-session[^`]*?bash bench/gpu_session\.sh)`", notes)
    assert len(calls) == 2, calls
    return calls[0], calls[1]


@cpu_only
def test_the_documented_gpu_plan_fits_and_gives_the_cuda_tests_their_time(tmp_path):
    """NOTES.md's first call (BUDGET_S=450): the 37 cuda-marked tests (30 of them took 85 s wall on
    the H200) are guaranteed a share that runs them at least 120 s before the SIGINT, whatever the
    microbenchmark before them takes (an interrupted run exits 124: no speed claims), and every
    share fits the budget; its second call's shares fit too. The phases end at once here."""
    stub = _stand_in_python(tmp_path, "exit 0")
    var = lambda call, name: re.search(rf"\b{name}=(\S+)", call).group(1)  # noqa: E731
    first, second = _documented_calls()
    budget = int(var(first, "BUDGET_S"))
    out, _, proc, _ = _run(tmp_path / "first", budget, PYTHON=str(stub))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "WARNING" not in (out / "env.txt").read_text()
    rows = _phases(out)
    _check_shares(rows, budget)
    grace = 10  # gpu_session.sh's GRACE_S at budgets of 240 s and more
    assert {r["name"]: r["share"] for r in rows}["cuda_tests"] - grace >= 120, rows

    budget = int(var(second, "BUDGET_S"))
    out, _, proc, _ = _run(tmp_path / "second", budget, PYTHON=str(stub), TESTS_EXIT_CODE="0",
                           **{k: var(second, k) for k in ("SESSION_PHASES", "PHASE_MINS", "PHASE_CAPS")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "WARNING" not in (out / "env.txt").read_text()
    rows = _phases(out)
    assert [r["name"] for r in rows] == var(second, "SESSION_PHASES").split(",")
    assert [r["share"] for r in rows] == [int(kv.split("=")[1]) for kv in var(second, "PHASE_MINS").split(",")]


def test_the_microbenchmark_claims_nothing_while_the_tests_are_pending(tmp_path):
    """The microbenchmark runs before the cuda-marked tests that gate it, as ``--tests-exit-code
    pending``: while they run (a call that ends there returns this tarball) neither its results nor
    SUMMARY.md claim a speed or judge a target; their exit code 0 gives the claims and the verdicts
    back, a failure keeps them withdrawn for good."""
    from bench.claims import apply_tests_exit_code
    from bench.run import write_json

    meta = dict(mode="gpu", speed_claims=True, device="NVIDIA H200", grid="targets", planned=1, date="d", commit="c",
                command="python -m bench --tests-exit-code pending", torch="2.11", triton="3.6", cuda="13.0", wall_s=90)
    apply_tests_exit_code(meta, "pending")
    rec = dict(impl="ours", op="fwd", M=8192, K=4096, N=4096, rank=16, preset="tl6", median_ms=0.37,
               limit_paired_ms=0.345, ok=True, tflops=1.0, gbps=1.0)
    write_json(tmp_path / "bench", meta, [rec], [], {})
    (tmp_path / "phases.tsv").write_text("bench\t84\t168\t146\t0\t100\t0\tran\n")  # the tests are running
    results = lambda: json.loads((tmp_path / "bench" / "results.json").read_text())  # noqa: E731
    summary = lambda: (tmp_path / "SUMMARY.md").read_text()  # noqa: E731
    met = "| fwd <= 1.10x limit, r=16 | ours | tl6 | 8192 | 1.072 | <= 1.1 | met |"

    assert summary_main([str(tmp_path), "--budget", "450"]) == 0
    data = results()
    assert data["meta"]["speed_claims"] is False and data["meta"]["tests_exit_code"] == "pending"
    assert data["targets"] == [] and met not in summary()
    assert "speed claims: no (the cuda-marked tests had not finished when this was written)" in summary()

    assert summary_main([str(tmp_path), "--budget", "450", "--tests-exit-code", "0"]) == 0
    data = results()
    assert data["meta"]["speed_claims"] is True and "no_claims_reason" not in data["meta"]
    assert ("fwd <= 1.10x limit, r=16", "met") in [(t["target"], t["status"]) for t in data["targets"]]
    assert met in summary() and "speed claims: yes" in summary()
    assert "| fwd <= 1.10x limit, r=16 | ours | tl6 | 8192 | 1.072 | <= 1.1 | **met** |" in (
        tmp_path / "bench" / "results.md").read_text()

    assert summary_main([str(tmp_path), "--budget", "450", "--tests-exit-code", "1"]) == 0
    assert summary_main([str(tmp_path), "--budget", "450", "--tests-exit-code", "0"]) == 0
    data = results()
    assert data["meta"]["speed_claims"] is False and data["targets"] == [] and met not in summary()


def test_summary_lists_what_each_phase_skipped(tmp_path):
    """The summary from files a cut-short session leaves: measurements not made, tests never run,
    e2e configs skipped, phases not reached; and the claims withdrawn when the tests failed."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "e2e").mkdir()
    (tmp_path / "phases.tsv").write_text("bench\t140\t200\t200\t0\t190\t124\tstopped at its allowance (SIGINT)\n"
                                         "cuda_tests\t90\t120\t120\t190\t260\t1\tran, exit 1\n"
                                         "e2e\t80\t120\t80\t260\t300\t0\tran\n")
    meta = dict(mode="gpu", speed_claims=True, device="NVIDIA H200", grid="targets", planned=3, wall_s=170,
                truncated="stopped after 2 of 3 measurements", not_measured=["ours fwd M=1 K=4096 N=4096 r=16 tl6"],
                profile_planned=2, profiled=1, date="d", commit="c", command="python -m bench", torch="2.11",
                triton="3.6", cuda="13.0", transformers="5", peft="0.21", timing="t", tolerance="tol")
    rec = dict(impl="ours", op="fwd", M=8192, K=4096, N=4096, rank=16, preset="tl6", median_ms=1.0, ratio_to_limit=1.2,
               ok=True, tflops=1.0, gbps=1.0)
    bad = dict(rec, impl="addmm", ok=False)
    (tmp_path / "bench" / "results.json").write_text(json.dumps(dict(
        meta=meta, records=[rec, bad], e2e=[], probes=dict(copy=dict(bytes=1, median_ms=1.0, bytes_per_s=1.0),
                                                          merge_layout=dict(skipped="out of time")),
        targets=[dict(target="fwd <= 1.10x limit, r=16", impl="ours", preset="tl6", M=8192, field="ratio_to_limit",
                      value=1.2, goal="<= 1.1", status="missed", binding=True)])))
    (tmp_path / "e2e" / "results.json").write_text(json.dumps(dict(meta=dict(mode="gpu"), records=[], e2e=[
        dict(config="no_adapter", step_ms=50.0, ratio_to_no_adapter=1.0),
        dict(config="ours_tl6", error="skipped: out of time (--max-minutes)")])))
    (tmp_path / "cuda_tests.json").write_text(json.dumps(dict(
        exitstatus=1, collected=4, deselected=10, counts=dict(passed=2, failed=1), not_run_count=1,
        not_run=["tests/ops/test_x.py::test_slow"], failed=["tests/ops/test_x.py::test_bad"], duration_s=70.0)))
    assert summary_main([str(tmp_path), "--budget", "480", "--tests-exit-code", "1", "--final"]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "**cut short**: stopped after 2 of 3 measurements" in text
    assert "**not measured: 1**" in text and "`ours fwd M=1 K=4096 N=4096 r=16 tl6`" in text
    assert "**wrong results (no ratio): 1**" in text and "merge_layout skipped (out of time)" in text
    assert "profiler pass: 1 of 2 planned records profiled (the rest: out of time or error)" in text
    assert "**skipped for lack of time: 1 collected tests never ran**" in text and "test_slow" in text
    assert "failed or errored: 1" in text and "test_bad" in text
    assert "**skipped for lack of time**: ours_tl6" in text
    assert text.count("not reached") >= 2  # suite and pybench never started
    # the microbenchmark ran before the tests that gate it: their failure withdraws its claims
    data = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert data["meta"]["speed_claims"] is False and data["meta"]["tests_exit_code"] == 1 and data["targets"] == []
    assert "No speed claims" in (tmp_path / "bench" / "results.md").read_text()
    assert "speed claims: no (the cuda-marked tests failed" in text
