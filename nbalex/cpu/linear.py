"""Fully connected layer on the CPU: SGEMM from NumPy's BLAS, bias and ReLU fused after it.

x (N,K), w (M,K), b (M,), y (N,M) = x @ w.T + b.  The transposes are views, passed to BLAS as
transpose flags, so no operand is copied.  The forward GEMM is computed as y.T = w @ x.T
(M x N, M the long side): OpenBLAS runs that orientation several times faster than x @ w.T
when the batch N is small.  y.T lands in the caller's ``workspace`` (``linear_workspace_size``
elements, allocated per call when it is None), and one pass on the worker threads transposes
it into y, adding bias and ReLU.

A large layer's GEMMs (at least THREADED_WEIGHTS weights) are shared between the workers
(:mod:`nbalex.cpu.workers`) from two examples up: each runs single-threaded BLAS on its own
rows of y.T and dW and its own columns of dx = dy @ w, which needs no transpose.  AlexNet's
fc6 at batch 32 (2-core Xeon), ms OpenBLAS's threads -> the workers' shares: forward 17.7
-> 16.6, backward data 22.8 -> 19.3, dW 19.2 -> 17.1; fc7 6.7 -> 6.0, 10.0 -> 7.7, 7.4 ->
6.2.  A single example keeps OpenBLAS's threads (its GEMMs are GEMVs there: fc6 forward 3.9
ms, 8.6 as shares of an SGEMM), and then computes dx.T = w.T @ dy.T into the workspace.
"""

import numpy as np
from numba import njit

from nbalex import checks
from nbalex.backends import host_array, workspace_view

from . import openblas, workers


# Layers with fewer weights than this run their GEMMs on single-threaded BLAS: handing half
# of a call to the other core costs more than it saves.  alexnet-mini's fc6 at batch 32
# (256 x 2304), ms threaded -> single-threaded: forward 0.52 -> 0.42, dW 0.55 -> 0.35; fc7
# (256 x 256) 0.18 -> 0.05.  Large layers keep both cores, at batch 1 too, where a GEMM is a
# pass over the weights at memory speed (AlexNet's fc6 forward: 4.5 ms threaded, 9.2 single).
THREADED_WEIGHTS = 1 << 21

# Below this batch dW = dy.T @ x is a sum of a few outer products, which OpenBLAS runs at a
# fraction of the memory's speed: AlexNet's fc6 at batch 1 (4096 x 9216, 151 MB written)
# took 45 ms, the kernel below on two threads 8.5 ms (batch 4: 40 -> 15 ms).
OUTER_BELOW = 8


def _blas_serial(w_shape):
    return openblas.serial_if(w_shape[0] * w_shape[1] < THREADED_WEIGHTS)


def _shared(n, w_shape):
    """Whether the GEMMs of a layer with weights ``w_shape`` at batch n are split between
    the workers (each on single-threaded BLAS through cblas_sgemm)."""
    return (n > 1 and w_shape[0] * w_shape[1] >= THREADED_WEIGHTS and workers.WORKERS > 1
            and openblas.gemm is not None)


def _in_shares(n, gemm_part):
    """gemm_part(lo, hi) for each worker's share [lo, hi) of range(n), in parallel."""
    workers.run(lambda wid, lo, hi: gemm_part(lo, hi), n, serial_blas=True)


@njit(nogil=True, cache=True, error_model="numpy")
def outer_products(dw, dy, x, lo, hi):
    """dw[m, :] = sum over n, in increasing order, of dy[n, m] * x[n, :] for lo <= m < hi
    (written): a small batch's weight gradient, rows of dw streamed once each."""
    for m in range(lo, hi):
        row = dw[m]
        g, xs = dy[0, m], x[0]
        for k in range(row.shape[0]):
            row[k] = g * xs[k]
        for i in range(1, dy.shape[0]):
            g, xs = dy[i, m], x[i]
            for k in range(row.shape[0]):
                row[k] += g * xs[k]


