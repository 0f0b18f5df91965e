"""The benchmark runs end to end (CPU smoke mode) and its JSON, table, plots, checks and ratios are right."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import cases  # noqa: E402
from bench.cases import GRIDS, IMPLS, KERNEL_IMPLS, Case  # noqa: E402
from bench.run import _InputCache, add_ratios, main, measure, plan, profile_plan, targets, time_interleaved  # noqa: E402

RECORD_FIELDS = {"impl", "op", "M", "K", "N", "rank", "preset", "dtype", "adapter_dtype", "median_ms", "p20_ms",
                 "p80_ms", "reps", "tflops", "gbps"}
META_FIELDS = {"mode", "speed_claims", "device", "driver", "torch", "triton", "cuda", "transformers", "peft",
               "command", "date", "commit", "grid", "timing", "tolerance", "wall_s", "planned", "profiled",
               "profile_planned"}
E2E_CONFIGS = ["no_adapter", "ours_tl6", "ours_lora", "peft_lora"]
SMOKE_IMPLS = set(IMPLS) - set(KERNEL_IMPLS)

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU path")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("smoke mode is the CPU path")
    out = tmp_path_factory.mktemp("bench")
    assert main(["--grid", "smoke", "--out", str(out), "--e2e-configs", ",".join(E2E_CONFIGS)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_smoke_json_is_complete_and_labelled(smoke):
    _, data = smoke
    meta, records = data["meta"], data["records"]
    assert META_FIELDS <= set(meta)
    assert meta["mode"] == "smoke-cpu" and meta["speed_claims"] is False and meta["grid"] == "smoke"
    assert "truncated" not in meta and data["targets"] == []  # no target verdicts from a CPU
    assert records and not [r for r in records if "error" in r]
    for r in records:
        assert RECORD_FIELDS <= set(r), r
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["dtype"] == "bfloat16"
        assert ("limit_paired_ms" in r) == (r["impl"] != "limit")  # every impl timed in alternation with the limit
    assert meta["planned"] == len(records) and meta["profiled"] == meta["profile_planned"] > 0
    assert {r["impl"] for r in records} == SMOKE_IMPLS  # no kernel timings on a CPU
    assert {(r["op"], r["impl"]) for r in records} == {(op, i) for op in ("fwd", "fwd_bwd") for i in SMOKE_IMPLS}
    assert {r["preset"] for r in records if r["impl"] == "peft_vera"} == {"vera"}
    assert {r["preset"] for r in records if r["impl"] == "reference"} == {"lora", "vera", "tl6"}


def test_every_record_is_the_planned_grid_once(smoke):
    _, data = smoke
    keys = [(r["impl"], r["op"], r["M"], r["K"], r["N"], r["rank"], r["preset"]) for r in data["records"]]
    planned = [(i, op, c.M, c.K, c.N, c.rank, c.preset) for c, i, op in plan(GRIDS["smoke"], "cpu")]
    assert sorted(keys) == sorted(planned) and len(set(keys)) == len(keys)


def test_smoke_checks_every_adapted_impl_and_all_pass(smoke):
    _, data = smoke
    for r in data["records"]:
        if r["impl"] == "limit":
            assert "ok" not in r  # nothing adapted to check
            continue
        assert r["ok"] is True, r
        assert 0 < r["rel_err"] < 2e-2 and 0 < r["rel_err_eager"] < 2e-2
        if r["op"] == "fwd_bwd":
            assert 0 < r["rel_err_grad"] < 2e-2


def test_smoke_memory_fields(smoke):
    _, data = smoke
    fb = [r for r in data["records"] if r["op"] == "fwd_bwd"]
    for r in fb:
        assert r["saved_bytes"] >= 0 and r["saved_weight_bytes"] > 0
        assert "peak_mem_bytes" not in r  # measured on CUDA only
    by = {(r["impl"], r["M"], r["rank"], r["preset"]): r for r in fb}
    M, K = 64, 64
    # A frozen layer needs only W for dX: no activation saved; the merged W' counts as a weight.
    assert by[("limit", M, 4, "lora")]["saved_bytes"] == 0
    assert by[("merged", M, 4, "lora")]["saved_bytes"] == 0
    assert by[("merged", M, 4, "lora")]["saved_weight_bytes"] == 48 * 64 * 2  # W' (N, K) bf16, for dX
    # A trains under lora: the reference keeps x's fp32 cast for dA (activation, not weight); under
    # vera (A frozen) it keeps no copy of x, only h and the (M, N) fp32 z B^T that dv needs.
    assert by[("reference", M, 4, "lora")]["saved_bytes"] >= M * K * 4
    assert by[("reference", M, 4, "vera")]["saved_bytes"] == M * 4 * 4 + M * 48 * 4
    assert not [r for r in data["records"] if r["op"] == "fwd" and "saved_bytes" in r]


def test_ratios_in_smoke_json_come_from_paired_medians(smoke):
    _, data = smoke
    recs = data["records"]
    ratio = {(r["impl"], r["op"], r["M"], r["rank"]): r["ratio_to_limit"] for r in recs}
    for r in recs:
        if r["impl"] == "limit":
            assert r["ratio_to_limit"] == 1.0
            continue
        # the ratio uses the limit timed in alternation with this impl, not the limit record
        assert r["ratio_to_limit"] == pytest.approx(r["median_ms"] / r["limit_paired_ms"], rel=1e-12)
        for peft in ("peft_lora", "peft_vera"):
            # each side normalised by its own paired limit
            want = ratio[(peft, r["op"], r["M"], r["rank"])] / r["ratio_to_limit"]
            assert r["speedup_vs_" + peft] == pytest.approx(want, rel=1e-12)


def test_interleaved_timing_alternates_and_resets_grads():
    calls = []
    t = torch.zeros(1, requires_grad=True)

    def f(name):
        def g():
            assert t.grad is None or name == "b"  # a's grads are reset before each of its calls
            calls.append(name)
            t.grad = torch.ones(1)
        return g

    res = time_interleaved([f("a"), f("b")], "cpu", [[t], []])
    assert [r["reps"] for r in res] == [3, 3] and all(r["median_ms"] > 0 for r in res)
    timed = calls[2:]  # after one warm-up round of (a, b)
    assert timed == ["a", "b", "b", "a", "a", "b"]


def test_smoke_e2e(smoke):
    _, data = smoke
    e2e = {e["config"]: e for e in data["e2e"]}
    assert list(e2e) == E2E_CONFIGS
    for name in E2E_CONFIGS:
        e = e2e[name]
        assert "error" not in e, e
        assert e["step_ms"] > 0 and e["tokens_per_s"] == pytest.approx(e["tokens"] / (e["step_ms"] / 1e3))
        assert e["ratio_to_no_adapter"] == pytest.approx(e["step_ms"] / e2e["no_adapter"]["step_ms"])
        assert e["loss"] == pytest.approx(e2e["no_adapter"]["loss"], rel=0.2)  # every preset starts as the identity
        assert e["warmup_steps"] == len(e["warmup_ms"]) >= 1 and e["wall_ms_per_step"] > 0
        assert e["host_ms_per_step"] > 0 and e["host_syncs_per_step"] is None  # syncs are counted on CUDA only
        p = e["profile"]
        assert p["steps"] == 1 and p["top"] and "kernels_per_step" not in p  # CPU: operators, no launches
        assert {"name", "calls_per_step", "us_per_step", "us_per_call", "share"} <= set(p["top"][0])
        assert any(t["name"] in ("aten::mm", "aten::addmm", "aten::bmm") for t in p["top"])
    assert e2e["ours_tl6"]["backend"] in ("torch", None) and e2e["peft_lora"]["backend"] is None
    assert e2e["no_adapter"]["trainable"] == 0
    assert e2e["ours_tl6"]["trainable"] < e2e["ours_lora"]["trainable"] == e2e["peft_lora"]["trainable"]


def test_e2e_compiled_configs_compare_with_the_compiled_base():
    """The *_compiled configs run under torch.compile (on a CPU the aot_eager backend: the plumbing)
    and are divided by no_adapter_compiled, not by the eager base."""
    from bench.e2e import family, run_e2e

    out = run_e2e("cpu", True, configs=["no_adapter", "no_adapter_compiled", "ours_tl6_compiled"], profile=False)
    e2e = {e["config"]: e for e in out}
    assert all("error" not in e for e in out), out
    assert e2e["no_adapter_compiled"]["ratio_to_no_adapter"] == 1.0
    tl6 = e2e["ours_tl6_compiled"]
    assert tl6["ratio_to_no_adapter"] == pytest.approx(tl6["step_ms"] / e2e["no_adapter_compiled"]["step_ms"])
    assert tl6["trainable"] > 0 and tl6["loss"] == pytest.approx(e2e["no_adapter"]["loss"], rel=0.2)
    assert [family(c) for c in ("ours_tl6", "ours_tl6_4bit", "peft_lora_compiled", "ours_tl6_graphs")] == \
        ["", "_4bit", "_compiled", "_graphs"]


def test_smoke_table_and_plots(smoke):
    out, data = smoke
    md = (out / "results.md").read_text()
    assert "not speed claims" in md and "End-to-end" in md and "## Targets" not in md
    assert "## Probes" in md and "## Where the time goes per call" in md and "Where a training step's time goes" in md
    assert data["meta"]["device"] in md and data["meta"]["command"] in md
    for impl in SMOKE_IMPLS:
        assert f"| {impl} |" in md
    glance = md.split("## At a glance")[1].split("\n## ")[0]
    detail = md.split("## Per-layer microbenchmarks, every figure")[1].split("## End-to-end")[0]
    assert detail.count("\n| fwd |") + detail.count("\n| fwd_bwd |") == len(data["records"])
    # the pivot: one row per (op, M, rank, preset) of the smoke grid
    assert glance.count("\n| fwd |") + glance.count("\n| fwd_bwd |") == 2 * 3 * 2 * 3
    pytest.importorskip("matplotlib")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["ratio_fwd_K64_N48.png", "ratio_fwd_bwd_K64_N48.png"] == sorted(data["meta"]["plots"])
    assert all((out / p).stat().st_size > 1000 for p in pngs)


@cpu_only
def test_a_wrong_impl_is_flagged_and_gets_no_ratio(monkeypatch):
    def no_v(t):  # forgets the v scaling: the kind of bug the check exists for
        impl = cases._reference(t)
        return dataclasses.replace(impl, fn=lambda x: cases.reference.tied_lora_linear(x, t.W, t.b, t.A, t.B, t.u,
                                                                                        None, t.scaling))
    monkeypatch.setitem(IMPLS, "broken", (no_v, None))
    cache = _InputCache("cpu")
    case = Case(16, 64, 48, 4, "tl6")
    recs = [measure(case, i, op, "cpu", cache) for i in ("limit", "reference", "broken") for op in ("fwd", "fwd_bwd")]
    add_ratios(recs)
    good, bad = [r for r in recs if r["impl"] == "reference"], [r for r in recs if r["impl"] == "broken"]
    assert all(r["ok"] and "ratio_to_limit" in r for r in good)
    assert all(r["ok"] is False and "ratio_to_limit" not in r for r in bad)
    assert all(r["rel_err"] > 0.05 for r in bad)
    assert [r.get("missing_grad") for r in bad] == [None, True]  # v got no gradient at all


def test_ratios_come_from_medians_of_the_same_shape():
    recs = [dict(impl="limit", op="fwd", M=1, K=2, N=3, rank=4, median_ms=2.0),
            dict(impl="peft_lora", op="fwd", M=1, K=2, N=3, rank=4, median_ms=6.0, ok=True),
            dict(impl="ours", op="fwd", M=1, K=2, N=3, rank=4, median_ms=3.0, ok=True),
            dict(impl="ours", op="fwd", M=1, K=2, N=3, rank=8, median_ms=3.0, ok=True),
            dict(impl="addmm", op="fwd", M=1, K=2, N=3, rank=4, median_ms=1.0, ok=False),
            dict(impl="ours", op="fwd_bwd", M=1, K=2, N=3, rank=4, median_ms=1.0, ok=True),
            dict(impl="merged", op="fwd", M=1, K=2, N=3, rank=4, error="RuntimeError: boom"),
            dict(impl="merged", op="fwd", M=1, K=2, N=3, rank=8, median_ms=2.2, limit_paired_ms=2.0, ok=True,
                 back_to_back_ms=3.0, limit_back_to_back_ms=2.0, graph_ms=1.0)]
    add_ratios(recs)
    assert recs[2]["ratio_to_limit"] == 1.5 and recs[2]["speedup_vs_peft_lora"] == 2.0
    assert "speedup_vs_peft_lora" not in recs[3]  # no PEFT record at rank 8
    assert "ratio_to_limit" not in recs[4]  # a wrong result gets no ratio
    assert "ratio_to_limit" not in recs[5]  # no limit measured for fwd_bwd
    assert "ratio_to_limit" not in recs[6]
    # a paired limit wins over the limit record; decode ratios use the limit's own figure of the same kind
    assert recs[7]["ratio_to_limit"] == pytest.approx(1.1) and recs[7]["b2b_ratio_to_limit"] == 1.5
    assert "graph_ratio_to_limit" not in recs[7]  # no limit graph time to divide by


def test_targets_verdicts():
    base = dict(K=4096, N=4096, preset="lora", ok=True)
    recs = [dict(base, impl="ours", op="fwd_bwd", M=8192, rank=16, ratio_to_limit=1.12, speedup_vs_peft_lora=1.7),
            # VeRA does less work than PEFT LoRA: never judged against it
            dict(base, impl="ours", op="fwd_bwd", M=8192, rank=16, preset="vera", ratio_to_limit=1.1,
                 speedup_vs_peft_lora=2.5),
            dict(base, impl="addmm", op="fwd_bwd", M=8192, rank=16, ratio_to_limit=1.3),
            dict(base, impl="ours", op="fwd_bwd", M=8192, rank=128, ok=False, rel_err=0.4),
            dict(base, impl="ours", op="fwd", M=1, rank=16, ratio_to_limit=3.0, b2b_ratio_to_limit=1.4,
                 graph_ratio_to_limit=1.2),
            dict(base, impl="ours", op="fwd", M=8192, rank=16, preset="tl6", ratio_to_limit=1.13,
                 kernel_floors=[dict(kernel="_adapter_term_kernel", ratio_spec=1.25),
                                dict(kernel="_grad_up_kernel", ratio_spec=None)]),
            dict(base, impl="ours", op="fwd", M=16, rank=16, preset="tl6",  # decode: launch bound, not judged
                 kernel_floors=[dict(kernel="_adapter_term_kernel", ratio_spec=30.0)])]
    e2e = [dict(config="no_adapter", step_ms=100.0, peak_mem_bytes=10), dict(config="ours_tl6", step_ms=116.0,
                                                                              peak_mem_bytes=7),
           dict(config="peft_lora", step_ms=150.0, peak_mem_bytes=10)]
    rows = targets(recs, e2e, "NVIDIA H200")
    get = lambda name: [r for r in rows if r["target"] == name]  # noqa: E731
    assert [r["status"] for r in get("fwd+bwd <= 1.12x limit, r=16")] == ["met", "met"]  # inclusive; addmm not judged
    assert [r["status"] for r in get("fwd+bwd <= 1.25x limit, r=128")] == ["wrong result"]
    assert [r["status"] for r in get(">= 1.8x faster than PEFT LoRA, fwd+bwd, r=16")] == ["missed"]
    assert [r["status"] for r in get("fwd <= 1.10x limit, r=16")] == ["missed"]
    assert [r["status"] for r in get("decode M=1, eager back-to-back <= 1.5x limit, r=16")] == ["met"]
    assert [r["status"] for r in get("decode M=1, CUDA graph <= 1.15x limit, r=16")] == ["missed"]
    assert [r["status"] for r in get("decode M=1, eager back-to-back <= 1.5x limit, r=128")] == ["no data"]
    assert [r["status"] for r in get("Triton kernel <= 1.3x its bandwidth floor")] == ["met", "no data"]
    e = get("e2e step, TL6 <= 1.15x no adapter")
    assert e[0]["status"] == "missed" and e[0]["value"] == pytest.approx(1.16)
    assert get("e2e peak memory, TL6 <= 0.73x PEFT LoRA")[0]["status"] == "met"
    assert get("e2e peak memory, DoRA <= 0.58x PEFT DoRA")[0]["status"] == "no data"
    # on an H100 the first three bounds are 0.04 looser
    h100 = targets(recs, e2e, "NVIDIA H100 80GB HBM3")
    assert [r["goal"] for r in h100 if r["target"] == "fwd <= 1.10x limit, r=16"] == ["<= 1.14"]
    assert [r["status"] for r in h100 if r["target"] == "fwd <= 1.10x limit, r=16"] == ["met"]


def test_gpu_plan_covers_every_impl_of_the_issue():
    jobs = plan(GRIDS["targets"], "cuda")
    assert {i for _, i, _ in jobs} == set(IMPLS)
    assert {(c.M, c.K, c.N) for c, _, _ in jobs} == {(8192, 4096, 4096), (1, 4096, 4096), (16, 4096, 4096)}
    assert {c.rank for c, _, _ in jobs} == {16, 128} and {op for _, _, op in jobs} == {"fwd", "fwd_bwd"}
    assert len(jobs) == len(set(jobs))
    full = plan(GRIDS["full"], "cuda")
    # 5 M x 4 shapes x 2 ops x (limit + 4 ranks x (3 presets x 4 adapted impls + PEFT LoRA + PEFT VeRA))
    assert len(full) == 5 * 4 * 2 * (1 + 4 * (3 * 4 + 2))


def test_profile_plan_covers_the_target_shape_and_decode(smoke):
    _, data = smoke
    prof = {(r["impl"], r["op"], r["M"], r["rank"], r["preset"]) for r in data["records"] if r.get("profile")}
    planned = {(i, op, c.M, c.rank, c.preset) for c, i, op in profile_plan(data["records"], GRIDS["smoke"])}
    assert prof == planned
    big = {(i, op, r, p) for i, op, M, r, p in prof if M == 64}
    # every impl at the target M, both ops and ranks (tl6, PEFT at its own preset, the limit once per op)
    assert {i for i, *_ in big} == SMOKE_IMPLS
    assert ("limit", "fwd_bwd", 4, "lora") in big and ("peft_vera", "fwd", 8, "vera") in big
    assert {(i, op, M, r) for i, op, M, r, _ in prof if M == 1} == {("limit", "fwd", 1, 4), ("peft_lora", "fwd", 1, 4)}
    for r in data["records"]:
        if r.get("profile"):
            assert r["host_ms_per_call"] > 0 and r["profile"]["steps"] == 2 and r["profile"]["top"]


def test_smoke_probes(smoke):
    _, data = smoke
    p = data["probes"]
    assert p["copy"]["bytes_per_s"] > 0
    assert [g["M"] for g in p["gemm_epilogue"]] == [64, 16, 1]
    for g in p["gemm_epilogue"]:
        assert g["addmm_over_mm"] == pytest.approx(g["addmm_ms"] / g["mm_ms"])
    merge = p["merge_layout"]
    assert [m["preset"] for m in merge] == ["lora", "vera", "tl6"]
    for m in merge:
        names = [v["weight"] for v in m["variants"]]
        assert names == ["W (limit)", "copy of W", "merged (fresh tensor)", "merged in place"]
        lay = [{k: v for k, v in x["layout"].items() if k != "align_bytes"} for x in m["variants"]]
        assert all(x == lay[0] for x in lay)  # the merged weights are laid out as W
        assert m["variants"][0]["ratio"] == 1.0
    pm = merge[0]["package_merge"]
    assert pm == dict(pm, same_storage=True, keeps_layout=True, changed_values=True), pm


def test_merged_and_limit_records_carry_the_weight_layout(smoke):
    _, data = smoke
    for r in data["records"]:
        if r["impl"] in ("limit", "merged"):
            w = r["weight"]
            assert w["shape"] == [48, 64] and w["stride"] == [64, 1] and w["dtype"] == "bfloat16"
            assert w["contiguous"] and w["align_bytes"] >= 16


@cpu_only
def test_cli_refuses_speed_grids_without_cuda_and_stops_on_time(tmp_path):
    with pytest.raises(SystemExit):
        main(["--grid", "targets", "--out", str(tmp_path)])
    assert main(["--grid", "smoke", "--max-minutes", "0", "--no-e2e", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["records"] == [] and "stopped after 0" in data["meta"]["truncated"]


@cpu_only
def test_resume_measures_only_what_is_missing(tmp_path):
    assert main(["--grid", "smoke", "--no-e2e", "--impls", "limit,merged", "--out", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {r["impl"] for r in first} == {"limit", "merged"}
    assert main(["--grid", "smoke", "--no-e2e", "--impls", "limit,merged,addmm", "--resume", "--out",
                 str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    keys = [(r["impl"], r["op"], r["M"], r["rank"], r["preset"]) for r in data["records"]]
    assert len(keys) == len(set(keys)) and {k[0] for k in keys} == {"limit", "merged", "addmm"}
    old = {(r["impl"], r["op"], r["M"], r["rank"], r["preset"]): r["median_ms"] for r in first}
    assert all(old[k] == r["median_ms"] for k, r in zip(keys, data["records"]) if k in old)  # kept, not remeasured
    assert data["meta"]["planned"] == len(data["records"])  # the whole grid, not the remainder
    # a resumed run without e2e keeps the e2e records already there
    data["e2e"] = [dict(config="no_adapter", error="skipped: out of time (--max-minutes)")]
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert main(["--grid", "smoke", "--no-e2e", "--impls", "limit", "--resume", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["e2e"][0]["config"] == "no_adapter"


def test_gpu_session_script_is_valid_bash():
    script = ROOT / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert '-m cuda "${TESTS[@]}"' in text and '-m "not cuda" "${TESTS[@]}"' in text
    assert '"$PY" -m bench --grid "$BENCH_GRID" --no-e2e' in text and "--tests-exit-code" in text
    assert "TIEDLORA_FWD_PATH" not in text


@cpu_only
@pytest.mark.interpreter
def test_kernel_impl_measures_under_the_interpreter():
    """The GPU-only impl goes through the same measure() on the Triton interpreter: the backend env
    reaches the backward, the check passes, and each trained tensor's gradient error is recorded."""
    assert KERNEL_IMPLS == ("ours",)
    cache = _InputCache("cpu")
    recs = [measure(Case(16, 64, 48, 4, "tl6"), "ours", op, "cpu", cache) for op in ("fwd", "fwd_bwd")]
    assert [r["env"] for r in recs] == [{"TIEDLORA_BACKEND": "triton"}] * 2
    assert all(r["ok"] for r in recs), recs
    assert set(recs[1]["rel_err_grads"]) == {"x", "A", "B", "u", "v"}
    assert all(0 < e < 2e-2 for e in recs[1]["rel_err_grads"].values())


