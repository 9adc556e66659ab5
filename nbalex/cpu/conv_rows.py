"""The kernel-row path of the CPU convolution (stride 1, maps larger than 12x12; which passes
take it is :mod:`nbalex.cpu.conv_strategy`'s choice), one image at a time, where BLAS's
``cblas_sgemm`` is reachable (:func:`nbalex.cpu.openblas.gemm`).

``rows = tap_rows(x[n])`` is (C*KW, HP*OW), KH times smaller than im2col's column matrix, and
for kernel row p its window ``rows[:, p*OW : p*OW + P]`` is the column matrix's block of rows
(c, p, q) (layout in :mod:`nbalex.cpu.im2col`)::

    forward          y[n][g] (+)= wr[p, g] @ window_p(rows[g])        for p < KH, into y[n]
    backward weights acc[p, g] (+)= window_p(rows[g]) @ dy[n][g].T     (C/G*KW, F/G)

``wr[p]`` (F, C/G*KW) holds the filters' kernel row p, rearranged once per call into a
shared part of the workspace.  The KH GEMMs accumulate (beta = 1), so y[n] is written in
place, and the matrix a worker touches fits its L2 cache.  (Its backward-data form, KH GEMMs
into overlapping windows then KW shifted adds, lost to im2col once im2col's copies
vectorised: AlexNet's conv2 58.6 -> 55.3 ms, conv3 40.7 -> 34.3 ms at batch 32.)
"""

import numpy as np

from nbalex.backends import host_array, workspace_view

from . import conv_strategy as strategy
from . import im2col as k
from . import openblas
from . import workers


def _sizes(x_shape, w_shape, pad, groups):
    """(filters' size, rows size, accumulator size) of the kernel-row path, float32 elements.

    ``rows`` holds tap_rows of x; the accumulator is one worker's dw partial sum.
    """
    n, c, f, cg, kh, kw, oh, ow = strategy.geometry(x_shape, w_shape, 1, pad, groups)
    rows = c * kw * (x_shape[2] + 2 * pad) * ow
    return f * cg * kh * kw, rows, f * cg * kh * kw


def workspace_size(x_shape, w_shape, pad, groups):
    """float32 elements: the rearranged filters, then per worker its tap_rows matrix and a
    dw-sized accumulator."""
    filters, rows, acc = _sizes(x_shape, w_shape, pad, groups)
    return filters + workers.WORKERS * (rows + acc)


def _buffers(workspace, x_shape, w_shape, pad, groups):
    """(filters, [(rows, acc)] per worker) flat slices of the workspace (or allocated)."""
    workspace = workspace_view(workspace, workspace_size(x_shape, w_shape, pad, groups), host_array)
    filters, rows, acc = _sizes(x_shape, w_shape, pad, groups)
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


def _plan(x_shape, w_shape, pad, groups, workspace):
    """What the passes share: the sizes (c, f, kh, kw, fg = F/G, kq = C/G*KW,
    ow, p_out = OH*OW, span = padded H * OW), and the workspace as _buffers carves it."""
    n, c, f, cg, kh, kw, oh, ow = strategy.geometry(x_shape, w_shape, 1, pad, groups)
    sizes = (c, f, kh, kw, f // groups, cg * kw, ow, oh * ow, (x_shape[2] + 2 * pad) * ow)
    return sizes, *_buffers(workspace, x_shape, w_shape, pad, groups)


def forward(y, x, w, b, pad, groups, relu, workspace):
    """conv2d_forward, stride 1: per image tap_rows, KH accumulating GEMMs into y[n], bias."""
    (c, f, kh, kw, fg, kq, ow, p_out, span), filters, slices = _plan(
        x.shape, w.shape, pad, groups, workspace)
    wr = _filters_by_kernel_row(filters, w)

    def image(rows, n, lo, hi):
        """Filters lo..hi-1 of image n, from its tap_rows already in ``rows``."""
        out = y[n].reshape(f, p_out)
        for g, f0, f1 in strategy.group_parts(lo, hi, fg):
            block = rows[g * kq:(g + 1) * kq]
            for p in range(kh):
                openblas.gemm(wr[p, f0:f1], block[:, p * ow:p * ow + p_out], out[f0:f1],
                             0.0 if p == 0 else 1.0)
        k.bias_relu_image(y, b, n, relu, lo, hi)

    def work(t, lo, hi):
        rows = slices[t][0][:c * kw * span].reshape(c * kw, span)
        for n in range(lo, hi):
            k.tap_rows(rows, x, n, kw, pad, ow)
            image(rows, n, 0, f)

    if strategy.split_filters(x.shape[0], fg * kq * p_out):
        rows = slices[0][0][:c * kw * span].reshape(c * kw, span)
        k.tap_rows(rows, x, 0, kw, pad, ow)
        workers.run(lambda t, lo, hi: image(rows, 0, lo, hi), f)
        return
    workers.run(work, x.shape[0], serial_blas=strategy.serial_blas(fg * kq * p_out))


def backward_weights(dw, db, dy, x, pad, groups, workspace):
    """conv2d_backward_weights, stride 1: each worker sums its images' (C/G*KW, F/G) GEMMs per
    kernel row and group into its accumulator; the calling thread adds them up into dw."""
    (c, f, kh, kw, fg, kq, ow, p_out, span), _, slices = _plan(
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
                    openblas.gemm(block[:, p * ow:p * ow + p_out], d[g * fg:(g + 1) * fg],
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
