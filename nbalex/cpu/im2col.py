"""im2col / col2im and the layout shuffles around the conv GEMMs, as Numba kernels.

The CPU convolution works on a *chunk* of ``nb`` images at a time.  Its column matrix has one
row per (channel, tap) and one column per (image in the chunk, output pixel)::

    cols[(c*KH + p)*KW + q, j*P + i*OW + jj] = xp[n0 + j, c, i*stride + p, jj*stride + q]

with P = OH*OW and ``xp`` the zero-padded input.  Rows of one group's channels are a
contiguous block, so a group's GEMM is a slice; one GEMM covers the whole chunk, which keeps
the BLAS call wide enough where P is small (conv3..conv5 have P = 169).  The GEMM result is
``(F, nb*P)``, "filter-major"; :func:`scatter_bias_relu` turns it into NCHW with the bias and
ReLU fused in, and :func:`gather_filter_major` does the reverse for dy in the backward pass.

For stride 1, :func:`tap_rows` writes a smaller matrix with one row per (channel, kernel column)
and the padded input's rows as its blocks; kernel row p of the convolution is then a GEMM on
the contiguous column window starting at block p (see :mod:`nbalex.cpu.conv2d`).

The per-chunk kernels are serial and release the GIL: the convolution runs one chunk per
worker thread at a time (:mod:`nbalex.cpu.workers`).  The whole-batch kernels at the end
(:func:`bias_grad`, :func:`add_bias_relu_nchw`) are parallel and run on the calling thread.
"""

import numpy as np
from numba import njit, prange

from . import threads  # noqa: F401  (picks the threading layer before any kernel runs)


@njit(cache=True, inline="always")
def _valid_range(out_len, in_len, tap, stride, pad):
    """First and one-past-last output index o with 0 <= o*stride - pad + tap < in_len."""
    lo = 0
    if pad - tap > 0:
        lo = (pad - tap + stride - 1) // stride
    hi = 0
    if in_len + pad - tap > 0:
        hi = (in_len + pad - tap - 1) // stride + 1
    if hi > out_len:
        hi = out_len
    if lo > hi:
        lo = hi
    return lo, hi


@njit(nogil=True, cache=True)
def im2col(cols, x, n0, nb, kh, kw, stride, pad, oh, ow):
    """Write ``cols`` (K, nb*P), K = C*KH*KW, from images n0..n0+nb-1 of x (N, C, H, W).

    One step per (row k, image j): it writes the P columns of image j in row k,
    zeros where the tap falls into the padding.  Every element of cols[:, :nb*P] is written.
    Each output row is a slice copy (unit stride when stride == 1), which Numba vectorises.
    """
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    p_out = oh * ow
    taps = kh * kw
    for task in range(c_in * taps * nb):
        k = task // nb
        j = task % nb
        c = k // taps
        p = (k % taps) // kw
        q = k % kw
        row = cols[k, j * p_out:(j + 1) * p_out]
        img = x[n0 + j, c]
        lo_i, hi_i = _valid_range(oh, h, p, stride, pad)
        lo_j, hi_j = _valid_range(ow, w, q, stride, pad)
        row[:lo_i * ow] = 0.0
        row[hi_i * ow:] = 0.0
        off = q - pad
        for i in range(lo_i, hi_i):
            base = i * ow
            src = img[i * stride - pad + p]
            row[base:base + lo_j] = 0.0
            if stride == 1:
                row[base + lo_j:base + hi_j] = src[lo_j + off:hi_j + off]
            else:
                row[base + lo_j:base + hi_j] = src[lo_j * stride + off:(hi_j - 1) * stride + off + 1:stride]
            row[base + hi_j:base + ow] = 0.0


@njit(nogil=True, cache=True)
def tap_rows(rows, x, n, kw, pad, ow):
    """Write ``rows`` (C*KW, HP*OW), HP = H + 2*pad, from image n of x (N, C, H, W), stride 1.

    rows[c*KW + q, a*OW + j] = xp[n, c, a, j + q] with xp the zero-padded input, so that for
    kernel row p the window rows[:, p*OW : p*OW + OH*OW] is im2col's block of rows (c, p, q).
    One step per (channel, kernel column), each a run of slice copies; every element written.
    """
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    top, bottom = pad * ow, (pad + h) * ow
    for task in range(c_in * kw):
        c = task // kw
        q = task % kw
        row = rows[task]
        img = x[n, c]
        lo, hi = _valid_range(ow, w, q, 1, pad)
        off = q - pad
        row[:top] = 0.0
        row[bottom:] = 0.0
        for a in range(h):
            base = top + a * ow
            row[base:base + lo] = 0.0
            row[base + lo:base + hi] = img[a, lo + off:hi + off]
            row[base + hi:base + ow] = 0.0


