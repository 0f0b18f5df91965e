"""The benchmark runs end to end (CPU smoke mode) and its JSON, table, plots and ratios are right."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.cases import GRIDS, IMPLS  # noqa: E402
from bench.run import add_ratios, main, plan  # noqa: E402

RECORD_FIELDS = {"impl", "op", "M", "K", "N", "rank", "preset", "dtype", "median_ms", "tflops", "gbps"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("smoke mode is the CPU path")
    out = tmp_path_factory.mktemp("bench")
    assert main(["--grid", "smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_smoke_json_is_complete_and_labelled(smoke):
    out, data = smoke
    meta, records = data["meta"], data["records"]
    assert meta["mode"] == "smoke-cpu" and meta["speed_claims"] is False
    for key in ("device", "torch", "triton", "command", "date", "commit"):
        assert key in meta
    assert records and not [r for r in records if "error" in r]
    for r in records:
        assert RECORD_FIELDS <= set(r), r
        assert r["median_ms"] > 0
    impls = {r["impl"] for r in records}
    assert impls == {"limit", "merged", "reference", "addmm", "peft_lora", "peft_vera"}  # no kernel timings on CPU
    assert all(r["ok"] for r in records if "ok" in r)
    fb = [r for r in records if r["op"] == "fwd_bwd" and r["impl"] == "reference"]
    assert fb and all(r["saved_bytes"] > 0 for r in fb)
    assert {e["config"] for e in data["e2e"]} >= {"no_adapter", "ours_tl6", "ours_lora", "peft_lora"}
    assert not [e for e in data["e2e"] if "error" in e]


def test_smoke_table_and_plots(smoke):
    out, _ = smoke
    md = (out / "results.md").read_text()
    assert "not speed claims" in md and "| peft_lora |" in md and "End-to-end" in md
    pytest.importorskip("matplotlib")
    assert sorted(p.name for p in out.glob("*.png")) == ["ratio_fwd_K64_N48.png", "ratio_fwd_bwd_K64_N48.png"]


def test_ratios_come_from_medians_of_the_same_shape():
    recs = [dict(impl="limit", op="fwd", M=1, K=2, N=3, rank=4, median_ms=2.0),
            dict(impl="peft_lora", op="fwd", M=1, K=2, N=3, rank=4, median_ms=6.0),
            dict(impl="ours", op="fwd", M=1, K=2, N=3, rank=4, median_ms=3.0, ok=True),
            dict(impl="ours", op="fwd", M=1, K=2, N=3, rank=8, median_ms=3.0, ok=True),
            dict(impl="ours_fused", op="fwd", M=1, K=2, N=3, rank=4, median_ms=1.0, ok=False)]
    add_ratios(recs)
    assert recs[2]["ratio_to_limit"] == 1.5 and recs[2]["speedup_vs_peft_lora"] == 2.0
    assert "speedup_vs_peft_lora" not in recs[3]  # no PEFT record at rank 8
    assert "ratio_to_limit" not in recs[4]  # a wrong result gets no ratio


def test_gpu_plan_covers_every_impl_of_the_issue():
    jobs = plan(GRIDS["targets"], "cuda")
    impls = {i for _, i, _ in jobs}
    assert impls == set(IMPLS)
    assert {(c.M, c.K, c.N) for c, _, _ in jobs} >= {(8192, 4096, 4096), (1, 4096, 4096), (16, 4096, 4096)}
    assert len(plan(GRIDS["full"], "cuda")) > len(jobs)
