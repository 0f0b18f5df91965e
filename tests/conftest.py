"""Test-wide setup.

Without a GPU, the Triton kernels run on the CPU interpreter: ``TRITON_INTERPRET`` must be set
before any ``@triton.jit`` function is defined, so it is set here, before test modules import the
package's kernels.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `from helpers import ...` in any test file (pytest runs with --import-mode=importlib).
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def nan_allocations(monkeypatch):
    """torch.empty / empty_like return NaN-filled tensors, so any element a kernel fails to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(alloc):
        def wrapped(*args, **kw):
            t = alloc(*args, **kw)
            return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
        return wrapped

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
