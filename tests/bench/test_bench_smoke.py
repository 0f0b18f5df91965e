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
from bench.run import _InputCache, add_ratios, main, measure, plan, targets  # noqa: E402

RECORD_FIELDS = {"impl", "op", "M", "K", "N", "rank", "preset", "dtype", "adapter_dtype", "median_ms", "p20_ms",
                 "p80_ms", "tflops", "gbps"}
META_FIELDS = {"mode", "speed_claims", "device", "driver", "torch", "triton", "cuda", "transformers", "peft",
               "command", "date", "commit", "grid", "timing", "tolerance", "wall_s"}
SMOKE_IMPLS = set(IMPLS) - set(KERNEL_IMPLS)

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU path")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("smoke mode is the CPU path")
    out = tmp_path_factory.mktemp("bench")
    assert main(["--grid", "smoke", "--out", str(out)]) == 0
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


def test_ratios_in_smoke_json_come_from_its_medians(smoke):
    _, data = smoke
    recs = data["records"]
    limit = {(r["op"], r["M"]): r["median_ms"] for r in recs if r["impl"] == "limit"}
    peft = {(r["op"], r["M"], r["rank"]): r["median_ms"] for r in recs if r["impl"] == "peft_lora"}
    vera = {(r["op"], r["M"], r["rank"]): r["median_ms"] for r in recs if r["impl"] == "peft_vera"}
    for r in recs:
        assert r["speedup_vs_peft_vera"] == pytest.approx(vera[(r["op"], r["M"], r["rank"])] / r["median_ms"],
                                                          rel=1e-12)
        assert r["ratio_to_limit"] == pytest.approx(r["median_ms"] / limit[(r["op"], r["M"])], rel=1e-12)
        assert r["speedup_vs_peft_lora"] == pytest.approx(peft[(r["op"], r["M"], r["rank"])] / r["median_ms"],
                                                          rel=1e-12)


def test_smoke_e2e(smoke):
    _, data = smoke
    e2e = {e["config"]: e for e in data["e2e"]}
    assert set(e2e) >= {"no_adapter", "ours_tl6", "ours_lora", "peft_lora"}
    for name in ("no_adapter", "ours_tl6", "ours_lora", "peft_lora"):
        e = e2e[name]
        assert "error" not in e, e
        assert e["step_ms"] > 0 and e["tokens_per_s"] == pytest.approx(e["tokens"] / (e["step_ms"] / 1e3))
        assert e["ratio_to_no_adapter"] == pytest.approx(e["step_ms"] / e2e["no_adapter"]["step_ms"])
        assert e["loss"] == pytest.approx(e2e["no_adapter"]["loss"], rel=0.2)  # every preset starts as the identity
    assert e2e["ours_tl6"]["backend"] == "torch" and e2e["peft_lora"]["backend"] is None
    assert e2e["no_adapter"]["trainable"] == 0
    assert e2e["ours_tl6"]["trainable"] < e2e["ours_lora"]["trainable"] == e2e["peft_lora"]["trainable"]


def test_smoke_table_and_plots(smoke):
    out, data = smoke
    md = (out / "results.md").read_text()
    assert "not speed claims" in md and "End-to-end" in md and "## Targets" not in md
    assert data["meta"]["device"] in md and data["meta"]["command"] in md
    for impl in SMOKE_IMPLS:
        assert f"| {impl} |" in md
    glance, detail = md.split("## At a glance")[1].split("## Per-layer microbenchmarks, every figure")
    detail = detail.split("## End-to-end")[0]
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
            dict(impl="ours_fused", op="fwd", M=1, K=2, N=3, rank=4, median_ms=1.0, ok=False),
            dict(impl="ours", op="fwd_bwd", M=1, K=2, N=3, rank=4, median_ms=1.0, ok=True),
            dict(impl="ours_epilogue", op="fwd", M=1, K=2, N=3, rank=4, error="RuntimeError: boom")]
    add_ratios(recs)
    assert recs[2]["ratio_to_limit"] == 1.5 and recs[2]["speedup_vs_peft_lora"] == 2.0
    assert "speedup_vs_peft_lora" not in recs[3]  # no PEFT record at rank 8
    assert "ratio_to_limit" not in recs[4]  # a wrong result gets no ratio
    assert "ratio_to_limit" not in recs[5]  # no limit measured for fwd_bwd
    assert "ratio_to_limit" not in recs[6]


