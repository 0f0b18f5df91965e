"""Side measurements that the per-case grid cannot answer, each a small interleaved timing.

- ``copy_bandwidth``: one large device-to-device copy (bytes read + written / time): the measured
  ceiling next to the data sheet's, for the kernels' bandwidth floors.
- ``gemm_epilogue``: does reading C in cuBLAS's epilogue cost anything? ``torch.addmm(C, x, W.T)``
  and ``C.addmm_(x, W.T)`` (beta = 1, C (M, N) in x's dtype: the redesigned forward) against
  ``torch.mm(x, W.T)``, and ``Ldx.addmm_(G, W)`` against ``torch.mm(G, W)`` (its backward).
- ``merge_layout``: why did ``merged`` time 1.09-1.19x the limit on the first H200 run? F.linear on
  the same inputs with W, a fresh copy of W, the merged weight (a fresh tensor, as the ``merged``
  impl builds it) and W overwritten in place by the merged values (what ``TiedLoRALinear.merge``
  does), all interleaved call by call so clock and power state are shared; with each weight's
  layout and the package's own merge checked for keeping storage, strides and dtype.

Every timing here alternates its callables call by call (``bench.run.time_interleaved``): a GPU
that slows down as it heats slows every variant alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cases import PRESET_TENSORS, Case, make_inputs, merged_weight, weight_layout


def copy_bandwidth(device: str, time_interleaved) -> dict:
    """Bytes read + written per second of ``dst.copy_(src)``, 1 GiB each on a GPU (4 MiB on a CPU)."""
    n = (1 << 30) if device == "cuda" else (4 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    (t,) = time_interleaved([lambda: dst.copy_(src)], device, flush=False)
    return dict(bytes=2 * n, median_ms=t["median_ms"], bytes_per_s=2 * n / (t["median_ms"] / 1e3))


def gemm_epilogue(device: str, Ms: list[int], K: int, N: int, time_interleaved, dtype=torch.bfloat16) -> list[dict]:
    """addmm with beta = 1 against mm at each M (forward x W^T, and the dX GEMM G W)."""
    out = []
    g = torch.Generator(device=device).manual_seed(3)
    for M in Ms:
        x = torch.randn(M, K, generator=g, device=device).to(dtype)
        W = (torch.randn(N, K, generator=g, device=device) * K ** -0.5).to(dtype)
        C = torch.randn(M, N, generator=g, device=device).to(dtype)
        G = torch.randn(M, N, generator=g, device=device).to(dtype)
        Ldx = torch.randn(M, K, generator=g, device=device).to(dtype)
        sign = [1.0]

        def inplace(c, a, b):
            # alpha alternates +1 / -1: C stays bounded over thousands of calls, and beta stays 1.
            sign[0] = -sign[0]
            return c.addmm_(a, b, alpha=sign[0])

        fwd = time_interleaved([lambda: torch.mm(x, W.t()), lambda: torch.addmm(C, x, W.t()),
                                lambda: inplace(C, x, W.t())], device)
        bwd = time_interleaved([lambda: torch.mm(G, W), lambda: inplace(Ldx, G, W)], device)
        mm, addmm, addmm_ = (t["median_ms"] for t in fwd)
        mm_b, addmm_b = (t["median_ms"] for t in bwd)
        out.append(dict(M=M, K=K, N=N, dtype=str(dtype).removeprefix("torch."), mm_ms=mm, addmm_ms=addmm,
                        addmm_inplace_ms=addmm_, addmm_over_mm=addmm / mm, addmm_inplace_over_mm=addmm_ / mm,
                        dx_mm_ms=mm_b, dx_addmm_inplace_ms=addmm_b, dx_addmm_inplace_over_mm=addmm_b / mm_b,
                        tflops_mm=2 * M * N * K / (mm / 1e3) / 1e12))
    return out


def _package_merge_keeps_layout(t) -> dict:
    """Merge through the package (inject + merge on a one-layer model): is the weight the same storage,
    strides and dtype afterwards? Returns the layouts and the verdict (or the error, if the API moved)."""
    try:
        import torch.nn as nn

        from tiedlora_kernels import TiedLoRAConfig, inject, merge

        class One(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(t.W.shape[1], t.W.shape[0], dtype=t.W.dtype, device=t.W.device)

        m = One()
        with torch.no_grad():
            m.lin.weight.copy_(t.W)
        inject(m, TiedLoRAConfig(rank=t.A.shape[0], preset="lora", target_modules=["lin"]))
        layer = m.lin
        with torch.no_grad():  # B starts at zero (the tied factors live on the root): give merge work
            for p in m.parameters():
                if p.requires_grad and p.dim() == 2 and not p.any():
                    p.normal_(0, 0.1)
        before = weight_layout(layer.weight)
        ptr = layer.weight.data_ptr()
        w0 = layer.weight.detach().clone()
        merge(m)
        after = weight_layout(layer.weight)
        return dict(before=before, after=after, same_storage=layer.weight.data_ptr() == ptr,
                    changed_values=bool((layer.weight.detach() != w0).any()), keeps_layout=before == after)
    except Exception as e:  # the package API is being redesigned: record, do not fail the run
        return dict(error=f"{type(e).__name__}: {e}"[:300])


def merge_layout(device: str, M: int, K: int, N: int, rank: int, time_interleaved,
                 presets=("lora", "vera", "tl6")) -> list[dict]:
    """F.linear with W, a copy of W, the merged W' (fresh) and W' written in place, interleaved, per preset."""
    out = []
    for preset in presets:
        t = make_inputs(Case(M, K, N, rank, preset), device)
        x = t.x.detach()
        W_copy = t.W.clone()
        Wm = merged_weight(t)
        W_inplace = t.W.clone()
        W_inplace.copy_(Wm)
        variants = {"W (limit)": t.W, "copy of W": W_copy, "merged (fresh tensor)": Wm, "merged in place": W_inplace}

        def call(w, x=x, b=t.b):
            def f():
                with torch.no_grad():
                    return F.linear(x, w, b)
            return f

        res = time_interleaved([call(w) for w in variants.values()], device)
        base = res[0]["median_ms"]
        rec = dict(preset=preset, M=M, K=K, N=N, rank=rank, adapter="u, v" if PRESET_TENSORS[preset]["u"] else "-",
                   variants=[dict(weight=name, median_ms=r["median_ms"], p20_ms=r["p20_ms"], p80_ms=r["p80_ms"],
                                  ratio=r["median_ms"] / base, layout=weight_layout(w),
                                  abs_mean=float(w.float().abs().mean()))
                             for (name, w), r in zip(variants.items(), res)])
        if preset == presets[0]:
            rec["package_merge"] = _package_merge_keeps_layout(t)
        out.append(rec)
    return out