def test_report_rebuilds_from_json_and_readme_snippet_is_gpu_only(smoke, tmp_path):
    import shutil

    from bench.report import main as report_main
    from bench.report import readme_snippet

    out, data = smoke
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "results.md").unlink()
    assert report_main([str(copy)]) == 0
    assert (copy / "results.md").read_text().split("- date:")[1] == (out / "results.md").read_text().split("- date:")[1]
    with pytest.raises(ValueError, match="only a GPU run"):
        readme_snippet(data["meta"], data["records"], data["e2e"], [], "x")
    gpu = dict(data["meta"], mode="gpu", speed_claims=True, device="H100 (fake, for the renderer)")
    text = readme_snippet(gpu, data["records"], data["e2e"], targets(data["records"], data["e2e"]), "bench/results/x")
    assert "H100 (fake, for the renderer)" in text and gpu["commit"][:12] in text and "| no_adapter |" in text
    assert text.count("| e2e step, TL6 <= 1.15x no adapter |") == 1


def test_serving_benchmark_runs_from_the_main_command(tmp_path):
    """``python -m bench --serving`` runs the multi-adapter serving benchmark (bench.serving) after the
    rest, into OUT/serving (here with no time for measurements: the wiring and the labelled JSON)."""
    assert main(["--grid", "smoke", "--max-minutes", "0", "--no-e2e", "--no-probes", "--profile", "none",
                 "--serving", "--serving-minutes", "0", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "serving" / "results.json").read_text())
    assert data["meta"]["mode"] == "smoke-cpu" and data["meta"]["speed_claims"] is False
    assert "bench.serving" in data["meta"]["command"]


