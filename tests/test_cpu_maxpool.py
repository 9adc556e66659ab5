"""The CPU max-pool kernel (separable flat sweeps) against the NumPy reference, bit for bit, on
data full of ties, NaNs, infinities and signed zeros, for every kind of (size, stride) it takes:
size 1 and 2 (where its first sweeps fold an element twice), 3 (AlexNet's), larger sizes (the
extra sweeps), stride below, equal to and above the size, odd and even planes."""

import numpy as np
import pytest

from nbalex import reference as ref
from nbalex.cpu import maxpool, workers

CASES = [  # (n, c, size, stride, h, w)
    (2, 3, 3, 2, 13, 13), (2, 3, 3, 2, 14, 12), (2, 3, 3, 2, 27, 27), (1, 2, 3, 2, 55, 55),
    (2, 3, 3, 2, 3, 3), (2, 3, 3, 2, 3, 8), (2, 3, 2, 2, 9, 8), (2, 3, 2, 2, 8, 9),
    (2, 3, 3, 1, 7, 10), (2, 3, 3, 3, 11, 10), (2, 3, 3, 4, 13, 12), (2, 3, 1, 1, 5, 4),
    (2, 3, 1, 2, 6, 5), (2, 3, 2, 1, 5, 6), (2, 3, 4, 2, 11, 9), (2, 3, 5, 1, 8, 7),
    (8, 64, 3, 2, 27, 27),   # enough work for workers.for_ranges to split it between threads
]


def _specials(rng, shape):
    """Small integers (ties everywhere), with NaNs, +-inf and signed zeros sprinkled in."""
    x = rng.integers(-2, 3, shape).astype(np.float32)
    pick = rng.random(shape)
    x[pick < 0.04] = np.nan
    x[(pick >= 0.04) & (pick < 0.06)] = np.inf
    x[(pick >= 0.06) & (pick < 0.08)] = -np.inf
    x[(pick >= 0.08) & (pick < 0.2)] = -0.0
    x[0, 0] = -np.inf                                   # a plane with no finite number
    x[-1, -1] = np.nan                                  # a plane of NaNs only
    return x


@pytest.mark.parametrize("n,c,size,stride,h,w", CASES)
def test_maxpool_forward_matches_reference_on_ties_and_specials(n, c, size, stride, h, w):
    rng = np.random.default_rng(size * 1000 + stride * 100 + h + w)
    x = _specials(rng, (n, c, h, w))
    out = (n, c, (h - size) // stride + 1, (w - size) // stride + 1)
    ry, ridx = np.empty(out, np.float32), np.empty(out, np.int32)
    ref.maxpool_forward(ry, ridx, x, size, stride)
    y, idx = np.full(out, 7.0, np.float32), np.full(out, -1, np.int32)
    maxpool.maxpool_forward(y, idx, x, size, stride)
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(ry))   # the first of 0.0 / -0.0
    y_only = np.full(out, 7.0, np.float32)
    maxpool.maxpool_forward(y_only, None, x, size, stride)
    np.testing.assert_array_equal(y_only, ry)
    np.testing.assert_array_equal(np.signbit(y_only), np.signbit(ry))


def test_the_large_case_is_split_between_threads():
    n, c, size, stride, h, w = CASES[-1]
    oh = (h - size) // stride + 1
    assert workers.THREADS == 1 or size * size * n * c * oh * oh >= workers.SERIAL_WORK
