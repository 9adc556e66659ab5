"""Fully connected layer on the CPU: SGEMM from NumPy's BLAS, bias and ReLU fused after it.

x (N,K), w (M,K), b (M,), y (N,M) = x @ w.T + b.  The transposes are views; NumPy passes
them to BLAS as transpose flags, so nothing is copied and every GEMM writes into ``out=``.
"""

import numpy as np
from numba import njit, prange

from . import threads  # noqa: F401  (picks the threading layer before any kernel runs)


@njit(parallel=True, fastmath=True, cache=True)
def add_bias_relu_rows(y, b, relu):
    """In place: y[n, m] += b[m], then max(., 0) if relu.  One task per row n."""
    for n in prange(y.shape[0]):
        row = y[n]
        for m in range(y.shape[1]):
            v = row[m] + b[m]
            row[m] = v if (v > 0.0 or not relu) else 0.0


@njit(parallel=True, cache=True)
def column_sums(db, dy):
    """db[m] = sum_n dy[n, m] (overwritten), summed in float64; one task per 256 columns."""
    n_rows, cols = dy.shape
    blocks = (cols + 255) // 256
    for blk in prange(blocks):
        lo = blk * 256
        hi = min(cols, lo + 256)
        for m in range(lo, hi):
            s = 0.0
            for n in range(n_rows):
                s += dy[n, m]
            db[m] = s


def linear_forward(y, x, w, b, relu=False, stream=None):
    """y (N,M) <- x @ w.T + b, then max(y, 0) when relu.  y is overwritten."""
    np.matmul(x, w.T, out=y)
    add_bias_relu_rows(y, b, relu)


def linear_backward_data(dx, dy, w, stream=None):
    """dx (N,K) <- dy @ w."""
    np.matmul(dy, w, out=dx)


def linear_backward_weights(dw, db, dy, x, stream=None):
    """dw (M,K) <- dy.T @ x, db (M,) <- dy.sum(0).  Both overwritten."""
    np.matmul(dy.T, x, out=dw)
    column_sums(db, dy)
