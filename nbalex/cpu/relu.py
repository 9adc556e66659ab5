"""ReLU on the CPU: one Numba pass over the flat array, split between the worker threads."""

import numpy as np
from numba import njit

from nbalex import checks

from . import workers


@njit(nogil=True, cache=True, error_model="numpy")
def relu_forward_kernel(y, x, lo, hi):
    """y[i] = max(x[i], 0) for lo <= i < hi of the flat arrays, a NaN kept (np.maximum's
    rule); y may be x (written).  Plain IEEE arithmetic: no fastmath, which would assume no
    NaN."""
    src, dst = x[lo:hi], y[lo:hi]          # views from 0: no wrap-around of the index
    for i in range(hi - lo):
        v = src[i]
        dst[i] = np.float32(0.0) if v < 0.0 else v


@njit(nogil=True, cache=True, error_model="numpy")
def relu_backward_kernel(dx, dy, y, lo, hi):
    """dx[i] = dy[i] * (y[i] > 0) for lo <= i < hi, a multiply as in the reference: a NaN or
    inf dy at an inactive unit gives NaN, not 0 (written); dx may be dy."""
    g_in, out, act = dy[lo:hi], dx[lo:hi], y[lo:hi]
    for i in range(hi - lo):
        g = g_in[i]
        out[i] = g if act[i] > 0.0 else g * np.float32(0.0)


@checks.checked(checks.relu_forward, "cpu")
def relu_forward(y, x, stream=None):
    """y = max(x, 0), any shape, C-contiguous; y may be x."""
    workers.for_ranges(relu_forward_kernel, x.size, y.reshape(-1), x.reshape(-1))


@checks.checked(checks.relu_backward, "cpu")
def relu_backward(dx, dy, y, stream=None):
    """dx = dy * (y > 0); dx may be dy."""
    workers.for_ranges(relu_backward_kernel, dy.size, dx.reshape(-1), dy.reshape(-1),
                       y.reshape(-1))
