"""Inverted dropout on the CPU with the counter-based mask of ``nbalex.backends``.

mask[i] = 1 iff (mix32((offset + i) ^ mix32(seed ^ 0x9E3779B9)) >> 8) >= floor(p * 2**24), i
the flat C-order index; y = x * mask / (1-p).  The hash runs in uint64 registers, masked back to 32
bits after every multiply, which is exactly the wrap-around uint32 arithmetic of the contract.
"""

import numpy as np
from numba import njit

from nbalex import checks
from nbalex.backends import dropout_threshold, mix32

from . import workers

_LOW32 = np.uint64(0xFFFFFFFF)
_M1 = np.uint64(0x7FEB352D)
_M2 = np.uint64(0x846CA68B)
_S16 = np.uint64(16)
_S15 = np.uint64(15)
_S8 = np.uint64(8)


@njit(inline="always", cache=True)
def _mix32(x):
    """lowbias32 of a value below 2**32 held in a uint64."""
    x ^= x >> _S16
    x = (x * _M1) & _LOW32
    x ^= x >> _S15
    x = (x * _M2) & _LOW32
    x ^= x >> _S16
    return x


@njit(nogil=True, cache=True, error_model="numpy")
def dropout_forward_kernel(y, mask, x, seed_mix, offset, threshold, keep_prob, lo, hi):
    """Flat arrays, lo <= i < hi: write mask[i] (the hash rule for element offset + i) and
    y[i] = x[i] * mask[i] / keep_prob, a multiply as in the reference (a dropped NaN or inf
    gives NaN, a dropped number 0)."""
    s = np.uint64(seed_mix)
    base = np.uint64(offset)
    thr = np.uint64(threshold)
    for i in range(lo, hi):
        u = _mix32(((base + np.uint64(i)) & _LOW32) ^ s)
        keep = (u >> _S8) >= thr
        mask[i] = 1 if keep else 0
        v = x[i]
        y[i] = v / keep_prob if keep else v * np.float32(0.0)


@njit(nogil=True, cache=True, error_model="numpy")
def dropout_backward_kernel(dx, dy, mask, keep_prob, lo, hi):
    """Flat arrays, lo <= i < hi: dx[i] = dy[i] * mask[i] / keep_prob, a multiply as in the forward pass
    (written; dx may be dy)."""
    for i in range(lo, hi):
        g = dy[i]
        dx[i] = g / keep_prob if mask[i] != 0 else g * np.float32(0.0)


@checks.checked(checks.dropout_forward, "cpu")
def dropout_forward(y, mask, x, p, seed, offset=0, stream=None):
    """mask (uint8) <- keep mask for (seed, p), element i hashed as offset + i;
    y <- x * mask / (1-p).  Both overwritten."""
    seed_mix = mix32((int(seed) & 0xFFFFFFFF) ^ 0x9E3779B9)
    workers.for_ranges(dropout_forward_kernel, x.size, y.reshape(-1), mask.reshape(-1),
                       x.reshape(-1), seed_mix, int(offset) & 0xFFFFFFFF, dropout_threshold(p),
                       np.float32(1.0 - p), work=8 * x.size)


@checks.checked(checks.dropout_backward, "cpu")
def dropout_backward(dx, dy, mask, p, stream=None):
    """dx <- dy * mask / (1-p).  dx is overwritten; it may be dy."""
    workers.for_ranges(dropout_backward_kernel, dy.size, dx.reshape(-1), dy.reshape(-1),
                       mask.reshape(-1), np.float32(1.0 - p))