def test_serving_smoke_run_checks_every_config_against_the_loop(tmp_path):
    """The smoke run measures every (phase, kind, distinct) config, fewest distinct first with the bank
    filled as far as each needs, and the bank matches the naive loop in each (with one adapter
    loaded, the bank's factor is the shared one, which the loop must load too)."""
    from bench import serving

    assert serving.main(["--out", str(tmp_path), "--no-loop"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(c["phase"], c["kind"], c["distinct"]) for c in data["checks"]] == [
        (p, k, n) for k in serving.KINDS for n in serving.DISTINCT["smoke"] for p in serving.PHASES["smoke"]]
    assert all(c["ok"] for c in data["checks"]), data["checks"]


def test_serving_targets_are_judged_only_at_their_distinct_count():
    """A serving run cut short before 1024 distinct adapters reports its largest figure unjudged."""
    from bench.serving import verdicts

    rat = {"prefill": {"shared": {"1": {"bank / one": 1.0}, "256": {"bank / one": 1.05}}}}
    cut = [v for v in verdicts(rat, 1024) if v["kind"] == "shared" and v["figure"] == "bank / one"]
    assert cut == [dict(phase="prefill", kind="shared", figure="bank / one", distinct=256, value=1.05,
                        target="<= 1.1", met=None)]
    rat["prefill"]["shared"]["1024"] = {"bank / one": 1.2}
    full = [v for v in verdicts(rat, 1024) if v["kind"] == "shared" and v["figure"] == "bank / one"]
    assert full[0]["distinct"] == 1024 and full[0]["met"] is False


def test_claims_never_outlive_their_conditions(tmp_path, monkeypatch):
    """What a GPU run may claim (review findings): the README snippet judges no target once the
    claims are withdrawn and says when a run was cut short; failed GPU tests withdraw the serving
    benchmark's claims too; a missing ratio reads '-'; a run killed before its final write and an
    interrupted serving run both say they are partial."""
    from bench import serving
    from bench.report import readme_snippet
    from bench.session_summary import _ratio, restamp

    meta = dict(mode="gpu", speed_claims=False, no_claims_reason="the GPU tests failed", truncated="stopped after 3 of 40",
                date="2026-12-01", device="H200", driver="x", torch="t", triton="3", commit="abc", command="c")
    rec = dict(impl="ours", op="fwd_bwd", M=8192, K=4096, N=4096, rank=16, preset="tl6", median_ms=1.0,
               ratio_to_limit=1.05, ok=True)
    text = readme_snippet(meta, [rec], [], targets([rec], [], "NVIDIA H200"), "x")
    assert "**met**" not in text and "Cut short: stopped after 3 of 40" in text and "No speed claims" in text

    (tmp_path / "serving").mkdir()
    claimed = dict(meta=dict(mode="gpu", speed_claims=True), records=[], targets=[dict(met=True)])
    (tmp_path / "serving" / "results.json").write_text(json.dumps(claimed))
    restamp(tmp_path, 1)
    after = json.loads((tmp_path / "serving" / "results.json").read_text())
    assert after["meta"]["speed_claims"] is False and after["targets"] == [] and after["meta"]["tests_exit_code"] == 1
    assert _ratio(None) == "-" and _ratio(1.234) == "1.23x"

    calls = []

    def dies(*a, **k):  # the process killed mid-run: nothing after the last per-measurement save
        calls.append(1)
        if len(calls) > 2:
            raise SystemExit("killed")
        return real_measure(*a, **k)

    import bench.run as run

    real_measure = run.measure
    monkeypatch.setattr(run, "measure", dies)
    with pytest.raises(SystemExit):
        main(["--grid", "smoke", "--no-e2e", "--no-probes", "--profile", "none", "--out", str(tmp_path / "b")])
    partial = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(partial["records"]) == 2 and partial["meta"]["truncated"].startswith("in progress")

    ticks = []

    def interrupted(*a, **k):
        ticks.append(1)
        if len(ticks) > 1:
            raise KeyboardInterrupt
        return dict(median_ms=1.0, min_ms=1.0, max_ms=1.0)

    monkeypatch.setattr(serving, "timed", interrupted)
    assert serving.main(["--out", str(tmp_path / "s"), "--no-loop"]) == 0
    cut = json.loads((tmp_path / "s" / "results.json").read_text())
    assert cut["meta"]["truncated"].startswith("interrupted") and len(cut["records"]) == 1


def test_host_overhead_probe_writes_every_pathway(tmp_path, monkeypatch):
    """``python -m bench.host_overhead`` (here on the interpreter, a few calls): every pathway timed,
    the profile written, the record labelled with device, versions and the measured tree (as every
    other artefact: ``BENCH_COMMIT`` names it)."""
    from bench.host_overhead import main as host_main

    monkeypatch.setenv("BENCH_COMMIT", "0123abcd")
    assert host_main(["--out", str(tmp_path), "--calls", "2"]) == 0
    rec = json.loads((tmp_path / "host_overhead.json").read_text())
    assert {"device", "torch", "triton", "command", "shape", "dirty"} <= set(rec) and rec["commit"] == "0123abcd"
    want = {"torch one-element add_", "F.linear fwd", "F.linear fwd+bwd", "adapter_term launch",
            "ours fwd (no grad)", "ours fwd", "ours fwd+bwd", "custom op fwd+bwd"}
    assert set(rec["us_per_call"]) == want and all(us > 0 for us in rec["us_per_call"].values())
    assert "ours_fwd_bwd" in (tmp_path / "host_overhead_profile.txt").read_text()


def test_host_overhead_splits_a_launch_without_a_gpu(tmp_path):
    """Outside the interpreter the probe times our launcher's Python and Triton's JIT run before the
    launch (compile-only, meta tensors): the JIT's part shows as the difference. (Both are timings: on a
    loaded 2-core machine their order is noise, so only that both were measured is checked.)"""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.host_overhead", "--calls", "20", "--out", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    us = json.loads((tmp_path / "host_overhead.json").read_text())["us_per_call"]
    mine, with_jit = us["adapter_term: our launcher only"], us["adapter_term: our launcher + Triton JIT run (no launch)"]
    assert 0 < mine < 1e6 and 0 < with_jit < 1e6


def test_tile_sweep_checks_every_configuration_against_the_current_one(tmp_path):
    """``python -m bench.tile_sweep`` on the interpreter (tiny shapes): every case's configurations
    launch, agree with the current rule's outputs (fp32: the same math in another order), and the
    records name the device, versions and commit; nothing is a speed claim on a CPU."""
    from bench.tile_sweep import main as sweep_main

    assert sweep_main(["--out", str(tmp_path), "--max-seconds", "120"]) == 0
    data = json.loads((tmp_path / "tile_sweep.json").read_text())
    assert {"device", "torch", "triton", "commit", "command"} <= set(data["meta"])
    recs = data["records"]
    cases = {r["case"] for r in recs}
    assert {c.split(" r=")[0] for c in cases} == {"fwd", "dx", "decode", "grad_factors", "decode layer"}
    assert not [r for r in recs if "error" in r or "skipped" in r]
    for case in cases:
        mine = [r for r in recs if r["case"] == case]
        assert mine[0]["rel_err_vs_current"] == 0 and len(mine) >= 2 and all("us" not in r for r in mine)
        # timed again after the others: both timings and their spread recorded, the faster kept
        timings = mine[0]["timings_us"]
        assert len(timings) == 2 and mine[0]["cpu_wall_us_not_kernel_speed"] == min(timings)
        assert mine[0]["spread"] == pytest.approx(max(timings) / min(timings) - 1, abs=1e-4)
        assert all(r["rel_err_vs_current"] < 1e-5 for r in mine if r["variant"] != "limit")
    layer = [r for r in recs if r["case"].startswith("decode layer")]
    assert [r["variant"] for r in layer][:2] == ["general", "fused"] and layer[-1]["variant"] == "limit"
    assert layer[-1]["rel_err_vs_current"] is None  # the base layer alone computes no adapter
    # a configuration that differs from the current rule really was launched with its own tiles
    assert any(r["tiles"].get("block_m", r["tiles"].get("block_m_a")) == 16 for r in recs)
    assert "| fwd r=3 M=37 | current rule |" in (tmp_path / "tile_sweep.md").read_text()


def test_tile_sweep_records_never_pass_a_broken_configuration_as_a_match():
    """A NaN output is no match (rel err inf); without the current configuration's outputs (it
    failed) nothing is compared; an error while timing shows in the table; the fastest listed is
    one whose outputs agree."""
    from bench.tile_sweep import SweepCase, _rel_err, markdown, sweep

    one = torch.ones(4)
    assert _rel_err([torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, 2.0])]) == float("inf")
    assert _rel_err([one * 1.5], [one]) == pytest.approx(0.5)

    def run(cfg, variant):
        if variant == "raise":
            raise RuntimeError("out of shared memory")
        return ({"ok": one, "nan": one * float("nan"), "off": one * 2}[variant],)

    def case(*variants):
        return SweepCase("c", "k", {}, 8.0, run, [(v, None, v) for v in variants])

    recs = sweep([case("raise", "off", "ok")], False, None, float("inf"), lambda r: None)
    assert recs[0]["current"] and "error" in recs[0]
    assert [r["rel_err_vs_current"] for r in recs[1:]] == [None, None]
    recs = sweep([case("ok", "nan", "off")], False, None, float("inf"), lambda r: None)
    assert [r["rel_err_vs_current"] for r in recs] == [0.0, float("inf"), 1.0]
    for r, us in zip(recs, (10.0, 2.0, 3.0)):  # as a GPU run records them
        r["us"] = us
    recs.append(dict(case="c", config="timefail", current=False, variant="x", rel_err_vs_current=0.0,
                     error="RuntimeError: illegal address"))
    recs[0]["spread"] = 0.01
    md = markdown(dict(device="d", torch="t", triton="3", commit="x", command="c", cuda=True, bandwidth=1.0), recs)
    assert "| c | timefail | RuntimeError: illegal address |" in md
    assert "| c | 10.0 | 1.0% | ok | 10.0 | 1.00x |" in md  # neither the NaN nor the wrong one is the fastest


