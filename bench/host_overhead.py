"""Host time per call of the adapted layer, and where it goes (the first GPU run's e2e finding: a
training step of ours was host-bound, 248 ms a step with the GPU busy 64 ms of it).

    python -m bench.host_overhead [--out DIR] [--calls N]

On shapes too small for the GPU to matter (M = 16, K = N = 256, rank 16, bf16), each pathway is
called N times back to back with one sync at the end: the wall time per call is the host's cost
of issuing it (the GPU drains its queue faster than the host fills it). Pathways, cheapest first:
a one-element torch op (the floor of any launch), ``F.linear`` forward and forward+backward (what
the base layer costs), one ``adapter_term`` launch (the Triton launcher alone), then our op's
forward and forward+backward through the public entry (eager: ``autograd.Function``), and the
same through the custom op that ``torch.compile`` records (to show what eager mode saves). A
cProfile of the eager forward+backward gives the Python functions that cost the most. Outside the
interpreter (a GPU, or a CPU alone), the parts of one launch's host time that need no GPU: our
launcher's Python, and that plus Triton's JIT ``run`` before the launch (meta tensors, the compile
report's compile-only driver).

Writes ``host_overhead.json`` (device, versions, commit, us per call per pathway) and
``host_overhead_profile.txt``. A host-time probe: kernel speed is in ``python -m bench``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .claims import measured_commit


def _per_call_us(fn, calls: int, sync) -> float:
    for _ in range(10):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/host-overhead")
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    from tiedlora_kernels.ops import tied_lora_linear, triton_interpreting
    from tiedlora_kernels.ops import tied_lora as op
    from tiedlora_kernels.ops.adapter_term import adapter_term

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 16, 256, 256, 16
    mk = lambda *s, dt=dtype: (torch.randn(*s, generator=g) / 8).to(device, dt)  # noqa: E731
    x, W, b = mk(M, K).requires_grad_(), mk(N, K), mk(N)
    A, B = mk(r, K, dt=torch.float32).requires_grad_(), mk(N, r, dt=torch.float32).requires_grad_()
    u, v = mk(r, dt=torch.float32).requires_grad_(), mk(N, dt=torch.float32).requires_grad_()
    G = mk(M, N)
    one = torch.ones(1, device=device)

    def ours_fwd_bwd():
        tied_lora_linear(x, W, b, A, B, u, v, 0.5).backward(G)

    def custom_op_fwd_bwd():  # what a compiled graph runs, called eagerly
        out = op._forward_op(x, W, None, b, A, B, u, v, None, None, 0.5, 0.0, True, False)[0]
        out.backward(G)

    pathways = {
        "torch one-element add_": lambda: one.add_(1),
        "F.linear fwd": lambda: F.linear(x, W, b),
        "F.linear fwd+bwd": lambda: F.linear(x, W, b).backward(G),
        "adapter_term launch": lambda: adapter_term(x.detach(), A.detach(), B.detach(), u.detach(), v.detach(), b,
                                                    0.5, 0.0, None, in_dropout=False, out_dropout=False,
                                                    store_h=True),
        "ours fwd (no grad)": lambda: _no_grad(tied_lora_linear, x, W, b, A, B, u, v, 0.5),
        "ours fwd": lambda: tied_lora_linear(x, W, b, A, B, u, v, 0.5),
        "ours fwd+bwd": ours_fwd_bwd,
        "custom op fwd+bwd": custom_op_fwd_bwd,
    }
    if not cuda and not triton_interpreting():  # the kernels need a GPU or the interpreter
        pathways = {k: f for k, f in pathways.items() if k.startswith(("torch", "F."))}
    us = {}
    for name, fn in pathways.items():
        us[name] = round(_per_call_us(fn, args.calls, sync), 2)
        print(f"{name:28s} {us[name]:9.1f} us/call", flush=True)
    if not triton_interpreting():  # the compiled JIT path (the interpreter bypasses it)
        for name, t in _launch_parts_us(M, K, N, r, dtype, args.calls).items():
            us[name] = t
            print(f"{name:28s} {t:9.1f} us/call", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if cuda or triton_interpreting():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            ours_fwd_bwd()
        sync()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        (out / "host_overhead_profile.txt").write_text(text.getvalue())
    import triton

    commit, dirty = measured_commit()
    rec = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               triton=triton.__version__, commit=commit, dirty=dirty,
               shape=dict(M=M, K=K, N=N, r=r, dtype=str(dtype)), calls=args.calls,
               command="python -m bench.host_overhead " + " ".join(sys.argv[1:] if argv is None else argv), us_per_call=us)
    (out / "host_overhead.json").write_text(json.dumps(rec, indent=1))
    return 0


def _launch_parts_us(M: int, K: int, N: int, r: int, dtype, calls: int) -> dict:
    """Where one ``adapter_term`` launch's host time goes, without a GPU: on meta tensors under the
    compile report's compile-only driver, the launcher's own Python (Triton's ``run`` stubbed) and
    that plus Triton's JIT ``run`` up to the launch (argument binding and specialization, the
    cache key, the globals check); the rest of a real launch (the driver's launch call, the CUDA
    allocations) is what the GPU-side "adapter_term launch" figure adds."""
    from triton.runtime.jit import JITFunction

    from bench.compile_report import compile_only
    from tiedlora_kernels.ops.adapter_term import adapter_term

    e = lambda *s, dt=torch.float32: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    x, A, B, u, v, b = e(M, K, dt=dtype), e(r, K), e(N, r), e(r), e(N), e(N, dt=dtype)

    def launch():
        adapter_term(x, A, B, u, v, b, 0.5, 0.0, None, in_dropout=False, out_dropout=False, store_h=True)

    out = {}
    with compile_only(90):
        launch()  # compiles once
        out["adapter_term: our launcher + Triton JIT run (no launch)"] = round(_per_call_us(launch, calls, lambda: None),
                                                                              2)
        real = JITFunction.run
        JITFunction.run = lambda self, *a, grid, warmup, **k: None
        try:
            out["adapter_term: our launcher only"] = round(_per_call_us(launch, calls, lambda: None), 2)
        finally:
            JITFunction.run = real
    return out


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


if __name__ == "__main__":
    raise SystemExit(main())
