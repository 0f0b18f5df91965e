"""``bench/compile_report.py``: every kernel of a training step compiles for sm_90 (Hopper) without a GPU,
on tensor cores, pipelined, with no spills on the paths ``auto`` takes.

This is the one check of the GPU code path (not the interpreter's) that runs in CI: a kernel
that only compiles under ``TRITON_INTERPRET=1`` fails here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Every kernel one training step launches (fused and epilogue paths, row scale included).
KERNELS = {"_tied_lora_fwd_kernel", "_tied_lora_epilogue_kernel", "_tied_lora_bwd_db_dv_kernel",
           "_tied_lora_bwd_da_kernel", "_row_scale_bwd_kernel"}


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its CUDA backend")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 6):
        pytest.skip("the compile report drives triton's JIT internals as of triton 3.6-3.9")
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TIEDLORA_FWD_PATH")}
    proc = subprocess.run([sys.executable, "-m", "bench.compile_report", "--quick", "--arch", "90", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "compile_report.json").read_text()), (out / "compile_report.md").read_text()


def test_every_kernel_compiles_for_hopper(compile_report):
    rep, md = compile_report
    assert rep["arch"] == 90 and rep["triton"]
    assert {r["kernel"] for r in rep["rows"]} == KERNELS
    assert rep["ptxas"]["path"] and rep["ptxas"]["version"]
    for r in rep["rows"]:
        assert r["ptxas_error"] is None, r["ptxas_error"]
        assert r["registers"] is not None and 0 < r["registers"] <= 255, r  # ptxas -v was read
        assert r["fits_smem"], f"{r['kernel']} {r['config']}: {r['shared_bytes']} B of shared memory"
    assert md.count("\n| train-") == len(rep["rows"])


def test_auto_paths_do_not_spill(compile_report):
    """Nothing ``auto`` runs spills; at r = 128 that rests on the tile pruning (unpruned, the fused
    GEMM's 128x64 tile spilled ~1 KB per thread)."""
    rep, _ = compile_report
    assert any(r["rank"] == 128 for r in rep["rows"])
    auto = [r for r in rep["rows"] if r["auto_picks_path"]]
    assert auto
    spilling = [(r["case"], r["kernel"], r["config"], r["spill_store_bytes"]) for r in auto if r["spill_store_bytes"]]
    assert not spilling


def test_bf16_gemm_runs_on_pipelined_tensor_cores(compile_report):
    """The fused GEMM's bf16 dots are wgmma (Hopper tensor cores) and its loads are async copies into
    multi-stage shared-memory buffers (a software-pipelined main loop), for every autotune config."""
    rep, _ = compile_report
    fused = [r for r in rep["rows"] if r["kernel"] == "_tied_lora_fwd_kernel" and r["dtype"] == "bfloat16"]
    assert fused
    for r in fused:
        assert r["wgmma"] > 0, r["config"]
        assert r["async_copies"] > 0, r["config"]
        if r["num_stages"] >= 3 and r["config"]["BLOCK_K"] == 64:  # >= 2 stages of x and W tiles in flight
            bm, bn, bk = r["config"]["BLOCK_M"], r["config"]["BLOCK_N"], r["config"]["BLOCK_K"]
            assert r["shared_bytes"] >= 2 * 2 * bk * (bm + bn), r["config"]