def test_tile_sweep_runs_the_cases_it_is_asked_for(tmp_path):
    from bench.tile_sweep import main as sweep_main

    assert sweep_main(["--out", str(tmp_path), "--cases", "grad_factors,decode layer"]) == 0
    recs = json.loads((tmp_path / "tile_sweep.json").read_text())["records"]
    assert {r["case"].split(" r=")[0] for r in recs} == {"grad_factors", "decode layer"}
    with pytest.raises(SystemExit, match="matches none"):
        sweep_main(["--out", str(tmp_path), "--cases", "nothing"])


def test_tile_sweep_case_names_select_exactly():
    """A full case name selects that case alone, though it is part of another's name; a part selects all."""
    from bench.tile_sweep import cases, select_cases

    gpu_cases = cases(torch.device("meta"), False)
    pick = lambda wanted: [c.name for c in select_cases(gpu_cases, wanted)]  # noqa: E731
    assert pick("decode r=16 M=1") == ["decode r=16 M=1"]
    assert pick("decode r=16 M=1, r=128") == ["decode r=16 M=1", "fwd r=128 M=8192", "grad_factors r=128 M=8192",
                                              "dx r=128 M=8192"]
    assert pick("decode layer") == ["decode layer r=16 M=1", "decode layer r=16 M=16"]


