"""pytest-benchmark microbenchmarks (GPU only): ``pytest bench/test_bench_ops.py --benchmark-enable``.

Side by side in one run: the base layer alone, ours (each path), PEFT LoRA, at the target shape.
The full side-by-side grid with ratios is ``python -m bench``.
"""

import pytest
import torch

from bench.cases import IMPLS, Case, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="speed is measured on a GPU only")


@pytest.mark.parametrize("impl", ["limit", "ours_fused", "ours_epilogue", "peft_lora", "addmm"])
@pytest.mark.parametrize("M,rank", [(8192, 16), (8192, 128), (16, 16)])
def test_fwd_bwd(benchmark, impl, M, rank):
    case = Case(M, 4096, 4096, rank, "lora")
    t = make_inputs(case, "cuda")
    fn, params = IMPLS[impl][0](t)
    x = t.x.requires_grad_(True)
    G = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)

    def step():
        fn(x).backward(G)
        torch.cuda.synchronize()

    benchmark.group = f"fwd_bwd M={M} r={rank}"
    benchmark.pedantic(step, warmup_rounds=5, rounds=30)
