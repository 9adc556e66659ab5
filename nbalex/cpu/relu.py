"""ReLU on the CPU: one parallel Numba pass over the flat array."""

import numpy as np
from numba import njit, prange

from nbalex import checks

from . import threads  # noqa: F401  (picks the threading layer before any kernel runs)


@njit(parallel=True, cache=True)
def relu_forward_kernel(y, x):
    """y[i] = max(x[i], 0) for every i of the flat arrays, a NaN kept (np.maximum's rule);
    y may be x (written).  Plain IEEE arithmetic: no fastmath, which would assume no NaN."""
    for i in prange(x.shape[0]):
        v = x[i]
        y[i] = np.float32(0.0) if v < 0.0 else v


@njit(parallel=True, cache=True)
def relu_backward_kernel(dx, dy, y):
    """dx[i] = dy[i] * (y[i] > 0), a multiply as in the reference: a NaN or inf dy at an
    inactive unit gives NaN, not 0 (written); dx may be dy."""
    for i in prange(dy.shape[0]):
        g = dy[i]
        dx[i] = g if y[i] > 0.0 else g * np.float32(0.0)


@checks.checked(checks.relu_forward, "cpu")
def relu_forward(y, x, stream=None):
    """y = max(x, 0), any shape, C-contiguous; y may be x."""
    relu_forward_kernel(y.reshape(-1), x.reshape(-1))


@checks.checked(checks.relu_backward, "cpu")
def relu_backward(dx, dy, y, stream=None):
    """dx = dy * (y > 0); dx may be dy."""
    relu_backward_kernel(dx.reshape(-1), dy.reshape(-1), y.reshape(-1))