def test_targets_verdicts():
    base = dict(K=4096, N=4096, preset="lora", ok=True)
    recs = [dict(base, impl="ours", op="fwd_bwd", M=8192, rank=16, ratio_to_limit=1.08, speedup_vs_peft_lora=1.2),
            dict(base, impl="ours_fused", op="fwd_bwd", M=8192, rank=16, ratio_to_limit=1.3),
            dict(base, impl="ours", op="fwd_bwd", M=8192, rank=128, ok=False, rel_err=0.4),
            dict(base, impl="ours", op="fwd", M=16, rank=16, ratio_to_limit=1.15)]
    e2e = [dict(config="no_adapter", step_ms=100.0), dict(config="ours_tl6", step_ms=112.0)]
    rows = targets(recs, e2e)
    get = lambda name, impl="ours": [r for r in rows if r["target"] == name and r["impl"] == impl]  # noqa: E731
    assert [r["status"] for r in get("fwd+bwd <= 1.10x limit, r=16")] == ["met"]
    assert [(r["status"], r["binding"]) for r in get("fwd+bwd <= 1.10x limit, r=16", "ours_fused")] == [("missed", False)]
    assert [r["status"] for r in get("fwd+bwd <= 1.25x limit, r=128")] == ["wrong result"]
    assert [r["status"] for r in get(">= 1.3x faster than PEFT LoRA, fwd+bwd, r=16")] == ["missed"]
    assert [r["status"] for r in get("decode fwd <= 1.15x limit, r=16")] == ["met"]  # bound inclusive
    assert [r["status"] for r in get("decode fwd <= 1.15x limit, r=128")] == ["no data"]
    e = get("e2e step, TL6 <= 1.10x no adapter", "ours_tl6")
    assert e[0]["status"] == "missed" and e[0]["value"] == pytest.approx(1.12)


def test_gpu_plan_covers_every_impl_of_the_issue():
    jobs = plan(GRIDS["targets"], "cuda")
    assert {i for _, i, _ in jobs} == set(IMPLS)
    assert {(c.M, c.K, c.N) for c, _, _ in jobs} == {(8192, 4096, 4096), (1, 4096, 4096), (16, 4096, 4096)}
    assert {c.rank for c, _, _ in jobs} == {16, 128} and {op for _, _, op in jobs} == {"fwd", "fwd_bwd"}
    assert len(jobs) == len(set(jobs))
    full = plan(GRIDS["full"], "cuda")
    # 5 M x 4 shapes x 2 ops x (limit + 4 ranks x (3 presets x 7 adapted impls + PEFT LoRA + PEFT VeRA))
    assert len(full) == 5 * 4 * 2 * (1 + 4 * (3 * 7 + 2))


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


def test_gpu_session_script_is_valid_bash():
    script = ROOT / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "-p no:cacheprovider -m cuda tests" in text and "-m \"not cuda\" tests" in text
    assert '"$PY" -m bench --grid "${BENCH_GRID:-targets}"' in text and "--tests-exit-code" in text and '"$OUT' in text


@cpu_only
@pytest.mark.interpreter
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_kernel_impls_measure_under_the_interpreter(impl):
    """The GPU-only impls go through the same measure() on the Triton interpreter: the env reaches the
    backward, the check passes, and each trained tensor's gradient error is recorded."""
    cache = _InputCache("cpu")
    recs = [measure(Case(16, 64, 48, 4, "tl6"), impl, op, "cpu", cache) for op in ("fwd", "fwd_bwd")]
    assert [r["env"]["TIEDLORA_FWD_PATH"] for r in recs] == [impl.removeprefix("ours_").replace("ours", "auto")] * 2
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
    assert text.count("| e2e step, TL6 <= 1.10x no adapter |") == 1