@checks.checked(checks.linear_workspace_size, "cpu")
def linear_workspace_size(x_shape, w_shape):
    """float32 elements for y.T (N*M) or dx.T (N*K): N * max(M, K)."""
    return int(x_shape[0]) * max(int(w_shape[0]), int(w_shape[1]))


def _blocks(size, block):
    return -(-size // block)


def transposed(workspace, shape):
    """A (rows, cols) float32 view of the start of ``workspace`` (allocated when None)."""
    return workspace_view(workspace, shape[0] * shape[1], host_array).reshape(shape)


@njit(nogil=True, cache=True, error_model="numpy")
def transpose_bias_relu(y, yt, b, relu, first, last):
    """y[n, m] = yt[m, n] + b[m], then max(., 0) if relu, a NaN kept (written), for the
    blocks of 64 m from first to last."""
    n_rows, cols = y.shape
    for blk in range(first, last):
        lo = blk * 64
        hi = min(cols, lo + 64)
        for n in range(n_rows):
            for m in range(lo, hi):
                v = yt[m, n] + b[m]
                y[n, m] = np.float32(0.0) if (relu and v < 0.0) else v


@njit(nogil=True, cache=True, error_model="numpy")
def transpose_into(dst, src, first, last):
    """dst[n, k] = src[k, n] (written) for the blocks of 64 k from first to last.  dst (N, K),
    src (K, N)."""
    n_rows, cols = dst.shape
    for blk in range(first, last):
        lo = blk * 64
        hi = min(cols, lo + 64)
        for n in range(n_rows):
            for kk in range(lo, hi):
                dst[n, kk] = src[kk, n]


@njit(nogil=True, cache=True, error_model="numpy")
def column_sums(db, dy, first, last):
    """db[m] = sum_n dy[n, m] (overwritten), summed in float64, for the blocks of 256 m from
    first to last."""
    n_rows, cols = dy.shape
    for blk in range(first, last):
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
    if _shared(x.shape[0], w.shape):
        _in_shares(w.shape[0], lambda lo, hi: openblas.gemm(w[lo:hi], x, yt[lo:hi], 0.0,
                                                            trans_b=True))
    else:
        with _blas_serial(w.shape):
            np.matmul(w, x.T, out=yt)
    workers.for_ranges(transpose_bias_relu, _blocks(y.shape[1], 64), y, yt, b, relu, work=y.size)


@checks.checked(checks.linear_backward_data, "cpu")
def linear_backward_data(dx, dy, w, workspace=None, stream=None):
    """dx (N,K) <- dy @ w: the workers' columns of it, or dx.T = w.T @ dy.T (see above)."""
    if _shared(dy.shape[0], w.shape):
        _in_shares(w.shape[1], lambda lo, hi: openblas.gemm(dy, w[:, lo:hi], dx[:, lo:hi], 0.0))
        return
    dxt = transposed(workspace, (dx.shape[1], dx.shape[0]))
    with _blas_serial(w.shape):
        np.matmul(w.T, dy.T, out=dxt)
    workers.for_ranges(transpose_into, _blocks(dx.shape[1], 64), dx, dxt, work=dx.size)


@checks.checked(checks.linear_backward_weights, "cpu")
def linear_backward_weights(dw, db, dy, x, workspace=None, stream=None):
    """dw (M,K) <- dy.T @ x, db (M,) <- dy.sum(0).  Both overwritten.  Below OUTER_BELOW
    examples as a sum of outer products (:func:`outer_products`), else one GEMM."""
    if dy.shape[0] < OUTER_BELOW:
        workers.for_ranges(outer_products, dw.shape[0], dw, dy, x, work=dw.size)
    elif _shared(dy.shape[0], dw.shape):
        _in_shares(dw.shape[0], lambda lo, hi: openblas.gemm(dy[:, lo:hi], x, dw[lo:hi], 0.0,
                                                             trans_a=True))
    else:
        with _blas_serial(dw.shape):
            np.matmul(dy.T, x, out=dw)
    workers.for_ranges(column_sums, _blocks(dy.shape[1], 256), db, dy, work=dy.size)