def test_tile_sweep_stops_at_its_deadline_with_what_it_has(tmp_path):
    from bench.tile_sweep import main as sweep_main

    assert sweep_main(["--out", str(tmp_path), "--max-seconds", "0"]) == 0
    recs = json.loads((tmp_path / "tile_sweep.json").read_text())["records"]
    assert recs and all(r.get("skipped") == "deadline" for r in recs)


def test_an_explicit_bench_commit_names_the_measured_tree(monkeypatch):
    """BENCH_COMMIT wins over git's HEAD (the GPU machine's copy can carry an older commit's git
    metadata); dirtiness is known only when git's HEAD is that commit."""
    import subprocess

    from bench.claims import measured_commit

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    commit, dirty = measured_commit()
    assert commit == (head or None) and (dirty is None) == (not head)
    monkeypatch.setenv("BENCH_COMMIT", "0123abcd")
    assert measured_commit() == ("0123abcd", None)
    if head:
        monkeypatch.setenv("BENCH_COMMIT", head[:12])
        assert measured_commit()[0] == head[:12] and isinstance(measured_commit()[1], bool)


def test_the_fastest_tile_configuration_computes_what_the_current_one_does():
    """A variant that changes the precision (the bf16 down-projection dot) is timed and shown, never
    picked as a case's fastest, however fast and however close its outputs."""
    from bench.tile_sweep import fastest_per_case

    case = "fwd r=16 M=8192"
    recs = [dict(case=case, config="current", us=70.0, current=True, spread=0.01),
            dict(case=case, config="BLOCK_M 64", us=50.0, rel_err_vs_current=1e-7),
            dict(case=case, config="current, A in x dtype", variant="down in x dtype", us=40.0,
                 rel_err_vs_current=1e-3),
            dict(case=case, config="8 warps", us=30.0, rel_err_vs_current=0.5)]  # disagrees: not an option
    (row,) = fastest_per_case(recs)
    assert row["fastest"] == "BLOCK_M 64" and row["gain"] == pytest.approx(1.4)


