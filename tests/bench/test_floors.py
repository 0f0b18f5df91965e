"""The byte / FLOP model of the redesigned op (bench/floors.py), the NOTES.md table built from it,
and each profiled Triton kernel's ratio to its bandwidth floor."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.floors import TRITON_KERNELS, design_costs, kernel_floors, limit_costs, notes_table, spec_bandwidth  # noqa: E402
from bench.profiling import kernel_floor_rows, summarize  # noqa: E402
from bench.run import add_kernel_floors  # noqa: E402

M, K, N = 8192, 4096, 4096


def test_notes_carry_the_generated_tables():
    notes = (ROOT / "bench" / "NOTES.md").read_text()
    for table in notes_table().split("\n\n"):
        assert table.strip() in notes, "bench/NOTES.md is out of step with `python -m bench.floors`"


def test_target_case_bytes_and_launches():
    costs = {(k.phase, k.name): k for k in design_costs(M, K, N, 16, "fwd_bwd")}
    term = costs[("fwd", "_adapter_term_kernel")]
    # x read + L written (2 x 67.1 MB), h written (0.5 MB), A, B, u, v, bias
    assert term.bytes == 2 * M * K + 2 * M * N + 4 * M * 16 + 4 * (16 * K + N * 16 + 16 + N) + 2 * N
    # tl6: dA's pass over x and g, and the pass over G with h (and g again for du), one launch
    assert costs[("bwd", "_grad_factors_kernel")].bytes == (2 * M * K + 4 * M * 16 + 4 * 16 * K
                                                           + 2 * M * N + 4 * (N * 16 + N) + 2 * 4 * M * 16)
    assert costs[("fwd", "addmm_ (x W^T + L)")].flops == 2 * M * N * K
    # inference does not store h
    fwd = {k.name: k for k in design_costs(M, K, N, 16, "fwd")}
    assert fwd["_adapter_term_kernel"].bytes == term.bytes - 4 * M * 16
    assert [k.name for k in limit_costs(M, K, N, "fwd_bwd")] == ["addmm (x W^T + b)", "mm (G W)"]
    # vera trains u, v only: no pass over x for dA; lora trains no u: no du
    vera = {k.name: k for k in design_costs(M, K, N, 16, "fwd_bwd", train=("u", "v"))}
    lora = {k.name: k for k in design_costs(M, K, N, 16, "fwd_bwd", train=("A", "B"), has_u=False, has_v=False)}
    assert vera["_grad_factors_kernel"].bytes == 2 * M * N + 4 * (N * 16 + N) + 2 * 4 * M * 16  # G, B, v, h, g
    assert lora["_grad_factors_kernel"].flops == 2 * M * 16 * K + 2 * M * N * 16  # dA and P, no du work
    frozen = {k.name for k in design_costs(M, K, N, 16, "fwd_bwd", train=())}
    assert "_grad_factors_kernel" not in frozen and "_grad_finish_kernel" not in frozen
    dora = {k.name for k in design_costs(M, K, N, 16, "fwd_bwd", row_scale="train")}
    assert {"_row_scale_grad_kernel", "addcmul (b + y c)"} <= dora and set(TRITON_KERNELS) <= dora
    # DoRA's norm: a bf16 W's fp32 copy (read 2, write 4), W + s B A added into it (read and write
    # 4), its row norms (read 4); Simple DoRA's: the copy and the norms. 18 and 10 bytes per element
    norms = {m: sum(k.bytes for k in design_costs(M, K, N, 16, "fwd", row_scale="train", magnitude=m)
                    if k.name in ("row norm", "addmm_ (W + s B A, fp32)")) for m in ("dora", "simple_dora")}
    assert norms["simple_dora"] == 10 * N * K + 4 * N and norms["dora"] == 18 * N * K + 4 * N + 4 * 16 * (K + N)


def test_floor_per_kernel_at_the_h200_bandwidth():
    f = kernel_floors(M, K, N, 16, "fwd_bwd", "tl6", 4.8e12)
    assert set(f) == {"_adapter_term_kernel", "_grad_factors_kernel", "_grad_finish_kernel"}
    assert f["_adapter_term_kernel"]["calls"] == 2  # forward on x, backward on G
    assert f["_adapter_term_kernel"]["floor_us"] == pytest.approx(2 * 28.2, abs=0.2)
    assert f["_grad_factors_kernel"]["floor_us"] == pytest.approx(14.1 + 14.3, abs=0.2)  # x once, G once


def test_spec_bandwidth_by_device_name():
    assert spec_bandwidth("NVIDIA H200") == 4.8e12
    assert spec_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert spec_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert spec_bandwidth("CPU (x86_64, 2 threads)") is None and spec_bandwidth(None) is None


def test_kernel_ratio_to_its_floor_from_a_profile():
    profile = dict(kernel_us_per_step={"_adapter_term_kernel": 70.0, "_grad_factors_kernel": 40.0,
                                       "sm90_xmma_gemm_bf16bf16": 700.0})
    floors = kernel_floors(M, K, N, 16, "fwd_bwd", "lora", 4.8e12)
    rows = {r["kernel"]: r for r in kernel_floor_rows(profile, floors, dict(spec=4.8e12, copy=4.3e12))}
    term = rows["_adapter_term_kernel"]
    assert term["ratio_spec"] == pytest.approx(70.0 / (floors["_adapter_term_kernel"]["bytes"] / 4.8e12 * 1e6))
    assert term["ratio_copy"] < term["ratio_spec"] and term["matched"] == ["_adapter_term_kernel"]
    assert rows["_grad_finish_kernel"]["us_per_step"] is None and rows["_grad_finish_kernel"]["ratio_spec"] is None
    # on a CPU there is neither a kernel time nor a data-sheet bandwidth: rows without ratios
    rec = dict(impl="ours", op="fwd_bwd", M=M, K=K, N=N, rank=16, preset="tl6", profile=dict(top=[]))
    add_kernel_floors([rec], dict(spec_bandwidth=None, copy_bandwidth=None))
    assert {r["kernel"] for r in rec["kernel_floors"]} == set(TRITON_KERNELS) - {"_row_scale_grad_kernel"}
    assert all(r["ratio_spec"] is None for r in rec["kernel_floors"])


def test_summarize_counts_kernels_launches_and_busy_time():
    """A GPU profile summary from hand-made events: two steps, overlapping kernels counted once in the busy time."""
    import torch

    class Range:
        def __init__(self, start, end):
            self.start, self.end = start, end

        def elapsed_us(self):
            return self.end - self.start

    class Ev:
        def __init__(self, name, dev, start, end, user=False):
            self.name, self.time_range, self.is_user_annotation = name, Range(start, end), user
            self.device_type = torch.autograd.DeviceType.CUDA if dev else torch.autograd.DeviceType.CPU
            self.self_cpu_time_total = end - start

    evs = [Ev("ProfilerStep#1", False, 0, 100, True), Ev("cudaLaunchKernel", False, 1, 2),
           Ev("cuLaunchKernel", False, 3, 4), Ev("gemm", True, 10, 50), Ev("_adapter_term_kernel", True, 40, 60), Ev("Memcpy DtoD", True, 60, 61),
           Ev("ProfilerStep#1", True, 0, 100, True),
           Ev("gemm", True, 110, 150), Ev("cudaLaunchKernel", False, 101, 102)]
    s = summarize(evs, steps=2, device="cuda")
    assert s["kernels_per_step"] == 1.5 and s["launch_calls_per_step"] == 1.5
    assert s["gpu_busy_ms_per_step"] == pytest.approx((50 + 1 + 40) / 2 / 1e3)  # [10, 60) + [60, 61) + [110, 150)
    assert s["top"][0]["name"] == "gemm" and s["top"][0]["calls_per_step"] == 1 and s["top"][0]["us_per_call"] == 40
    assert s["kernel_us_per_step"]["_adapter_term_kernel"] == 10 and s["cpu_ms_per_step_profiled"] == 0.1
