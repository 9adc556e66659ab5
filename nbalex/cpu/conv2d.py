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

Stride-1 convolutions on maps larger than 12x12 other than the pointwise one can take a
leaner path for some passes (AlexNet's conv2 forward, conv2..conv5 backward weights; which
pass of which shape is :mod:`nbalex.cpu.conv_strategy`'s choice), one image at a time, where
BLAS's ``cblas_sgemm`` is reachable
(:func:`nbalex.cpu.workers.gemm`); ``rows = tap_rows(x[n])`` is (C*KW, HP*OW), KH times
smaller than cols, and for kernel row p its window ``rows[:, p*OW : p*OW + P]`` is cols'
block of rows (c, p, q) (layout in :mod:`nbalex.cpu.im2col`)::

    forward          y[n][g] (+)= wr[p, g] @ window_p(rows[g])        for p < KH, into y[n]
    backward data    window_p(rows[g]) (+)= wr[p, g].T @ dy[n][g]      overlapping windows,
                     dx[n] = tap_rows_adjoint(rows)                    then KW shifted adds
    backward weights acc[p, g] (+)= window_p(rows[g]) @ dy[n][g].T     (C/G*KW, F/G)

``wr[p]`` (F, C/G*KW) holds the filters' kernel row p, rearranged once per call on the
calling thread into a shared part of the workspace.  The KH GEMMs accumulate (beta = 1), so
y[n] is written in place, col2im becomes KW adds per element, and the column matrix a worker
touches fits its L2 cache.  AlexNet at batch 32 on the 2-core EPYC, median ms, im2col path ->
kernel-row path: forward conv2 100 -> 85, conv4 52 -> 50, conv5 40 -> 38; backward data
conv2 87 -> 75, conv4 46 -> 42; backward weights conv2 102 -> 87, conv3 72 -> 57,
conv4 55 -> 47, conv5 41 -> 32.  (A direct "transposed convolution as a convolution" of
padded dy with the flipped filters was slower for backward data: conv2 94 ms, its GEMMs
only C/G = 48 rows tall.)
"""

import numpy as np

from nbalex import checks
from nbalex.backends import host_array, workspace_view

from . import conv_strategy as strategy
from . import im2col as k
from . import winograd
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


def output_size(size, kernel, stride, pad):
    """floor((size + 2*pad - kernel) / stride) + 1."""
    return (size + 2 * pad - kernel) // stride + 1


def _geometry(x_shape, w_shape, stride, pad, groups):
    """(N, C, F, C/G, KH, KW, OH, OW), the rules checked by nbalex.checks.conv2d_geometry."""
    n, c, _, _, f, cg, kh, kw, oh, ow = checks.conv2d_geometry(x_shape, w_shape, stride, pad,
                                                              groups)
    return n, c, f, cg, kh, kw, oh, ow


def chunk_images(n, rows, p_out, stride=2):
    """Images per chunk: enough for TARGET_WIDTH columns (STRIDE1_WIDTH for stride 1), within
    COLS_BUDGET, in [1, n]."""
    wanted = -(-(STRIDE1_WIDTH if stride == 1 else TARGET_WIDTH) // p_out)
    return max(1, min(n, wanted, COLS_BUDGET // max(1, rows * p_out)))


def _path(x_shape, w_shape, stride, pad, groups, pass_):
    """The path :func:`nbalex.cpu.conv_strategy.choose` picks for the shape and pass."""
    _, _, _, _, kh, kw, oh, ow = _geometry(x_shape, w_shape, stride, pad, groups)
    return strategy.choose(oh, ow, kh, kw, stride, pad, workers.gemm is not None, pass_,
                           x_shape[0])


def _tap_sizes(x_shape, w_shape, pad, groups):
    """(filters' size, rows size, accumulator size) of the kernel-row path, float32 elements.

    ``rows`` holds tap_rows of x (forward, backward weights) or its gradient (backward data);
    the accumulator is one worker's dw partial sum.
    """
    n, c, f, cg, kh, kw, oh, ow = _geometry(x_shape, w_shape, 1, pad, groups)
    rows = c * kw * (x_shape[2] + 2 * pad) * ow
    return f * cg * kh * kw, rows, f * cg * kh * kw


def _per_worker(x_shape, w_shape, stride, pad, groups):
    """(nb, cols size, yt size, dw size, packed chunk size) of one worker's workspace slice."""
    n, c, f, cg, kh, kw, oh, ow = _geometry(x_shape, w_shape, stride, pad, groups)
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
        filters, rows, acc = _tap_sizes(x_shape, w_shape, pad, groups)
        size = filters + workers.WORKERS * (rows + acc)
    if "im2col" in paths:
        _, cols, yt, dw, packed = _per_worker(x_shape, w_shape, stride, pad, groups)
        size = max(size, workers.WORKERS * (cols + yt + 2 * dw + packed))
    if "winograd" in paths:
        n, c, f, _, _, _, oh, ow = _geometry(x_shape, w_shape, stride, pad, groups)
        size = max(size, winograd.workspace_size(n, c, f, groups, oh, ow, workers.WORKERS),
                   winograd.workspace_size(n, f, c, groups, x_shape[2], x_shape[3],
                                           workers.WORKERS))
    return size


def _buffers(workspace, x_shape, w_shape, stride, pad, groups):
    """nb and, per worker, (cols, yt, part, tmp, packed) carved out of the workspace (or
    allocated)."""
    n, c, f, cg, kh, kw, oh, ow = _geometry(x_shape, w_shape, stride, pad, groups)
    nb, cols_size, yt_size, dw_size, packed = _per_worker(x_shape, w_shape, stride, pad, groups)
    size = conv2d_workspace_size(x_shape, w_shape, stride, pad, groups)
    workspace = workspace_view(workspace, size, host_array)
    per = size // workers.WORKERS
    ends = np.cumsum([cols_size, yt_size, dw_size, dw_size, packed])
    slices = []
    for t in range(workers.WORKERS):
        base = workspace[t * per:(t + 1) * per]
        cols = base[:ends[0]].reshape(c * kh * kw, -1)
        yt = base[ends[0]:ends[1]].reshape(f, -1)
        slices.append((cols, yt, base[ends[1]:ends[2]], base[ends[2]:ends[3]],
                       base[ends[3]:ends[4]]))
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


def _tap_buffers(workspace, x_shape, w_shape, pad, groups):
    """(filters, [(rows, acc)] per worker) flat slices of the workspace (or allocated)."""
    workspace = workspace_view(workspace, conv2d_workspace_size(x_shape, w_shape, 1, pad, groups),
                               host_array)
    filters, rows, acc = _tap_sizes(x_shape, w_shape, pad, groups)
    per = rows + acc
    slices = []
    for t in range(workers.WORKERS):
        base = workspace[filters + t * per:filters + (t + 1) * per]
        slices.append((base[:rows], base[rows:]))
    return workspace[:filters], slices


def _filters_by_kernel_row(filters, w):
    """wr (KH, F, C/G*KW) in the workspace: wr[p, f, c*KW + q] = w[f, c, p, q]."""
    f, cg, kh, kw = w.shape
    wr = filters.reshape(kh, f, cg * kw)
    workers.for_ranges(k.filters_by_kernel_row, f, wr, w, work=w.size)
    return wr


def _tap_plan(x_shape, w_shape, pad, groups, workspace):
    """What the three stride-1 passes share: the sizes (c, f, kh, kw, fg = F/G, kq = C/G*KW,
    ow, p_out = OH*OW, span = padded H * OW), and the workspace as _tap_buffers carves it."""
    n, c, f, cg, kh, kw, oh, ow = _geometry(x_shape, w_shape, 1, pad, groups)
    sizes = (c, f, kh, kw, f // groups, cg * kw, ow, oh * ow, (x_shape[2] + 2 * pad) * ow)
    return sizes, *_tap_buffers(workspace, x_shape, w_shape, pad, groups)


def _split_filters(n, gemm_macs):
    """Whether a batch of one image shares its filters between the workers (each with
    single-threaded BLAS, one handoff per call) instead of threading each GEMM's BLAS: the
    images cannot be shared, and OpenBLAS's threads cost a handoff per GEMM.  AlexNet at
    batch 1 (2-core Xeon), forward ms, threaded BLAS -> filters split: conv2 4.1 -> 2.6,
    conv4 3.1 -> 1.7 (with the filters rearranged by a kernel of their own)."""
    return n == 1 and workers.WORKERS > 1 and not strategy.serial_blas(gemm_macs)


def _group_parts(lo, hi, fg):
    """(group, first, end) of the filters lo..hi-1 in each group they touch (fg a group)."""
    return [(g, max(lo, g * fg), min(hi, (g + 1) * fg)) for g in range(lo // fg, -(-hi // fg))]


def _tap_forward(y, x, w, b, pad, groups, relu, workspace):
    """conv2d_forward, stride 1: per image tap_rows, KH accumulating GEMMs into y[n], bias."""
    (c, f, kh, kw, fg, kq, ow, p_out, span), filters, slices = _tap_plan(
        x.shape, w.shape, pad, groups, workspace)
    wr = _filters_by_kernel_row(filters, w)

    def image(rows, n, lo, hi):
        """Filters lo..hi-1 of image n, from its tap_rows already in ``rows``."""
        out = y[n].reshape(f, p_out)
        for g, f0, f1 in _group_parts(lo, hi, fg):
            block = rows[g * kq:(g + 1) * kq]
            for p in range(kh):
                workers.gemm(wr[p, f0:f1], block[:, p * ow:p * ow + p_out], out[f0:f1],
                             0.0 if p == 0 else 1.0)
        k.bias_relu_image(y, b, n, relu, lo, hi)

    def work(t, lo, hi):
        rows = slices[t][0][:c * kw * span].reshape(c * kw, span)
        for n in range(lo, hi):
            k.tap_rows(rows, x, n, kw, pad, ow)
            image(rows, n, 0, f)

    if _split_filters(x.shape[0], fg * kq * p_out):
        rows = slices[0][0][:c * kw * span].reshape(c * kw, span)
        k.tap_rows(rows, x, 0, kw, pad, ow)
        workers.run(lambda t, lo, hi: image(rows, 0, lo, hi), f)
        return
    workers.run(work, x.shape[0], serial_blas=strategy.serial_blas(fg * kq * p_out))


def _tap_backward_data(dx, dy, w, pad, groups, workspace):
    """conv2d_backward_data, stride 1: per image KH GEMMs into overlapping windows of rows,
    then tap_rows_adjoint writes dx[n]."""
    (c, f, kh, kw, fg, kq, ow, p_out, span), filters, slices = _tap_plan(
        dx.shape, w.shape, pad, groups, workspace)
    wr = _filters_by_kernel_row(filters, w)

    def work(t, lo, hi):
        rows = slices[t][0][:c * kw * span].reshape(c * kw, span)
        for n in range(lo, hi):
            d = dy[n].reshape(f, p_out)
            rows[:, p_out:] = 0.0            # only the p > 0 windows reach past column P
            for g in range(groups):
                block = rows[g * kq:(g + 1) * kq]
                for p in range(kh):
                    workers.gemm(wr[p, g * fg:(g + 1) * fg], d[g * fg:(g + 1) * fg],
                                 block[:, p * ow:p * ow + p_out], 0.0 if p == 0 else 1.0,
                                 trans_a=True)
            k.tap_rows_adjoint(dx, rows, n, kw, pad, ow)

    workers.run(work, dx.shape[0], serial_blas=strategy.serial_blas(fg * kq * p_out))


def _tap_backward_weights(dw, db, dy, x, pad, groups, workspace):
    """conv2d_backward_weights, stride 1: each worker sums its images' (C/G*KW, F/G) GEMMs per
    kernel row and group into its accumulator; the calling thread adds them up into dw."""
    (c, f, kh, kw, fg, kq, ow, p_out, span), _, slices = _tap_plan(
        x.shape, dw.shape, pad, groups, workspace)
    n, cg = x.shape[0], dw.shape[1]

    def work(t, lo, hi):
        flat_rows, flat_acc = slices[t]
        rows = flat_rows[:c * kw * span].reshape(c * kw, span)
        acc = flat_acc.reshape(kh, groups, kq, fg)
        for i in range(lo, hi):
            k.tap_rows(rows, x, i, kw, pad, ow)
            d = dy[i].reshape(f, p_out)
            for g in range(groups):
                block = rows[g * kq:(g + 1) * kq]
                for p in range(kh):
                    workers.gemm(block[:, p * ow:p * ow + p_out], d[g * fg:(g + 1) * fg],
                                 acc[p, g], 0.0 if i == lo else 1.0, trans_b=True)

    busy = workers.run(work, n, serial_blas=strategy.serial_blas(fg * kq * p_out))
    dw5 = dw.reshape(groups, fg, cg, kh, kw)
    for j, t in enumerate(busy):
        part = slices[t][1].reshape(kh, groups, cg, kw, fg).transpose(1, 4, 2, 0, 3)
        if j == 0:
            np.copyto(dw5, part)
        else:
            dw5 += part
    workers.for_ranges(k.bias_grad, dy.shape[1], db, dy, work=dy.size)


def _filter_major(dyt, dy, n0, m):
    """dy's chunk as (F, P*m): a view of dy itself for one image, else gathered into dyt."""
    if m == 1:
        return dy[n0].reshape(dy.shape[1], -1)
    k.gather_filter_major(dyt, dy.reshape(dy.shape[0], dy.shape[1], -1), n0, m)
    return dyt


@checks.checked(checks.conv2d_forward, "cpu")
def conv2d_forward(y, x, w, b, stride, pad, groups, relu=False, workspace=None, stream=None):
    """y (N,F,OH,OW) <- conv(x, w) + b, then max(y, 0) if ``relu``.  y is overwritten."""
    n, c, f, cg, kh, kw, oh, ow = _geometry(x.shape, w.shape, stride, pad, groups)
    fg, kg, p_out = f // groups, cg * kh * kw, oh * ow
    path = _path(x.shape, w.shape, stride, pad, groups, "forward")
    if path == "pointwise":
        wg = w.reshape(groups, fg, cg)
        np.matmul(wg, x.reshape(n, groups, cg, p_out), out=y.reshape(n, groups, fg, p_out))
        workers.for_ranges(k.add_bias_relu_nchw, n * f, y, b, relu, work=y.size)
        return
    if path == "tap_rows":
        _tap_forward(y, x, w, b, pad, groups, relu, workspace)
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

    if _split_filters(n, fg * kg * p_out):
        cols, _, _, _, packed = slices[0]
        _im2col(cols, packed, x, 0, 1, kh, kw, stride, pad, oh, ow)
        out = y[0].reshape(f, p_out)

        def filters(t, lo, hi):
            for g, f0, f1 in _group_parts(lo, hi, fg):
                np.matmul(w2[f0:f1], cols[g * kg:(g + 1) * kg, :p_out], out=out[f0:f1])
            k.bias_relu_image(y, b, 0, relu, lo, hi)

        workers.run(filters, f)
        return
    workers.run(work, n, serial_blas=strategy.serial_blas(fg * kg * p_out))


@checks.checked(checks.conv2d_backward_data, "cpu")
def conv2d_backward_data(dx, dy, w, stride, pad, groups, workspace=None, stream=None):
    """dx (N,C,H,W) <- dL/dx given dy (N,F,OH,OW).  dx is overwritten."""
    n, c, f, cg, kh, kw, oh, ow = _geometry(dx.shape, w.shape, stride, pad, groups)
    fg, kg, p_out = f // groups, cg * kh * kw, oh * ow
    path = _path(dx.shape, w.shape, stride, pad, groups, "backward_data")
    if path == "winograd":            # a 3x3 convolution of dy with the turned filters
        winograd.convolve(dx, dy, w, True, 2 - pad, groups, None, False, workspace)
        return
    if path == "pointwise":
        wt = w.reshape(groups, fg, cg).transpose(0, 2, 1)
        np.matmul(wt, dy.reshape(n, groups, fg, p_out), out=dx.reshape(n, groups, cg, p_out))
        return
    if path == "tap_rows":
        _tap_backward_data(dx, dy, w, pad, groups, workspace)
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
    n, c, f, cg, kh, kw, oh, ow = _geometry(x.shape, dw.shape, stride, pad, groups)
    fg, kg, p_out = f // groups, cg * kh * kw, oh * ow
    path = _path(x.shape, dw.shape, stride, pad, groups, "backward_weights")
    if path == "tap_rows":
        _tap_backward_weights(dw, db, dy, x, pad, groups, workspace)
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
