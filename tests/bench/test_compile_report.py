"""``bench/compile_report.py``: every kernel of a training step compiles for sm_90 (Hopper) without a GPU,
its dots on tensor cores, with no spills.

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
#: Every kernel one training step launches (row scale included), a serving bank's two and the
#: one-launch decode kernel; the GEMMs are cuBLAS's.
KERNELS = {"_adapter_term_kernel", "_grad_factors_kernel", "_grad_finish_kernel", "_row_scale_grad_kernel",
           "_bank_term_kernel", "_bank_segment_term_kernel", "_decode_linear_kernel"}


def _compile_for_hopper(*args: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` without the interpreter (the compile-only driver compiles the real kernels);
    skips where this triton cannot compile for sm_90."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its CUDA backend")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 6):
        pytest.skip("the compile report drives triton's JIT internals as of triton 3.6-3.9")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    proc = _compile_for_hopper("bench.compile_report", "--quick", "--arch", "90", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "compile_report.json").read_text()), (out / "compile_report.md").read_text(), proc.stderr


def test_every_kernel_compiles_for_hopper(compile_report):
    rep, md, _ = compile_report
    assert rep["arch"] == 90 and rep["triton"]
    assert {r["kernel"] for r in rep["rows"]} == KERNELS
    assert rep["ptxas"]["path"] and rep["ptxas"]["version"]
    for r in rep["rows"]:
        assert r["ptxas_error"] is None, r["ptxas_error"]
        assert r["registers"] is not None and 0 < r["registers"] <= 255, r  # ptxas -v was read
        assert r["fits_smem"], f"{r['kernel']} {r['config']}: {r['shared_bytes']} B of shared memory"
    assert md.count("\n| train-") + md.count("\n| serve-") + md.count("\n| fused-decode-") == len(rep["rows"])


def test_every_launch_sets_fp_fusion(compile_report):
    """Every launch asks for FP fusion (FMA), the default before triton 3.10 that the kernels are
    checked with: 3.10 turns the default off, and 3.9 warns at the first compile that does not say."""
    _, _, stderr = compile_report
    assert "TRITON_DEFAULT_FP_FUSION" not in stderr


def test_nothing_spills(compile_report):
    """No kernel spills registers, at r = 128 included (the [BR, BN] tile of the up projection
    shrinks with the rank for that)."""
    rep, _, _ = compile_report
    assert any(r["rank"] == 128 for r in rep["rows"])
    spilling = [(r["case"], r["kernel"], r["config"], r["spill_store_bytes"]) for r in rep["rows"]
                if r["spill_store_bytes"]]
    assert not spilling


def test_bf16_rank_r_dots_run_on_tensor_cores(compile_report):
    """The bf16 dot over the activations runs on tensor cores (wgmma or mma.sync): adapter_term's and
    the serving banks'."""
    rep, _, _ = compile_report
    term = [r for r in rep["rows"] if r["kernel"] in ("_adapter_term_kernel", "_bank_term_kernel",
                                                       "_bank_segment_term_kernel") and r["dtype"] == "bfloat16"]
    assert term
    for r in term:
        assert r["wgmma"] + r["mma"] > 0, r["config"]


def test_every_tile_sweep_configuration_fits_hopper():
    """Each configuration ``bench.tile_sweep`` times on a GPU compiles for sm_90 within its 227 KiB of
    shared memory: one that does not costs a session's device time and says nothing (two r = 128
    configurations once needed 240 KiB)."""
    proc = _compile_for_hopper("bench.tile_sweep", "--compile-only", "90")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "; 0 do not fit or compile" in proc.stdout and "r=128" in proc.stdout
