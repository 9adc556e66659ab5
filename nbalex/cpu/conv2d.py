"""2-D convolution with groups on the CPU: im2col (Numba) + SGEMM (NumPy's BLAS), batch-parallel.

Shapes as in the contract (``nbalex.backends``): x (N,C,H,W), w (F,C/G,KH,KW), b (F,),
y (N,F,OH,OW).  The batch is split between worker threads (:mod:`nbalex.cpu.workers`), each
with single-threaded BLAS and its own slice of the workspace; a worker walks its images in
chunks of ``nb`` (see :func:`chunk_images`).  Per chunk (layouts in :mod:`nbalex.cpu.im2col`)::

    forward          cols = im2col(x chunk)            (K, nb*P)
                     yt[g] = w[g] @ cols[g]             (F/G, nb*P) per group, one GEMM each
                     y chunk = yt + b (ReLU fused)      scattered back to NCHW
    backward data    dyt = dy chunk, filter-major       (F, nb*P)
                     cols[g] = w[g].T @ dyt[g]          then col2im into dx
    backward weights part[g] (+)= cols[g] @ dyt[g].T    (K/G, F/G): dw[g].T, summed per worker;
                     dw = sum over workers of part.T    on the calling thread

A worker's workspace slice holds its ``cols``, ``yt``/``dyt`` and two dw-sized buffers (its
partial dw.T and the GEMM output being added to it).  With one image per chunk, the GEMMs read
dy and write y in place, without the layout shuffles.  A 1x1, stride-1, unpadded convolution
needs no im2col: its forward and backward-data passes are batched GEMMs on the NCHW arrays.

Stride-1 convolutions on maps larger than 12x12 can take the kernel-row path of
:mod:`nbalex.cpu.conv_rows` for some passes, and 3x3 ones Winograd's
(:mod:`nbalex.cpu.winograd`, :mod:`nbalex.cpu.winograd_weights`); which pass of which
shape takes which path is :mod:`nbalex.cpu.conv_strategy`'s choice.
"""

import numpy as np

from nbalex import checks
from nbalex.backends import host_array, workspace_view

from . import conv_rows as rows_path
from . import conv_strategy as strategy
from . import im2col as k
from . import openblas
from . import winograd
from . import winograd_weights
from . import workers

# A chunk aims at GEMMs at least TARGET_WIDTH columns wide (nb*P) and keeps its column matrix
# within COLS_BUDGET float32 (16 MiB) so that what im2col writes is still in cache when the
# GEMM reads it.  With one single-threaded worker per core, small chunks won for strided
# convolutions: on AlexNet's conv1 at batch 32 (2-core EPYC) one image per chunk was as fast
# as or faster than 4..16, while with both cores inside every GEMM, 1-image chunks had cost
# up to 3x.  Stride-1 convolutions on small maps aim at STRIDE1_WIDTH instead: with the images
# innermost their im2col copies runs of OW*nb floats, so wide chunks cost nothing there and
# widen the GEMMs; alexnet-mini at batch 32 (2-core Xeon), ms forward / backward data /
# backward weights, 256 -> 4096 columns: conv2 (12x12, 2 -> 16 images) 4.96/4.26/4.72 ->
# 3.07/2.41/3.02, conv3 (5x5, 11 -> 16 images) 1.42/1.40/1.96 -> 1.29/1.24/1.85.
TARGET_WIDTH = 256
STRIDE1_WIDTH = 4096
COLS_BUDGET = 4 * 1024 * 1024


