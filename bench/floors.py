"""The floor of every launch of the redesigned op (issue 12): bytes, FLOPs, launches, predicted time.

The design: cuBLAS does the two big GEMMs, with the rank-r term entering through the GEMM's beta = 1
epilogue (``L.addmm_(x, W.T)``, ``Ldx.addmm_(G, W)``); Triton does only the rank-r work, in
bandwidth-bound passes:

- forward: ``_adapter_term_kernel`` reads x once, writes h = dropout(x) A^T (fp32, (M, r), kept for
  backward) and L = s ((h u)(B v)^T) + b (M, N) in x's dtype; cuBLAS ``L.addmm_(x, W.T)``.
  With a row scale c (DoRA): L without bias, y = L.addmm_(x, W.T), out = addcmul(b, y, c).
- backward: (with c: ``_row_scale_grad_kernel``, one pass over G and y: G c, dc); then
  ``_adapter_term_kernel`` reads G once: g = G (B v) (fp32 (M, r)), Ldx = s (g u) A (M, K);
  cuBLAS ``Ldx.addmm_(G, W)`` = dX; ``_grad_factors_kernel``: in one launch, one pass over x for
  row-split partials of dA and one over G (with h, and g for du) for those of P = G^T (s h u) and
  du; ``_grad_finish_kernel`` sums them into dA, dB, dv, du.

Bytes are compulsory traffic (each operand read once, each result written once; split-row partial
sums are overhead the kernel has to earn inside its 1.3x allowance). ``python -m bench.floors``
prints the table that ``bench/NOTES.md`` carries; the benchmark divides each Triton kernel's
profiled GPU time by :func:`design_costs`' bytes over the device's bandwidth.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

#: Vendor HBM bandwidth, bytes/s (data sheets): the denominator of a kernel's bandwidth floor.
SPEC_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12)]
#: GEMM rates used for the predictions, FLOP/s: H200 measured (cuBLAS 8192 x 4096 x 4096 bf16 in
#: 344.7 us, bench/results/2026-11-30-H200-02cdd68/FINDINGS.md); H100 a realistic cuBLAS bf16 figure (~70 % of 989).
GEMM_RATE = {"H200": 797e12, "H100": 700e12}
#: Dense bf16 tensor peak (both chips): the compute side of a Triton kernel's floor.
TENSOR_PEAK = 989e12
#: The Triton kernels the redesigned op launches (the names the profiler reports).
TRITON_KERNELS = ("_adapter_term_kernel", "_grad_factors_kernel", "_grad_finish_kernel", "_row_scale_grad_kernel")


def spec_bandwidth(device_name: Optional[str]) -> Optional[float]:
    """The data-sheet bandwidth of a device named like ``torch.cuda.get_device_name()``, or None."""
    for key, bw in SPEC_BANDWIDTH:
        if device_name and key.lower() in device_name.lower():
            return bw
    return None


@dataclass
class Launch:
    """One kernel (or library call) of the op, per step: ``calls`` launches moving ``bytes`` and doing ``flops``."""

    name: str
    phase: str  # "fwd" or "bwd"
    kind: str  # "triton", "cublas" or "torch"
    bytes: float
    flops: float
    calls: int = 1

    def floor_s(self, bandwidth: float, gemm_rate: float) -> float:
        """Bytes at the bandwidth or FLOPs at the rate, whichever is slower (GEMMs: the rate is cuBLAS's)."""
        rate = gemm_rate if self.kind == "cublas" else TENSOR_PEAK
        return max(self.bytes / bandwidth, self.flops / rate)


def design_costs(M: int, K: int, N: int, r: int, op: str, *, train=("A", "B", "u", "v"), has_u: bool = True,
                 has_v: bool = True, bias: bool = True, row_scale: Optional[str] = None, magnitude: str = "dora",
                 act: int = 2, adapter: int = 4) -> list[Launch]:
    """Every launch of one adapted layer call: ``op`` "fwd" (inference: h not stored) or "fwd_bwd".

    train: the adapter tensors that train (lora: A, B; vera: u, v; tl6: all four). row_scale: None,
    "frozen" or "train" (DoRA's c), and ``magnitude`` ("dora" or "simple_dora") how c is formed each
    call. act / adapter: bytes per element of x, W, G (bf16: 2) and of
    A, B, u, v, h, g (fp32: 4).
    """
    E, F = act, adapter
    grad = op == "fwd_bwd"
    small = F * (r * K + N * r + (r if has_u else 0) + (N if has_v else 0))  # A, B, u, v
    b = E * N if bias else 0
    out: list[Launch] = []
    # forward
    out.append(Launch("_adapter_term_kernel", "fwd", "triton",
                      E * M * K + small + (b if row_scale is None else 0) + E * M * N + (F * M * r if grad else 0),
                      2 * M * r * (K + N)))
    out.append(Launch("addmm_ (x W^T + L)", "fwd", "cublas", E * (M * K + N * K + 2 * M * N), 2 * M * N * K))
    if row_scale is not None:
        # c = m / ||W + D||_row per call (reference.merged_row_norm): W's fp32 copy (unrounded norms,
        # DoRA's identity at init), W + s B A added into it by one addmm_ (beta = 1; DoRA only), then
        # the row norms (Simple DoRA: ||W||_row of the copy)
        cast = (E + 4) * N * K if E < 4 else 0
        if magnitude == "dora":
            out.append(Launch("addmm_ (W + s B A, fp32)", "fwd", "cublas", cast + 8 * N * K + F * (N * r + r * K),
                              2 * N * K * r))
        out.append(Launch("row norm", "fwd", "torch", (0 if magnitude == "dora" else cast) + 4 * N * K + F * N,
                          2 * N * K))
        out.append(Launch("addcmul (b + y c)", "fwd", "torch", E * 2 * M * N + b + F * N, 2 * M * N))
    if not grad:
        return out
    # backward
    if row_scale is not None:
        reads_y = row_scale == "train"
        out.append(Launch("_row_scale_grad_kernel", "bwd", "triton", E * M * N * (3 if reads_y else 2) + F * N,
                          (3 if reads_y else 1) * M * N))
    out.append(Launch("_adapter_term_kernel", "bwd", "triton", E * M * N + small + F * M * r + E * M * K,
                      2 * M * r * (K + N)))
    out.append(Launch("addmm_ (G W + Ldx)", "bwd", "cublas", E * (M * N + N * K + 2 * M * K), 2 * M * N * K))
    need_a, need_p, need_du = "A" in train, "B" in train or "v" in train, "u" in train
    if need_a or need_p or need_du:
        # dA's pass over x (with g) and the pass over G (with h, and g for du), one launch
        down = (E * M * K + F * M * r + F * r * K, 2 * M * r * K) if need_a else (0, 0)
        up = ((E * M * N + F * (N * r + N) if need_p else 0) + F * M * r * (2 if need_du else 1),
              (2 * M * N * r if need_p else 0) + (2 * M * r if need_du else 0)) if need_p or need_du else (0, 0)
        out.append(Launch("_grad_factors_kernel", "bwd", "triton", down[0] + up[0], down[1] + up[1]))
        # the partials (a few splits x (N + K) x r fp32) summed and the gradients written: a launch
        out.append(Launch("_grad_finish_kernel", "bwd", "triton",
                          F * 3 * ((N * r + N) if need_p else 0) + F * 3 * (r * K if need_a else 0) + F * r,
                          2 * (N * r if need_p else 0) + 2 * (r * K if need_a else 0)))
    return out


def limit_costs(M: int, K: int, N: int, op: str, act: int = 2) -> list[Launch]:
    """The frozen base layer alone: ``F.linear`` forward, and dX = G W for fwd_bwd."""
    E = act
    out = [Launch("addmm (x W^T + b)", "fwd", "cublas", E * (M * K + N * K + M * N + N), 2 * M * N * K)]
    if op == "fwd_bwd":
        out.append(Launch("mm (G W)", "bwd", "cublas", E * (M * N + N * K + M * K), 2 * M * N * K))
    return out


PRESET_TRAIN = {"lora": dict(train=("A", "B"), has_u=False, has_v=False),
                "vera": dict(train=("u", "v"), has_u=True, has_v=True),
                "tl6": dict(train=("A", "B", "u", "v"), has_u=True, has_v=True)}


def kernel_floors(M: int, K: int, N: int, r: int, op: str, preset: str, bandwidth: float) -> dict[str, dict]:
    """Per Triton kernel name: launches, compulsory bytes and the bandwidth floor in us, summed over a step."""
    out: dict[str, dict] = {}
    for k in design_costs(M, K, N, r, op, **PRESET_TRAIN[preset]):
        if k.kind != "triton":
            continue
        d = out.setdefault(k.name, dict(calls=0, bytes=0.0, floor_us=0.0))
        d["calls"] += k.calls
        d["bytes"] += k.bytes
        d["floor_us"] += max(k.bytes / bandwidth, k.flops / TENSOR_PEAK) * 1e6
    return out


def _sum_us(launches: list[Launch], bw: float, rate: float, kinds=("triton", "cublas", "torch")) -> float:
    return sum(k.floor_s(bw, rate) * k.calls for k in launches if k.kind in kinds) * 1e6


def notes_table(M: int = 8192, K: int = 4096, N: int = 4096, preset: str = "tl6") -> str:
    """The tables of bench/NOTES.md: every launch of a tl6 training step (every adapter tensor
    trains: the most launches), then the predicted ratios per GPU, rank and preset."""
    gpus = (("H100", 3.35e12), ("H200", 4.8e12))
    head = " | ".join(f"r={r}: MB | GFLOP | H100 us | H200 us" for r in (16, 128))
    out = [f"| phase | launch | kind | calls | {head} |", "|---|---|---|---:|" + "---:|" * 8]
    per_r = {r: design_costs(M, K, N, r, "fwd_bwd", **PRESET_TRAIN[preset]) for r in (16, 128)}
    for i, k in enumerate(per_r[16]):
        cells = []
        for r in (16, 128):
            q = per_r[r][i]
            cells.append(f"{q.bytes / 1e6:.1f} | {q.flops / 1e9:.2f} | "
                         + " | ".join(f"{q.floor_s(bw, GEMM_RATE[g]) * 1e6 * q.calls:.1f}" for g, bw in gpus))
        out.append(f"| {k.phase} | {k.name} | {k.kind} | {k.calls} | " + " | ".join(cells) + " |")
    out += ["", "| GPU | r | preset | limit fwd / fwd+bwd us | fwd: extra us, ratio at floor, at 1.3x Triton floor "
            "| fwd+bwd: extra us, ratio at floor, at 1.3x | launches fwd / fwd+bwd (limit: 1 / 2) |",
            "|---|---:|---|---|---|---|---|"]
    for g, bw in gpus:
        rate = GEMM_RATE[g]
        for r in (16, 128):
            for p in ("lora", "vera", "tl6"):
                cells = []
                lim = {}
                n = {}
                for op in ("fwd", "fwd_bwd"):
                    ks = design_costs(M, K, N, r, op, **PRESET_TRAIN[p])
                    lim[op] = _sum_us(limit_costs(M, K, N, op), bw, rate)
                    tot = _sum_us(ks, bw, rate)
                    tri = _sum_us(ks, bw, rate, ("triton",))
                    n[op] = sum(k.calls for k in ks)
                    cells.append(f"+{tot - lim[op]:.0f}, {tot / lim[op]:.3f}, {(tot + 0.3 * tri) / lim[op]:.3f}")
                out.append(f"| {g} | {r} | {p} | {lim['fwd']:.0f} / {lim['fwd_bwd']:.0f} | " + " | ".join(cells)
                           + f" | {n['fwd']} / {n['fwd_bwd']} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:4]] if len(sys.argv) >= 4 else []
    print(notes_table(*args), end="")
