"""im2col / col2im and the layout shuffles around the conv GEMMs, as Numba kernels.

The CPU convolution works on a *chunk* of ``nb`` images at a time.  Its images are first
packed with the image innermost (:func:`pack_images`; one image is used as it is), and its
column matrix has one row per (channel, tap) and one column per (output pixel, image)::

    cols[(c*KH + p)*KW + q, (i*OW + jj)*nb + j] = xp[n0 + j, c, i*stride + p, jj*stride + q]

with P = OH*OW and ``xp`` the zero-padded input.  Rows of one group's channels are a
contiguous block, so a group's GEMM is a slice; one GEMM covers the whole chunk, which keeps
the BLAS call wide enough where P is small (alexnet-mini's conv3..conv5 have P = 25).  With
the image innermost, a stride-1 im2col copies a chunk's output row as one run of OW*nb
floats where the image-outer order copied runs of OW: on 5x5 maps (runs of 5) that order
spent 4.3 ns per column element, 3x the GEMM after it; this one about 0.3 ns.  The GEMM
result is ``(F, P*nb)``, "filter-major"; :func:`scatter_bias_relu` turns it into NCHW with the
bias and ReLU fused in, and :func:`gather_filter_major` does the reverse for dy in the
backward pass; :func:`col2im` writes a packed chunk that :func:`unpack_images` returns to NCHW.

For stride 1, :func:`tap_rows` writes a smaller matrix with one row per (channel, kernel column)
and the padded input's rows as its blocks; kernel row p of the convolution is then a GEMM on
the contiguous column window starting at block p (see :mod:`nbalex.cpu.conv2d`).

The kernels are serial and release the GIL: the convolution runs one chunk per worker
thread at a time (:mod:`nbalex.cpu.workers`), and the whole-batch kernels at the end
(:func:`bias_grad`, :func:`add_bias_relu_nchw`) take a range of tasks each worker runs.
"""

import numpy as np
from numba import njit

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


# The kernels below address flat rows through the helpers just here, with unsigned offsets:
# Numba wraps a signed index that might be negative around, and that check on every access
# kept LLVM from vectorising the copies (views sliced per run instead cost more than the
# copy on 5x5 maps).  Unsigned offsets made im2col 3-5x faster (0.11-0.18 ns an element
# on alexnet-mini's chunks, 0.65-1.3 at batch 1).

@njit(inline="always", cache=True)
def _tap(k, kh, kw, h, w, stride, pad, oh, ow):
    """Row k = (c*KH + p)*KW + q of a column matrix: (c, p, q) and the output rows
    [lo_i, hi_i) and columns [lo_j, hi_j) whose tap falls inside the image."""
    taps = kh * kw
    c, p, q = k // taps, (k % taps) // kw, k % kw
    lo_i, hi_i = _valid_range(oh, h, p, stride, pad)
    lo_j, hi_j = _valid_range(ow, w, q, stride, pad)
    return c, p, q, lo_i, hi_i, lo_j, hi_j


@njit(inline="always", cache=True)
def _fill0(dst, d0, n):
    d = np.uint64(d0)
    for t in range(n):
        dst[d + np.uint64(t)] = 0.0


@njit(inline="always", cache=True)
def _copy(dst, d0, src, s0, n):
    d, s = np.uint64(d0), np.uint64(s0)
    for t in range(n):
        dst[d + np.uint64(t)] = src[s + np.uint64(t)]


@njit(inline="always", cache=True)
def _add(dst, d0, src, s0, n):
    d, s = np.uint64(d0), np.uint64(s0)
    for t in range(n):
        dst[d + np.uint64(t)] += src[s + np.uint64(t)]


@njit(inline="always", cache=True)
def _gather(dst, d0, src, s0, step, n):
    """dst[d0 + t] = src[s0 + t*step] for t < n."""
    d, s, e = np.uint64(d0), np.uint64(s0), np.uint64(step)
    for t in range(n):
        dst[d + np.uint64(t)] = src[s + np.uint64(t) * e]


@njit(inline="always", cache=True)
def _add_scattered(dst, d0, step, src, s0, n):
    """dst[d0 + t*step] += src[s0 + t] for t < n."""
    d, s, e = np.uint64(d0), np.uint64(s0), np.uint64(step)
    for t in range(n):
        dst[d + np.uint64(t) * e] += src[s + np.uint64(t)]


