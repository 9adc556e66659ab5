"""Fully connected layer on the CPU: SGEMM from NumPy's BLAS, bias and ReLU fused after it.

x (N,K), w (M,K), b (M,), y (N,M) = x @ w.T + b.  The transposes are views; NumPy passes
them to BLAS as transpose flags, so no operand is copied.  The forward GEMM is computed as
y.T = w @ x.T (M x N, M the long side): OpenBLAS runs that orientation several times faster
than x @ w.T when the batch N is small; likewise dx.T = w.T @ dy.T.  y.T and dx.T land in
the caller's ``workspace`` (``linear_workspace_size`` elements, allocated per call when it is
None), and one parallel pass transposes them into y (adding bias and ReLU) or dx.
"""

import numpy as np
from numba import njit, prange

from nbalex import checks
from nbalex.backends import host_array, workspace_view

from . import threads  # noqa: F401  (picks the threading layer before any kernel runs)


@checks.checked(checks.linear_workspace_size, "cpu")
def linear_workspace_size(x_shape, w_shape):
    """float32 elements for y.T (N*M) or dx.T (N*K): N * max(M, K)."""
    return int(x_shape[0]) * max(int(w_shape[0]), int(w_shape[1]))


def transposed(workspace, shape):
    """A (rows, cols) float32 view of the start of ``workspace`` (allocated when None)."""
    return workspace_view(workspace, shape[0] * shape[1], host_array).reshape(shape)


@njit(parallel=True, cache=True)
def transpose_bias_relu(y, yt, b, relu):
    """y[n, m] = yt[m, n] + b[m], then max(., 0) if relu, a NaN kept (written).  Tasks over
    blocks of m."""
    n_rows, cols = y.shape
    blocks = (cols + 63) // 64
    for blk in prange(blocks):
        lo = blk * 64
        hi = min(cols, lo + 64)
        for n in range(n_rows):
            for m in range(lo, hi):
                v = yt[m, n] + b[m]
                y[n, m] = np.float32(0.0) if (relu and v < 0.0) else v


@njit(parallel=True, cache=True)
def transpose_into(dst, src):
    """dst[n, k] = src[k, n] (written).  dst (N, K), src (K, N); tasks over blocks of k."""
    n_rows, cols = dst.shape
    blocks = (cols + 63) // 64
    for blk in prange(blocks):
        lo = blk * 64
        hi = min(cols, lo + 64)
        for n in range(n_rows):
            for kk in range(lo, hi):
                dst[n, kk] = src[kk, n]


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


@checks.checked(checks.linear_forward, "cpu")
def linear_forward(y, x, w, b, relu=False, workspace=None, stream=None):
    """y (N,M) <- x @ w.T + b, then max(y, 0) when relu.  y is overwritten."""
    yt = transposed(workspace, (y.shape[1], y.shape[0]))
    np.matmul(w, x.T, out=yt)
    transpose_bias_relu(y, yt, b, relu)


@checks.checked(checks.linear_backward_data, "cpu")
def linear_backward_data(dx, dy, w, workspace=None, stream=None):
    """dx (N,K) <- dy @ w, computed as dx.T = w.T @ dy.T (the faster orientation, as above)."""
    dxt = transposed(workspace, (dx.shape[1], dx.shape[0]))
    np.matmul(w.T, dy.T, out=dxt)
    transpose_into(dx, dxt)


@checks.checked(checks.linear_backward_weights, "cpu")
def linear_backward_weights(dw, db, dy, x, workspace=None, stream=None):
    """dw (M,K) <- dy.T @ x, db (M,) <- dy.sum(0).  Both overwritten."""
    np.matmul(dy.T, x, out=dw)
    column_sums(db, dy)
