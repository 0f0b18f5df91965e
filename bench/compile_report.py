"""Compile report: the op's Triton kernels compiled for a GPU architecture, on a machine without a GPU.

    python -m bench.compile_report [--arch 90] [--out DIR] [--quick]

The real forward and backward implementations run on ``meta`` tensors (shapes and strides, no
memory) against a stand-in driver that reports a CUDA target of ``--arch``. Every kernel launch
they make is compiled, never run, with the JIT's own argument specialization (so alignment and
unit strides are seen as on a GPU; cuBLAS calls on meta tensors do nothing); ``ptxas -v``
(the ptxas Triton itself uses for the arch, run again on the kernel's PTX with default options;
Triton's own call adds a few, so its cubin can differ by a few registers or stack bytes) then
gives registers and spill bytes per thread. For each (case, kernel, config) the report has registers, spill
bytes, shared memory against the architecture's per-block limit, the tensor-core instructions
in the PTX (``wgmma`` on Hopper, ``mma`` otherwise) and the async copies that show a pipelined
main loop. It says what the compiler made of each kernel; it is not a timing.

Writes ``compile_report.json`` (triton version, arch, ptxas, command, every row) and
``compile_report.md``. Run it without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
Uses triton's JIT internals (driver switch, ``JITFunction.run(warmup=True)``): checked on triton
3.6 and 3.9.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

#: Shared memory per block (bytes) a kernel may use, by compute capability (CUDA's opt-in maximum).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
#: Streaming multiprocessors assumed for launch-size decisions (H100 SXM).
SM_COUNT = 132


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One layer's op: (M, K) x (K, N) at rank r; ``preset`` fixes what trains and which vectors exist."""

    name: str
    M: int
    K: int
    N: int
    r: int
    preset: str  # lora | vera | tl6 | simple_dora
    dtype: torch.dtype = torch.bfloat16
    tf32: bool = False  # fp32 only: torch.set_float32_matmul_precision("high")
    dropout: float = 0.0  # adapter-input dropout (the Philox mask in the forward and dA kernels)


#: What trains (and exists) per preset, as the op sees it: x always trains (a middle layer).
PRESET_TENSORS = {
    "lora": dict(train=("A", "B"), u=False, v=False, c=False),
    "vera": dict(train=("u", "v"), u=True, v=True, c=False),
    "tl6": dict(train=("A", "B", "u", "v"), u=True, v=True, c=False),
    "simple_dora": dict(train=("A", "B", "c"), u=False, v=False, c=True),
}

CASES = [
    CompileCase("train-r16-tl6", 8192, 4096, 4096, 16, "tl6"),
    CompileCase("train-r16-lora", 8192, 4096, 4096, 16, "lora"),
    CompileCase("train-r64-tl6", 8192, 4096, 4096, 64, "tl6"),
    CompileCase("train-r128-tl6", 8192, 4096, 4096, 128, "tl6"),
    CompileCase("train-r16-vera", 8192, 4096, 4096, 16, "vera"),
    CompileCase("train-r16-simple_dora", 8192, 4096, 4096, 16, "simple_dora"),
    CompileCase("decode-r16-tl6", 16, 4096, 4096, 16, "tl6"),
    CompileCase("train-r16-tl6-dropout", 8192, 4096, 4096, 16, "tl6", dropout=0.1),
    CompileCase("train-r16-tl6-fp16", 8192, 4096, 4096, 16, "tl6", torch.float16),
    CompileCase("train-r16-tl6-fp32", 2048, 4096, 4096, 16, "tl6", torch.float32),
    CompileCase("train-r16-tl6-tf32", 2048, 4096, 4096, 16, "tl6", torch.float32, tf32=True),
]
QUICK_CASES = [c for c in CASES if c.name in ("train-r16-tl6", "train-r128-tl6", "train-r16-simple_dora")]


@dataclasses.dataclass(frozen=True)
class ServeCase:
    """A mixed batch of a serving bank (``tiedlora_kernels.serving``): ``sequences`` x ``T`` rows over
    ``slots`` adapters of rank r; ``per_slot``: each adapter its own A and B (the segment kernel),
    else shared ones (the one-launch kernel)."""

    name: str
    sequences: int
    T: int
    K: int
    N: int
    r: int
    slots: int
    per_slot: bool
    dtype: torch.dtype = torch.bfloat16