def chunk_images(n, rows, p_out, stride=2):
    """Images per chunk: enough for TARGET_WIDTH columns (STRIDE1_WIDTH for stride 1), within
    COLS_BUDGET, in [1, n]."""
    wanted = -(-(STRIDE1_WIDTH if stride == 1 else TARGET_WIDTH) // p_out)
    return max(1, min(n, wanted, COLS_BUDGET // max(1, rows * p_out)))


def _path(x_shape, w_shape, stride, pad, groups, pass_):
    """The path :func:`nbalex.cpu.conv_strategy.choose` picks for the shape and pass."""
    _, _, _, _, kh, kw, oh, ow = strategy.geometry(x_shape, w_shape, stride, pad, groups)
    return strategy.choose(oh, ow, kh, kw, stride, pad, openblas.gemm is not None, pass_,
                           x_shape[0])


def _per_worker(x_shape, w_shape, stride, pad, groups):
    """(nb, cols size, yt size, dw size, packed chunk size) of one worker's workspace slice."""
    n, c, f, cg, kh, kw, oh, ow = strategy.geometry(x_shape, w_shape, stride, pad, groups)
    rows, p_out = c * kh * kw, oh * ow
    nb = chunk_images(-(-n // workers.WORKERS), rows, p_out, stride)
    # the packed chunk (k.pack_images), or a lone image's column phases (k.pack_phases)
    packed = max(c * x_shape[2] * x_shape[3] * nb if nb > 1 else 0,
                 c * x_shape[2] * stride * k.phase_width(x_shape[3], stride) if stride > 1 else 0)
    return nb, rows * nb * p_out, f * nb * p_out, f * cg * kh * kw, packed


@checks.checked(checks.conv2d_workspace_size, "cpu")
def conv2d_workspace_size(x_shape, w_shape, stride, pad, groups):
    """float32 elements the launchers use.

    The most any of the three passes needs.  Kernel-row path: the rearranged filters, then
    per worker its tap_rows matrix and a dw-sized accumulator.  im2col path: per worker
    cols + yt + two dw-sized buffers + the packed chunk of x or dx.  (The pointwise path
    needs none.)
    """
    paths = {_path(x_shape, w_shape, stride, pad, groups, p) for p in strategy.PASSES}
    size = 0
    if "tap_rows" in paths:
        size = rows_path.workspace_size(x_shape, w_shape, pad, groups)
    if "im2col" in paths:
        _, cols, yt, dw, packed = _per_worker(x_shape, w_shape, stride, pad, groups)
        size = max(size, workers.WORKERS * (cols + yt + 2 * dw + packed))
    if "winograd" in paths:
        n, c, f, _, _, _, oh, ow = strategy.geometry(x_shape, w_shape, stride, pad, groups)
        size = max(size, winograd.workspace_size(n, c, f, groups, oh, ow, workers.WORKERS),
                   winograd.workspace_size(n, f, c, groups, x_shape[2], x_shape[3],
                                           workers.WORKERS),
                   winograd_weights.workspace_size(n, c, f, groups, oh, ow, workers.WORKERS))
    return size


def _buffers(workspace, x_shape, w_shape, stride, pad, groups):
    """nb and, per worker, (cols, yt, part, tmp, packed) carved out of the workspace (or
    allocated): the im2col path's share of conv2d_workspace_size, worker after worker."""
    n, c, f, cg, kh, kw, oh, ow = strategy.geometry(x_shape, w_shape, stride, pad, groups)
    nb, cols_size, yt_size, dw_size, packed = _per_worker(x_shape, w_shape, stride, pad, groups)
    per = cols_size + yt_size + 2 * dw_size + packed
    workspace = workspace_view(workspace, workers.WORKERS * per, host_array)
    e0, e1 = cols_size, cols_size + yt_size
    e2, e3 = e1 + dw_size, e1 + 2 * dw_size
    slices = []
    for t in range(workers.WORKERS):
        base = workspace[t * per:(t + 1) * per]
        slices.append((base[:e0].reshape(c * kh * kw, -1), base[e0:e1].reshape(f, -1),
                       base[e1:e2], base[e2:e3], base[e3:]))
    return nb, slices


def _im2col(cols, packed, x, n0, m, kh, kw, stride, pad, oh, ow):
    """cols[:, :P*m] for images n0..n0+m-1 of x: packed image innermost when m > 1, one
    image's column phases for a strided convolution, else from the image itself."""
    c, h, w = x.shape[1:]
    if m > 1:
        k.pack_images(packed, x, n0, m)
        k.im2col(cols, packed, m, c, h, w, kh, kw, stride, pad, oh, ow)
    elif stride > 1:
        k.pack_phases(packed, x, n0, stride)
        k.im2col_phases(cols, packed, c, h, w, kh, kw, stride, pad, oh, ow)
    else:
        k.im2col(cols, x[n0].reshape(-1), 1, c, h, w, kh, kw, stride, pad, oh, ow)


def _filter_major(dyt, dy, n0, m):
    """dy's chunk as (F, P*m): a view of dy itself for one image, else gathered into dyt."""
    if m == 1:
        return dy[n0].reshape(dy.shape[1], -1)
    k.gather_filter_major(dyt, dy.reshape(dy.shape[0], dy.shape[1], -1), n0, m)
    return dyt


@checks.checked(checks.conv2d_forward, "cpu")
def conv2d_forward(y, x, w, b, stride, pad, groups, relu=False, workspace=None, stream=None):
    """y (N,F,OH,OW) <- conv(x, w) + b, then max(y, 0) if ``relu``.  y is overwritten."""
    n, c, f, cg, kh, kw, oh, ow = strategy.geometry(x.shape, w.shape, stride, pad, groups)
    fg, kg, p_out = f // groups, cg * kh * kw, oh * ow
    path = _path(x.shape, w.shape, stride, pad, groups, "forward")
    if path == "pointwise":
        wg = w.reshape(groups, fg, cg)
        np.matmul(wg, x.reshape(n, groups, cg, p_out), out=y.reshape(n, groups, fg, p_out))
        workers.for_ranges(k.add_bias_relu_nchw, n * f, y, b, relu, work=y.size)
        return
    if path == "tap_rows":
        rows_path.forward(y, x, w, b, pad, groups, relu, workspace)
        return
    if path == "winograd":
        winograd.convolve(y, x, w, False, pad, groups, b, relu, workspace)
        return
    nb, slices = _buffers(workspace, x.shape, w.shape, stride, pad, groups)
    w2 = w.reshape(f, kg)

    def work(t, lo, hi):
        cols, yt, _, _, packed = slices[t]
        for n0 in range(lo, hi, nb):
            m = min(nb, hi - n0)
            width = m * p_out
            _im2col(cols, packed, x, n0, m, kh, kw, stride, pad, oh, ow)
            out = y[n0].reshape(f, width) if m == 1 else yt     # one image: GEMM straight into y
            for g in range(groups):
                np.matmul(w2[g * fg:(g + 1) * fg], cols[g * kg:(g + 1) * kg, :width],
                          out=out[g * fg:(g + 1) * fg, :width])
            if m == 1:
                k.bias_relu_image(y, b, n0, relu, 0, f)
            else:
                k.scatter_bias_relu(y.reshape(n, f, p_out), yt, b, n0, m, relu)

    if strategy.split_filters(n, fg * kg * p_out):
        cols, _, _, _, packed = slices[0]
        _im2col(cols, packed, x, 0, 1, kh, kw, stride, pad, oh, ow)
        out = y[0].reshape(f, p_out)

        def filters(t, lo, hi):
            for g, f0, f1 in strategy.group_parts(lo, hi, fg):
                np.matmul(w2[f0:f1], cols[g * kg:(g + 1) * kg, :p_out], out=out[f0:f1])
            k.bias_relu_image(y, b, 0, relu, lo, hi)

        workers.run(filters, f)
        return
    workers.run(work, n, serial_blas=strategy.serial_blas(fg * kg * p_out))


@checks.checked(checks.conv2d_backward_data, "cpu")
def conv2d_backward_data(dx, dy, w, stride, pad, groups, workspace=None, stream=None):
    """dx (N,C,H,W) <- dL/dx given dy (N,F,OH,OW).  dx is overwritten."""
    n, c, f, cg, kh, kw, oh, ow = strategy.geometry(dx.shape, w.shape, stride, pad, groups)
    fg, kg, p_out = f // groups, cg * kh * kw, oh * ow
    path = _path(dx.shape, w.shape, stride, pad, groups, "backward_data")
    if path == "winograd":            # a 3x3 convolution of dy with the turned filters
        winograd.convolve(dx, dy, w, True, 2 - pad, groups, None, False, workspace)
        return
    if path == "pointwise":
        wt = w.reshape(groups, fg, cg).transpose(0, 2, 1)
        np.matmul(wt, dy.reshape(n, groups, fg, p_out), out=dx.reshape(n, groups, cg, p_out))
        return
    nb, slices = _buffers(workspace, dx.shape, w.shape, stride, pad, groups)
    w2 = w.reshape(f, kg)

    def work(t, lo, hi):
        cols, dyt, _, _, packed = slices[t]
        for n0 in range(lo, hi, nb):
            m = min(nb, hi - n0)
            width = m * p_out
            src = _filter_major(dyt, dy, n0, m)
            for g in range(groups):
                np.matmul(w2[g * fg:(g + 1) * fg].T, src[g * fg:(g + 1) * fg, :width],
                          out=cols[g * kg:(g + 1) * kg, :width])
            target = dx[n0].reshape(-1) if m == 1 else packed
            k.col2im(target, cols, m, c, dx.shape[2], dx.shape[3], kh, kw, stride, pad, oh, ow)
            if m > 1:
                k.unpack_images(dx, packed, n0, m)

    workers.run(work, n, serial_blas=strategy.serial_blas(fg * kg * p_out))


@checks.checked(checks.conv2d_backward_weights, "cpu")
def conv2d_backward_weights(dw, db, dy, x, stride, pad, groups, workspace=None, stream=None):
    """dw (F,C/G,KH,KW), db (F,) <- dL/dw, dL/db.  Both overwritten, never accumulated.

    Each group's GEMM computes dw[g].T = cols[g] @ dyt[g].T, (K/G, F/G): OpenBLAS runs this
    orientation (the long nb*P reduction contiguous in both operands, a tall output) several
    times faster than dyt @ cols.T.  The workers' partial sums are transposed into dw at the end.
    """
    n, c, f, cg, kh, kw, oh, ow = strategy.geometry(x.shape, dw.shape, stride, pad, groups)
    fg, kg, p_out = f // groups, cg * kh * kw, oh * ow
    path = _path(x.shape, dw.shape, stride, pad, groups, "backward_weights")
    if path == "tap_rows":
        rows_path.backward_weights(dw, db, dy, x, pad, groups, workspace)
        return
    if path == "winograd":
        winograd_weights.backward_weights(dw, db, dy, x, pad, groups, workspace)
        return
    nb, slices = _buffers(workspace, x.shape, dw.shape, stride, pad, groups)

    def work(t, lo, hi):
        cols, dyt, part, tmp, packed = slices[t]
        for n0 in range(lo, hi, nb):
            m = min(nb, hi - n0)
            width = m * p_out
            _im2col(cols, packed, x, n0, m, kh, kw, stride, pad, oh, ow)
            src = _filter_major(dyt, dy, n0, m)
            target = part if n0 == lo else tmp
            for g in range(groups):
                block = slice(g * kg * fg, (g + 1) * kg * fg)
                np.matmul(cols[g * kg:(g + 1) * kg, :width], src[g * fg:(g + 1) * fg, :width].T,
                          out=target[block].reshape(kg, fg))
            if n0 != lo:
                part += tmp

    busy = workers.run(work, n, serial_blas=strategy.serial_blas(fg * kg * p_out))
    dw2 = dw.reshape(f, kg)
    for g in range(groups):
        block = slice(g * kg * fg, (g + 1) * kg * fg)
        rows = dw2[g * fg:(g + 1) * fg]
        rows[...] = slices[busy[0]][2][block].reshape(kg, fg).T
        for t in busy[1:]:
            rows += slices[t][2][block].reshape(kg, fg).T
    workers.for_ranges(k.bias_grad, dy.shape[1], db, dy, work=dy.size)
