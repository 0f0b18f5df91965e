"""The optional CUDA extension: skipped cleanly without a toolchain, exact on a GPU when built."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import rel_err
from tiedlora_kernels import reference
from tiedlora_kernels.ops import cuda_ext

ROOT = Path(__file__).resolve().parents[2]


def test_setup_skips_extension_without_cuda_toolchain():
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here: the skip path is not reachable")
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "TIEDLORA_BUILD_CUDA": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "skipping the CUDA extension" in res.stderr


def test_missing_extension_raises_clear_error():
    if cuda_ext.available():
        pytest.skip("extension is built")
    with pytest.raises(RuntimeError, match="TIEDLORA_BUILD_CUDA=1"):
        cuda_ext.decode_epilogue_(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(2, 1),
                                  None, None, 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 16), (16, 4096, 11008, 128), (7, 33, 40, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_epilogue_matches_reference(M, K, N, r, dtype):
    if not cuda_ext.available():
        pytest.skip("CUDA extension not built (TIEDLORA_BUILD_CUDA=1)")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(dtype)
    A = torch.randn(r, K, device="cuda", generator=g) / K**0.5
    B = torch.randn(N, r, device="cuda", generator=g)
    u, v = torch.randn(r, device="cuda", generator=g), torch.randn(N, device="cuda", generator=g)
    out = torch.nn.functional.linear(x, W)
    cuda_ext.decode_epilogue_(out, x, A, B, u, v, 0.5)
    ref = reference.tied_lora_linear(x.double(), W.double(), None, A.double(), B.double(), u.double(), v.double(), 0.5)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