SERVE_CASES = [
    ServeCase("serve-prefill-shared-r16", 256, 128, 2048, 2048, 16, 1024, False),
    ServeCase("serve-decode-shared-r16", 256, 1, 2048, 2048, 16, 1024, False),
    ServeCase("serve-prefill-per-slot-r16", 256, 128, 2048, 2048, 16, 256, True),
    ServeCase("serve-decode-per-slot-r16", 256, 1, 2048, 2048, 16, 256, True),
]
QUICK_SERVE_CASES = [c for c in SERVE_CASES if c.name in ("serve-decode-shared-r16", "serve-decode-per-slot-r16")]


@dataclasses.dataclass(frozen=True)
class FusedDecodeCase:
    """The one-launch decode kernel (``ops/decode_linear.py``) for M rows at rank r, every vector present."""

    name: str
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype = torch.bfloat16


DECODE_CASES = [FusedDecodeCase("fused-decode-m1-r16", 1, 4096, 4096, 16),
                FusedDecodeCase("fused-decode-m16-r16", 16, 4096, 4096, 16),
                FusedDecodeCase("fused-decode-m1-r128", 1, 4096, 4096, 128)]


class _CompileOnlyDriver:
    """Stands in for triton's CUDA driver: reports a target, owns no device. Only what the JIT
    asks before it compiles is provided; a launch would fail (and none is made)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_only(arch: int):
    """Within this context, every Triton launch of the op compiles for ``arch`` and records
    ``(kernel name, config kwargs, CompiledKernel)`` instead of running; yields that record list."""
    from triton.runtime.driver import driver as triton_driver
    from triton.runtime.jit import JITFunction

    from tiedlora_kernels.ops import common

    records: list = []
    original_run = JITFunction.run
    original_programs = common.target_programs

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        config = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        records.append((self.fn.__name__, config, kernel))
        return kernel

    previous = getattr(triton_driver, "_active", None)  # None on a machine without a GPU driver
    triton_driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    common.target_programs = lambda device: 2 * SM_COUNT
    try:
        yield records
    finally:
        JITFunction.run = original_run
        common.target_programs = original_programs
        triton_driver.set_active(previous)


def _meta_inputs(case: CompileCase) -> dict:
    spec = PRESET_TENSORS[case.preset]
    meta = dict(device="meta")
    adapter = torch.float32  # adapters default to fp32
    return dict(
        x=torch.empty(case.M, case.K, dtype=case.dtype, **meta),
        weight=torch.empty(case.N, case.K, dtype=case.dtype, **meta),
        bias=torch.empty(case.N, dtype=case.dtype, **meta),
        A=torch.empty(case.r, case.K, dtype=adapter, **meta), B=torch.empty(case.N, case.r, dtype=adapter, **meta),
        u=torch.empty(case.r, dtype=adapter, **meta) if spec["u"] else None,
        v=torch.empty(case.N, dtype=adapter, **meta) if spec["v"] else None,
        c=torch.empty(case.N, dtype=adapter, **meta) if spec["c"] else None,
        G=torch.empty(case.M, case.N, dtype=case.dtype, **meta),
    )


def _launches(case: CompileCase, arch: int) -> list[dict]:
    """Compile every kernel launch of one training step (forward + backward) of ``case``."""
    from tiedlora_kernels.ops import tied_lora as op

    spec = PRESET_TENSORS[case.preset]
    t = _meta_inputs(case)
    train = set(spec["train"])
    store_h = bool(train & {"B", "u", "v"})
    needs = [True, "A" in train, "B" in train, "u" in train, "v" in train, "c" in train, False]
    seed = torch.empty(1, dtype=torch.int64, device="meta") if case.dropout else None
    rows = []
    previous_precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if case.tf32 else "highest")
        for phase in ("fwd", "bwd"):
            with compile_only(arch) as records:
                out, h, y = op._forward_impl(t["x"], t["weight"], None, t["bias"], t["A"], t["B"], t["u"], t["v"], t["c"],
                                             seed, 1.0, case.dropout, store_h, "c" in train)
                if phase == "bwd":
                    records.clear()
                    op._backward_impl(t["G"], t["x"], t["weight"], t["A"], t["B"], t["u"], t["v"], t["c"],
                                      h if store_h else None, y if "c" in train else None, seed, 1.0, case.dropout,
                                      needs)
            rows += _rows(records, arch, case=case.name, M=case.M, K=case.K, N=case.N, rank=case.r,
                          preset=case.preset, dtype=str(case.dtype).removeprefix("torch.") + ("+tf32" if case.tf32 else ""),
                          dropout=case.dropout, phase=phase)
    finally:
        torch.set_float32_matmul_precision(previous_precision)
    return rows


def _serve_launches(case: ServeCase, arch: int) -> list[dict]:
    """Compile the mixed-batch kernel of ``case`` (the adapters' rank-r term; the base GEMM is cuBLAS's)."""
    from tiedlora_kernels.ops.bank_segment_term import bank_segment_term, segment_plan
    from tiedlora_kernels.ops.bank_term import bank_term

    meta, M = dict(device="meta"), case.sequences * case.T
    slot = (case.slots,) if case.per_slot else ()
    x = torch.empty(M, case.K, dtype=case.dtype, **meta)
    A = torch.empty(*slot, case.r, case.K, dtype=case.dtype, **meta)
    B = torch.empty(*slot, case.N, case.r, dtype=case.dtype, **meta)
    U = torch.empty(case.slots, case.r, dtype=torch.float32, **meta)
    V = torch.empty(case.slots, case.N, dtype=torch.float32, **meta)
    bias = torch.empty(case.N, dtype=case.dtype, **meta)
    ids = torch.arange(case.sequences) % (case.slots + 1) - 1  # every slot kind, base-only rows too
    with compile_only(arch) as records:
        if case.per_slot:
            bank_segment_term(x, A, B, U, V, segment_plan(ids, case.T, torch.device("meta")), bias)
        else:
            bank_term(x, A, B, U, V, ids.to(torch.int32).to("meta"), case.T, bias)
    return _rows(records, arch, case=case.name, M=M, K=case.K, N=case.N, rank=case.r, preset=f"{case.slots} slots",
                 dtype=str(case.dtype).removeprefix("torch."), dropout=0.0, phase="serve")


def _fused_decode_launches(case: FusedDecodeCase, arch: int) -> list[dict]:
    """Compile the one-launch decode kernel of ``case`` (row scale and every vector present)."""
    from tiedlora_kernels.ops.decode_linear import decode_linear

    meta = dict(device="meta")
    e = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, **meta)  # noqa: E731
    with compile_only(arch) as records:
        decode_linear(e(case.M, case.K, dtype=case.dtype), e(case.N, case.K, dtype=case.dtype),
                      e(case.N, dtype=case.dtype), e(case.r, case.K), e(case.N, case.r), e(case.r), e(case.N),
                      e(case.N), 1.0)
    return _rows(records, arch, case=case.name, M=case.M, K=case.K, N=case.N, rank=case.r, preset="tl6 + row scale",
                 dtype=str(case.dtype).removeprefix("torch."), dropout=0.0, phase="fwd")


def _rows(records: list, arch: int, **fields) -> list[dict]:
    """One report row per compiled kernel of ``records`` (``compile_only``'s), with the case's ``fields``."""
    return [dict(fields, kernel=name, config=config, **_inspect(kernel, arch)) for name, config, kernel in records]


def _ptxas(arch: int) -> Optional[str]:
    """The ptxas Triton compiles with for ``arch`` (None if it cannot be found)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):  # a triton without get_ptxas(arch): the toolkit's
        return shutil.which("ptxas")