def test_the_fastest_tile_configuration_beats_the_noise():
    """Each configuration is one do_bench median: another one is named a case's fastest only when its
    gain over the current one beats the spread of the current one's two timings (first and last of
    the case) and is at least 1.03; a current configuration timed once (no spread) stays."""
    from bench.tile_sweep import MIN_GAIN, fastest_per_case

    def fastest(spread, other_us):
        current = dict(case="c", config="current", us=70.0, current=True, spread=spread)
        other = dict(case="c", config="BLOCK_M 64", us=other_us, rel_err_vs_current=1e-7)
        (row,) = fastest_per_case([current, other])
        assert row["current_spread"] == spread
        return row["fastest"], row["gain"]

    assert MIN_GAIN == 1.03
    assert fastest(0.0, 69.93) == ("current", 1.0)  # gain 1.001: noise
    assert fastest(0.0, 68.5) == ("current", 1.0)  # 1.022: under 1.03
    assert fastest(0.05, 67.5) == ("current", 1.0)  # 1.037, but the current one moved 5 % by itself
    assert fastest(0.05, 60.0) == ("BLOCK_M 64", pytest.approx(1.167))
    assert fastest(0.0, 67.0) == ("BLOCK_M 64", pytest.approx(1.045))
    assert fastest(None, 35.0) == ("current", 1.0)  # timed once: no spread to beat