@njit(nogil=True, cache=True, error_model="numpy")
def pack_images(xt, x, n0, nb, pad=0, hp=0, wp=0):
    """xt[((c*HP + a)*WP + b)*nb + j] = x[n0 + j, c, a - pad, b - pad] for j < nb, zero
    outside x (written for a < HP, b < WP; HP, WP = 0: H, W): the chunk's images interleaved,
    image innermost, optionally zero-padded (Winograd's tiles read it so).  x (N, C, H, W),
    xt flat with C*HP*WP*nb elements."""
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    hp = hp if hp > 0 else h
    wp = wp if wp > 0 else w
    u, e = np.uint64, np.uint64(nb)
    if pad > 0 or hp != h or wp != w:
        _fill0(xt, 0, c_in * hp * wp * nb)
    for c in range(c_in):
        for j in range(nb):
            img = x[n0 + j, c].reshape(h * w)
            for a in range(h):
                d = u(((c * hp + a + pad) * wp + pad) * nb + j)
                s = u(a * w)
                for b in range(w):
                    xt[d + u(b) * e] = img[s + u(b)]


@njit(nogil=True, cache=True, error_model="numpy")
def unpack_images(x, xt, n0, nb):
    """The inverse of :func:`pack_images`: x[n0 + j, c, a, b] = xt[((c*H + a)*W + b)*nb + j]
    (images n0..n0+nb-1 of x overwritten)."""
    c_in, plane = x.shape[1], x.shape[2] * x.shape[3]
    for c in range(c_in):
        for j in range(nb):
            _gather(x[n0 + j, c].reshape(plane), 0, xt, c * plane * nb + j, nb, plane)


@njit(nogil=True, cache=True, error_model="numpy")
def im2col(cols, xt, nb, c_in, h, w, kh, kw, stride, pad, oh, ow):
    """Write ``cols[:, :P*nb]`` (K = C*KH*KW rows) from a packed chunk ``xt`` (see
    :func:`pack_images`; for one image, the image itself flattened).

    cols[(c*KH + p)*KW + q, (i*OW + jj)*nb + j] = xp[j, c, i*stride + p, jj*stride + q], zeros
    where the tap falls into the padding: every element of cols[:, :P*nb] is written.  With
    the images innermost, stride 1 copies whole output rows of the chunk, (OW - pad) * nb
    contiguous floats, in one loop; a strided convolution copies runs of nb (one image: a
    strided gather).
    """
    taps = kh * kw
    span = ow * nb
    for k in range(c_in * taps):
        c, p, q, lo_i, hi_i, lo_j, hi_j = _tap(k, kh, kw, h, w, stride, pad, oh, ow)
        row = cols[k]
        _fill0(row, 0, lo_i * span)
        _fill0(row, hi_i * span, (oh - hi_i) * span)
        for i in range(lo_i, hi_i):
            base = i * span
            first = (c * h + i * stride - pad + p) * w * nb
            a = lo_j * stride + q - pad               # first input column read
            _fill0(row, base, lo_j * nb)
            _fill0(row, base + hi_j * nb, (ow - hi_j) * nb)
            if stride == 1:
                _copy(row, base + lo_j * nb, xt, first + a * nb, (hi_j - lo_j) * nb)
            elif nb == 1:
                _gather(row, base + lo_j, xt, first + a, stride, hi_j - lo_j)
            else:
                for jj in range(lo_j, hi_j):
                    _copy(row, base + jj * nb, xt, first + (jj * stride + q - pad) * nb, nb)