def _inspect(kernel, arch: int) -> dict:
    """Registers and spills (ptxas -v on the kernel's PTX), shared memory and instruction mix."""
    ptx = kernel.asm["ptx"]
    info = dict(shared_bytes=int(kernel.metadata.shared), smem_limit=SMEM_LIMIT.get(arch),
                num_warps=int(kernel.metadata.num_warps), num_stages=int(kernel.metadata.num_stages),
                wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
                # copies into shared memory (cp.async.ca/cg, TMA bulk tensor), not the commit/wait markers
                async_copies=len(re.findall(r"\bcp\.async\.(?:ca|cg)\.", ptx))
                + len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
                registers=None, spill_store_bytes=None, spill_load_bytes=None, ptxas_error=None)
    info["fits_smem"] = info["smem_limit"] is None or info["shared_bytes"] <= info["smem_limit"]
    ptxas = _ptxas(arch)
    if ptxas is None:
        return info
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        info["ptxas_error"] = log.strip()[-500:]
        return info
    if (m := re.search(r"Used (\d+) registers", log)):
        info["registers"] = int(m.group(1))
    if (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)):
        info["spill_store_bytes"], info["spill_load_bytes"] = int(m.group(1)), int(m.group(2))
    return info


def report(cases: list, arch: int, progress=True) -> dict:
    """Every kernel of ``cases`` (``CompileCase``: a training step; ``ServeCase``: a mixed batch;
    ``FusedDecodeCase``: the one-launch decode kernel)."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("bench.compile_report compiles kernels: unset TRITON_INTERPRET first")
    rows, start = [], time.time()
    for i, case in enumerate(cases):
        t0 = time.time()
        launches = {ServeCase: _serve_launches, FusedDecodeCase: _fused_decode_launches}.get(type(case), _launches)
        rows.extend(launches(case, arch))
        if progress:
            print(f"[{i + 1}/{len(cases)}] {case.name}: {time.time() - t0:.1f} s", file=sys.stderr)
    ptxas = _ptxas(arch)
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:] \
        if ptxas else []
    return dict(kind="compile-report", arch=arch, triton=triton.__version__, torch=torch.__version__,
                ptxas=dict(path=ptxas, version=version[0] if version else None),
                date=datetime.date.today().isoformat(), command=shlex.join([sys.executable, "-m", "bench.compile_report"]
                                                                           + sys.argv[1:]),
                seconds=round(time.time() - start, 1), rows=rows)


def to_markdown(rep: dict) -> str:
    head = (f"# Compile report: sm_{rep['arch']}, triton {rep['triton']} ({rep['date']})\n\n"
            f"`{rep['command']}`. Compiled, not run: registers and spills from ptxas, shared memory "
            f"against the {rep['rows'][0]['smem_limit'] if rep['rows'] else '?'}-byte limit. The GEMMs are "
            "cuBLAS's and not listed; phase `serve` is a serving bank's mixed batch, `fused-decode-*` the one-launch "
            "decode kernel.\n\n"
            "| case | phase | kernel | tiles (M/N/K/R) warps x stages | regs | spill st+ld (B/thread) | "
            "smem (KiB) | "
            "wgmma/mma | async copies |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rep["rows"]:
        c = r["config"]
        # the gradient kernel's two roles: rows per tile of each (dA's / P's), one column block
        rows = c.get("BLOCK_M", f"{c['BLOCK_M_A']},{c['BLOCK_M_P']}" if "BLOCK_M_A" in c else "-")
        tiles = "/".join(str(x) for x in (rows, c.get("BLOCK_N", c.get("BLOCK_COLS", "-")),
                                           c.get("BLOCK_K", c.get("BLOCK_COLS", "-")), c.get("BLOCK_R", "-")))
        spills = "?" if r["spill_store_bytes"] is None else r["spill_store_bytes"] + r["spill_load_bytes"]
        smem = f"{r['shared_bytes'] / 1024:.0f}" + ("" if r["fits_smem"] else " (too big)")
        lines.append(f"| {r['case']} | {r['phase']} | {r['kernel'].lstrip('_')} | {tiles} "
                     f"{r['num_warps']}x{r['num_stages']} | {r['registers']} | {spills} | {smem} | "
                     f"{r['wgmma']}/{r['mma']} | {r['async_copies']} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/compile/sm<arch>-triton<version>")
    parser.add_argument("--quick", action="store_true", help="a few cases only (the CI check)")
    args = parser.parse_args(argv)
    rep = report(QUICK_CASES + QUICK_SERVE_CASES + DECODE_CASES[:1] if args.quick else CASES + SERVE_CASES + DECODE_CASES,
                 args.arch)
    if args.out is None:
        args.out = Path("bench/results/compile") / f"sm{args.arch}-triton{'.'.join(rep['triton'].split('.')[:2])}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_report.json").write_text(json.dumps(rep, indent=1))
    (args.out / "compile_report.md").write_text(to_markdown(rep))
    bad = [r for r in rep["rows"] if not r["fits_smem"] or (r["spill_store_bytes"] or 0) > 0]
    unknown = [r for r in rep["rows"] if r["registers"] is None]
    print(f"{len(rep['rows'])} kernels compiled for sm_{args.arch} in {rep['seconds']} s; "
          f"{len(bad)} spill or exceed shared memory; {len(unknown)} without a ptxas report; "
          f"wrote {args.out}/compile_report.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