@njit(nogil=True, cache=True)
def tap_rows_adjoint(dx, rows, n, kw, pad, ow):
    """Overwrite image n of dx (N, C, H, W) with the adjoint of :func:`tap_rows` applied to rows.

    dx[n, c, a, b] = sum over q of rows[c*KW + q, (a + pad)*OW + b + pad - q] (valid terms only):
    every entry of rows that tap_rows would have read from x[n, c, a, b] is added back to it.
    One step per channel, each zeroing and then accumulating its own plane.
    """
    c_in, h, w = dx.shape[1], dx.shape[2], dx.shape[3]
    top = pad * ow
    for c in range(c_in):
        plane = dx[n, c]
        plane[:, :] = 0.0
        for q in range(kw):
            row = rows[c * kw + q]
            lo, hi = _valid_range(ow, w, q, 1, pad)
            off = q - pad
            for a in range(h):
                base = top + a * ow
                src = row[base + lo:base + hi]
                dst = plane[a, lo + off:hi + off]
                for t in range(src.shape[0]):
                    dst[t] += src[t]


@njit(nogil=True, cache=True)
def col2im(dx, cols, n0, nb, kh, kw, stride, pad, oh, ow):
    """Overwrite images n0..n0+nb-1 of dx (N, C, H, W) with the col2im of ``cols`` (K, nb*P).

    One step per (image j, channel c): it zeroes its dx plane, then adds every tap's column
    back to the input pixel the tap read.  Chunks of different workers touch different images.
    """
    c_in, h, w = dx.shape[1], dx.shape[2], dx.shape[3]
    p_out = oh * ow
    for task in range(nb * c_in):
        j = task // c_in
        c = task % c_in
        plane = dx[n0 + j, c]
        plane[:, :] = 0.0
        for p in range(kh):
            lo_i, hi_i = _valid_range(oh, h, p, stride, pad)
            for q in range(kw):
                lo_j, hi_j = _valid_range(ow, w, q, stride, pad)
                if hi_j <= lo_j:
                    continue
                row = cols[(c * kh + p) * kw + q, j * p_out:(j + 1) * p_out]
                off = q - pad
                for i in range(lo_i, hi_i):
                    src = row[i * ow + lo_j:i * ow + hi_j]
                    if stride == 1:
                        dst = plane[i - pad + p, lo_j + off:hi_j + off]
                    else:
                        dst = plane[i * stride - pad + p,
                                    lo_j * stride + off:(hi_j - 1) * stride + off + 1:stride]
                    for t in range(src.shape[0]):
                        dst[t] += src[t]


@njit(nogil=True, cache=True)
def scatter_bias_relu(y, yt, b, n0, nb, relu):
    """y[n0+j, f, :] = yt[f, j*P:(j+1)*P] + b[f], then max(., 0) if relu (a NaN kept, as
    np.maximum keeps it).  y (N,F,OH,OW).

    One step per (image j, filter f), each writing one output plane.
    """
    f_out = y.shape[1]
    p_out = y.shape[2] * y.shape[3]
    for task in range(nb * f_out):
        j = task // f_out
        f = task % f_out
        dst = y[n0 + j, f].reshape(p_out)
        src = yt[f, j * p_out:(j + 1) * p_out]
        bias = b[f]
        if relu:
            for t in range(p_out):
                v = src[t] + bias
                dst[t] = np.float32(0.0) if v < 0.0 else v
        else:
            for t in range(p_out):
                dst[t] = src[t] + bias


@njit(nogil=True, cache=True)
def gather_filter_major(dyt, dy, n0, nb):
    """dyt[f, j*P:(j+1)*P] = dy[n0+j, f] flattened, for the chunk's nb images.  dy (N,F,OH,OW).

    The inverse layout change of :func:`scatter_bias_relu`; one step per (image, filter).
    """
    f_out = dy.shape[1]
    p_out = dy.shape[2] * dy.shape[3]
    for task in range(nb * f_out):
        j = task // f_out
        f = task % f_out
        src = dy[n0 + j, f].reshape(p_out)
        dyt[f, j * p_out:(j + 1) * p_out] = src


@njit(nogil=True, cache=True)
def bias_relu_image(y, b, n, relu):
    """In place on image n only: y[n, f] += b[f], then max(., 0) if relu.  y (N, F, OH, OW)."""
    f_out = y.shape[1]
    p_out = y.shape[2] * y.shape[3]
    for f in range(f_out):
        plane = y[n, f].reshape(p_out)
        bias = b[f]
        for t in range(p_out):
            v = plane[t] + bias
            plane[t] = np.float32(0.0) if (relu and v < 0.0) else v


@njit(parallel=True, cache=True)
def bias_grad(db, dy):
    """db[f] = sum over n, i, j of dy[n, f, i, j] (overwritten), summed in float64."""
    n, f_out = dy.shape[0], dy.shape[1]
    p_out = dy.shape[2] * dy.shape[3]
    for f in prange(f_out):
        acc = 0.0
        for i in range(n):
            plane = dy[i, f].reshape(p_out)
            for t in range(p_out):
                acc += plane[t]
        db[f] = acc


@njit(parallel=True, cache=True)
def add_bias_relu_nchw(y, b, relu):
    """In place: y[n, f] += b[f], then max(., 0) if relu.  y (N, F, OH, OW)."""
    n, f_out = y.shape[0], y.shape[1]
    p_out = y.shape[2] * y.shape[3]
    for task in prange(n * f_out):
        f = task % f_out
        plane = y[task // f_out, f].reshape(p_out)
        bias = b[f]
        for t in range(p_out):
            v = plane[t] + bias
            plane[t] = np.float32(0.0) if (relu and v < 0.0) else v
