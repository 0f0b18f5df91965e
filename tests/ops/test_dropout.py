"""The adapter-input dropout mask (``tiedlora_kernels/ops/dropout.py``, drawn in-kernel by
``common.keep_mask``): the right fraction, reproducible from its seed, and independent between
elements. The kernels' use of this very mask in forward and backward is tested in test_tied_lora.py.
"""

import importlib

import pytest
import torch

from tiedlora_kernels.ops import triton_interpreting

if not (torch.cuda.is_available() or triton_interpreting()):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = [] if torch.cuda.is_available() else [pytest.mark.interpreter]

dropout = importlib.import_module("tiedlora_kernels.ops.dropout")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_fraction_and_seeds():
    p = 0.3
    seed = dropout.draw_dropout_seed(DEVICE)
    keep = dropout.dropout_mask(seed, (64, 96), p)
    assert keep.shape == (64, 96) and keep.dtype == torch.bool
    assert abs((~keep).float().mean().item() - p) < 0.03
    assert torch.equal(keep, dropout.dropout_mask(seed, (64, 96), p))
    assert not torch.equal(keep, dropout.dropout_mask(seed + 1, (64, 96), p))


#: Neighbour offsets (d_row, d_col) whose masks must be independent. A counter built from row + col
#: makes (1, -1) identical; row * c + col with the wrong c makes some other pair identical; a counter
#: that ignores the row makes (1, 0) identical.
NEIGHBOURS = [(0, 1), (1, 0), (1, 1), (1, -1), (2, -1), (1, -2), (3, -3)]


@pytest.mark.parametrize("shape", [(48, 40), (40, 97)], ids=["48x40", "40x97"])
def test_neighbouring_elements_are_independent(shape):
    """For independent Bernoulli(1 - p) draws two elements are both dropped with probability p^2.
    Over ~1,800+ pairs per offset the observed rate of both-dropped is within 5 standard errors of
    p^2 = 0.25 (p = 0.5); any correlated counter scheme gives ~0.5 for some offset."""
    p = 0.5
    M, K = shape
    drop = ~dropout.dropout_mask(dropout.draw_dropout_seed(DEVICE), (M, K), p)
    for dr, dc in NEIGHBOURS:
        a = drop[: M - dr, max(0, -dc): K - max(0, dc)]
        b = drop[dr:, max(0, dc): K - max(0, -dc) if dc < 0 else K]
        b = b[:, : a.shape[1]]
        both = (a & b).float()
        rate, n = both.mean().item(), both.numel()
        se = (p * p * (1 - p * p) / n) ** 0.5
        assert abs(rate - p * p) < 5 * se, f"offset {(dr, dc)}: both dropped {rate:.3f}, want {p * p:.3f} +- {5 * se:.3f}"


def test_rows_wrapping_at_K_are_independent():
    """The last element of row i and the first of row i + 1 are consecutive counters (i K + K - 1,
    (i + 1) K): their draws must be independent (a counter of i (K - 1) + k would make them the
    same element). A tall, narrow mask gives ~2,000 such pairs."""
    p = 0.5
    M, K = 2048, 5
    drop = ~dropout.dropout_mask(dropout.draw_dropout_seed(DEVICE), (M, K), p)
    both = (drop[:-1, -1] & drop[1:, 0]).float()
    se = (p * p * (1 - p * p) / both.numel()) ** 0.5
    assert abs(both.mean().item() - p * p) < 5 * se, f"both dropped {both.mean().item():.3f}, want {p * p}"