def phase_width(w, stride):
    """Columns of one phase row of :func:`pack_phases`: ceil(W / stride)."""
    return -(-w // stride)


@njit(nogil=True, cache=True, error_model="numpy")
def pack_phases(xph, x, n, stride):
    """Image n of x (N, C, H, W), each row split into its ``stride`` column phases (written):
    xph[((c*H + a)*stride + r)*WP + b] = x[n, c, a, b*stride + r], WP = phase_width(W, stride).

    A strided convolution's tap then reads a contiguous run of one phase row, where it read
    every stride-th element of the image row (see :func:`im2col_phases`).
    """
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    wp = -(-w // stride)
    for c in range(c_in):
        for a in range(h):
            row = x[n, c, a]
            for r in range(min(stride, w)):
                _gather(xph, ((c * h + a) * stride + r) * wp, row, r, stride,
                        (w - r + stride - 1) // stride)


@njit(nogil=True, cache=True, error_model="numpy")
def im2col_phases(cols, xph, c_in, h, w, kh, kw, stride, pad, oh, ow):
    """:func:`im2col` of one image (nb = 1) from its :func:`pack_phases` form: the same
    ``cols[:, :P]``, every element written.  Tap (p, q) of output column jj reads input column
    jj*stride + q - pad = stride*(jj + d) + r, (d, r) = divmod(q - pad, stride): element jj + d
    of phase row r, so each output row is one contiguous copy (a strided gather ran at about
    1 ns per element on alexnet-mini's conv1)."""
    taps = kh * kw
    wp = -(-w // stride)
    for k in range(c_in * taps):
        c, p, q, lo_i, hi_i, lo_j, hi_j = _tap(k, kh, kw, h, w, stride, pad, oh, ow)
        d = (q - pad) // stride
        r = (q - pad) - d * stride
        row = cols[k]
        _fill0(row, 0, lo_i * ow)
        _fill0(row, hi_i * ow, (oh - hi_i) * ow)
        for i in range(lo_i, hi_i):
            base = i * ow
            _fill0(row, base, lo_j)
            _fill0(row, base + hi_j, ow - hi_j)
            first = ((c * h + i * stride - pad + p) * stride + r) * wp + d
            _copy(row, base + lo_j, xph, first + lo_j, hi_j - lo_j)


@njit(nogil=True, cache=True, error_model="numpy")
def col2im(dxt, cols, nb, c_in, h, w, kh, kw, stride, pad, oh, ow):
    """Overwrite the packed chunk ``dxt`` (layout of :func:`pack_images`) with the col2im of
    ``cols[:, :P*nb]``: every tap's column added back to the input pixel :func:`im2col` read
    it from, in increasing row order k (a fixed summation order)."""
    _fill0(dxt, 0, c_in * h * w * nb)
    taps = kh * kw
    span = ow * nb
    for k in range(c_in * taps):
        c, p, q, lo_i, hi_i, lo_j, hi_j = _tap(k, kh, kw, h, w, stride, pad, oh, ow)
        row = cols[k]
        for i in range(lo_i, hi_i):
            base = i * span
            first = (c * h + i * stride - pad + p) * w * nb
            a = lo_j * stride + q - pad
            if stride == 1:
                _add(dxt, first + a * nb, row, base + lo_j * nb, (hi_j - lo_j) * nb)
            elif nb == 1:
                _add_scattered(dxt, first + a, stride, row, base + lo_j, hi_j - lo_j)
            else:
                for jj in range(lo_j, hi_j):
                    _add(dxt, first + (jj * stride + q - pad) * nb, row, base + jj * nb, nb)


@njit(nogil=True, cache=True, error_model="numpy")
def tap_rows(rows, x, n, kw, pad, ow):
    """Write ``rows`` (C*KW, HP*OW), HP = H + 2*pad, from image n of x (N, C, H, W), stride 1.

    rows[c*KW + q, a*OW + j] = xp[n, c, a, j + q] with xp the zero-padded input, so that for
    kernel row p the window rows[:, p*OW : p*OW + OH*OW] is im2col's block of rows (c, p, q).
    One step per (channel, kernel column), each a run of row copies; every element written.
    """
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    top, bottom = pad * ow, (pad + h) * ow
    for task in range(c_in * kw):
        c = task // kw
        q = task % kw
        row = rows[task]
        img = x[n, c].reshape(h * w)
        lo, hi = _valid_range(ow, w, q, 1, pad)
        off = q - pad
        _fill0(row, 0, top)
        _fill0(row, bottom, row.shape[0] - bottom)
        for a in range(h):
            base = top + a * ow
            _fill0(row, base, lo)
            _copy(row, base + lo, img, a * w + lo + off, hi - lo)
            _fill0(row, base + hi, ow - hi)


@njit(nogil=True, cache=True, error_model="numpy")
def filters_by_kernel_row(wr, w, lo, hi):
    """wr[p, f, c*KW + q] = w[f, c, p, q] for filters lo <= f < hi (written): the kernel-row
    path's filters, wr (KH, F, C/G*KW), w (F, C/G, KH, KW).  (np.copyto of the transposed
    view took 1.35 ms for AlexNet's conv3, 40% of the layer at batch 1.)"""
    cg, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    for f in range(lo, hi):
        src = w[f].reshape(cg * kh * kw)
        for p in range(kh):
            dst = wr[p, f]
            for c in range(cg):
                _copy(dst, c * kw, src, (c * kh + p) * kw, kw)


@njit(nogil=True, cache=True, error_model="numpy")
def scatter_bias_relu(y, yt, b, n0, nb, relu):
    """y[n0+j, f, pix] = yt[f, pix*nb + j] + b[f], then max(., 0) if relu (a NaN kept, as
    np.maximum keeps it).  y (N, F, P) (the output map flattened), yt (F, >= P*nb).

    One step per (filter, image), each writing one output plane.
    """
    f_out, p_out = y.shape[1], y.shape[2]
    e = np.uint64(nb)
    for f in range(f_out):
        bias = b[f]
        src = yt[f]
        for j in range(nb):
            dst = y[n0 + j, f]
            s = np.uint64(j)
            for t in range(p_out):
                v = src[s + np.uint64(t) * e] + bias
                dst[t] = np.float32(0.0) if (relu and v < 0.0) else v


@njit(nogil=True, cache=True, error_model="numpy")
def gather_filter_major(dyt, dy, n0, nb):
    """dyt[f, pix*nb + j] = dy[n0+j, f, pix] for the chunk's nb images: the inverse layout
    change of :func:`scatter_bias_relu`.  dy (N, F, P)."""
    f_out, p_out = dy.shape[1], dy.shape[2]
    e = np.uint64(nb)
    for f in range(f_out):
        dst = dyt[f]
        for j in range(nb):
            src = dy[n0 + j, f]
            d = np.uint64(j)
            for t in range(p_out):
                dst[d + np.uint64(t) * e] = src[t]


@njit(nogil=True, cache=True, error_model="numpy")
def bias_relu_image(y, b, n, relu, lo, hi):
    """In place on image n, filters lo <= f < hi: y[n, f] += b[f], then max(., 0) if relu.
    y (N, F, OH, OW)."""
    p_out = y.shape[2] * y.shape[3]
    for f in range(lo, hi):
        plane = y[n, f].reshape(p_out)
        bias = b[f]
        for t in range(p_out):
            v = plane[t] + bias
            plane[t] = np.float32(0.0) if (relu and v < 0.0) else v


@njit(nogil=True, cache=True, error_model="numpy")
def bias_grad(db, dy, lo, hi):
    """db[f] = sum over n, i, j of dy[n, f, i, j] (overwritten), summed in float64, for
    lo <= f < hi.

    Eight running sums, element t of a plane going to sum t % 8 (the tail of a plane to the
    first), added pairwise at the end: a fixed order, and one that vectorises, where a single
    float64 running sum waits on each add (6.4 ms for AlexNet's conv1 gradient at batch 32).
    """
    n = dy.shape[0]
    p_out = dy.shape[2] * dy.shape[3]
    blocks = p_out // 8
    for f in range(lo, hi):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        for i in range(n):
            plane = dy[i, f].reshape(p_out)
            for blk in range(blocks):
                t = np.uint64(blk) * np.uint64(8)
                a0 += plane[t]
                a1 += plane[t + np.uint64(1)]
                a2 += plane[t + np.uint64(2)]
                a3 += plane[t + np.uint64(3)]
                a4 += plane[t + np.uint64(4)]
                a5 += plane[t + np.uint64(5)]
                a6 += plane[t + np.uint64(6)]
                a7 += plane[t + np.uint64(7)]
            for t in range(blocks * 8, p_out):
                a0 += plane[np.uint64(t)]
        db[f] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(nogil=True, cache=True, error_model="numpy")
def add_bias_relu_nchw(y, b, relu, lo, hi):
    """In place: y[n, f] += b[f], then max(., 0) if relu, for the planes lo <= n*F + f < hi.
    y (N, F, OH, OW)."""
    f_out = y.shape[1]
    p_out = y.shape[2] * y.shape[3]
    for task in range(lo, hi):
        f = task % f_out
        plane = y[task // f_out, f].reshape(p_out)
        bias = b[f]
        for t in range(p_out):
            v = plane[t] + bias
            plane[t] = np.float32(0.0) if (relu and v < 0.0) else v