def test_the_tile_sweep_times_the_current_configuration_again_after_the_others():
    """The current configuration's second timing comes after every other configuration of its case
    (drift over a case shows as its spread), before the next case starts."""
    from bench.tile_sweep import SweepCase, sweep

    launched = []

    def case(name):
        def run(cfg, variant):
            launched.append((name, variant))
            return (torch.ones(2),)
        return SweepCase(name, "k", {}, 8.0, run, [(v, None, v) for v in ("cur", "alt1", "alt2")])

    recs = sweep([case("a"), case("b")], False, None, float("inf"), lambda r: None)
    # per configuration: the outputs checked, then one timing; the current one's last timing ends its case
    assert launched == [(c, v) for c in "ab" for v in ("cur", "cur", "alt1", "alt1", "alt2", "alt2", "cur")]
    first = recs[0]
    assert len(first["timings_us"]) == 2 and first["cpu_wall_us_not_kernel_speed"] == min(first["timings_us"])
    assert first["spread"] >= 0 and not [r for r in recs if not r["current"] and "spread" in r]


def test_a_sigterm_stops_the_e2e_benchmark_where_it_is(monkeypatch):
    """bench.run's SIGTERM handler raises Stopped: the e2e benchmark must let it through (building a
    config, timing it or in its diagnostics), so the run writes what it has and stops, instead of
    recording the signal as one config's error and going on to the next."""
    import bench.e2e as e2e
    from bench.run import Stopped

    built, real_build = [], e2e._build

    def build(config, *a, **k):
        built.append(config)
        if config == "ours_tl6":
            raise Stopped("signal 15")
        return real_build(config, *a, **k)

    monkeypatch.setattr(e2e, "_build", build)
    sink = []
    with pytest.raises(Stopped):
        e2e.run_e2e("cpu", True, configs=["no_adapter", "ours_tl6", "peft_lora"], profile=False, sink=sink)
    assert built == ["no_adapter", "ours_tl6"] and [e["config"] for e in sink] == ["no_adapter"]
    assert "step_ms" in sink[0]

    def diagnostics(*a, **k):
        raise Stopped("signal 15")

    monkeypatch.setattr(e2e, "_build", real_build)
    monkeypatch.setattr(e2e, "_syncs_in", diagnostics)
    sink = []
    with pytest.raises(Stopped):
        e2e.run_e2e("cpu", True, configs=["no_adapter", "ours_tl6"], profile=True, sink=sink)
    assert [e["config"] for e in sink] == ["no_adapter"] and "profile_error" not in sink[0]
