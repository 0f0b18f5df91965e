"""pytest-benchmark microbenchmarks (GPU only): ``pytest bench/test_bench_ops.py --benchmark-enable``.

Side by side in one run, on the same inputs (``bench.cases``, the builders ``python -m bench``
uses): the base layer alone (the limit), ours, the addmm recipe and PEFT LoRA, at the issue's
target shape (M = 8192, K = N = 4096, r = 16 / 128) and at decode (M = 16). Each impl is checked against the fp32 oracle before it is timed. Not collected by
the default test run (``testpaths = tests``); the full grid with ratios is ``python -m bench``.
"""

import pytest
import torch

from bench.cases import IMPLS, Case, env, make_inputs
from bench.run import check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="speed is measured on a GPU only")

IMPL_NAMES = ["limit", "ours", "addmm", "peft_lora"]
CASES = [(8192, 16), (8192, 128), (16, 16)]


def _setup(impl_name, M, rank, op):
    case = Case(M, 4096, 4096, rank, "lora")
    t = make_inputs(case, "cuda")
    impl = IMPLS[impl_name][0](t)
    G = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16) if op == "fwd_bwd" else None
    with env(**impl.env):
        verdict = check(impl, t.x, G)
    assert verdict.get("ok", True), f"{impl_name} is wrong on this case: {verdict}"
    return impl, t, G


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize("M,rank", CASES, ids=[f"M{m}-r{r}" for m, r in CASES])
def test_fwd_bwd(benchmark, impl_name, M, rank):
    impl, t, G = _setup(impl_name, M, rank, "fwd_bwd")
    x = t.x.requires_grad_(True)

    def step():
        x.grad = None
        for p in impl.params:
            p.grad = None
        impl.fn(x).backward(G)
        torch.cuda.synchronize()

    benchmark.group = f"fwd_bwd M={M} r={rank}"
    with env(**impl.env):  # forward and backward both read the backend at call time
        benchmark.pedantic(step, warmup_rounds=5, rounds=30)


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize("M,rank", CASES, ids=[f"M{m}-r{r}" for m, r in CASES])
def test_fwd(benchmark, impl_name, M, rank):
    impl, t, _ = _setup(impl_name, M, rank, "fwd")

    def step():
        with torch.no_grad():
            impl.fn(t.x)
        torch.cuda.synchronize()

    benchmark.group = f"fwd M={M} r={rank}"
    with env(**impl.env):
        benchmark.pedantic(step, warmup_rounds=5, rounds=50)
