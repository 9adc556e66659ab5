"""Local response normalisation across channels on the CPU (parallel Numba kernels).

The contract (``nbalex.backends``), half = size // 2, windows clipped at the channel edges::

    scale[n, c] = k + alpha * sum_{c' in [c-half, c+half]} x[n, c']**2
    y[n, c]     = x[n, c] * scale[n, c]**(-beta)
    dx[n, c]    = dy[n, c] * scale[n, c]**(-beta)
                  - 2*alpha*beta * x[n, c] * sum_{j in [c-half, c+half]} dy[n, j]*y[n, j]/scale[n, j]

One parallel task per (n, c) plane; the few neighbouring planes it reads stay in cache.
beta = 0.75 (the paper's value) takes a pow-free path: s**-0.75 = r * sqrt(r), r = 1/sqrt(s).
"""

import math

from numba import njit, prange

from . import threads  # noqa: F401  (picks the threading layer before any kernel runs)


@njit(inline="always", fastmath=True, cache=True)
def _neg_pow(s, beta, three_quarters):
    if three_quarters:
        r = 1.0 / math.sqrt(s)
        return r * math.sqrt(r)
    return s ** (-beta)


@njit(parallel=True, fastmath=True, cache=True)
def lrn_forward_kernel(y, scale, x, half, alpha, beta, k, three_quarters):
    """x, y, scale (N, C, P): write scale[n, c, :] and y[n, c, :], one task per (n, c)."""
    n_img, channels, plane = x.shape
    for task in prange(n_img * channels):
        n = task // channels
        c = task % channels
        lo = max(0, c - half)
        hi = min(channels - 1, c + half)
        s_out = scale[n, c]
        for t in range(plane):
            s_out[t] = 0.0
        for cc in range(lo, hi + 1):
            src = x[n, cc]
            for t in range(plane):
                s_out[t] += src[t] * src[t]
        xc = x[n, c]
        yc = y[n, c]
        for t in range(plane):
            s = k + alpha * s_out[t]
            s_out[t] = s
            yc[t] = xc[t] * _neg_pow(s, beta, three_quarters)


@njit(parallel=True, fastmath=True, cache=True)
def lrn_backward_kernel(dx, dy, x, y, scale, half, alpha, beta, three_quarters):
    """All (N, C, P): write dx[n, c, :], one task per (n, c); dy*y/scale is recomputed per
    window instead of stored, so the pass needs no scratch memory."""
    n_img, channels, plane = x.shape
    coef = 2.0 * alpha * beta
    for task in prange(n_img * channels):
        n = task // channels
        c = task % channels
        lo = max(0, c - half)
        hi = min(channels - 1, c + half)
        out = dx[n, c]
        for t in range(plane):
            out[t] = 0.0
        for cc in range(lo, hi + 1):
            g, o, s = dy[n, cc], y[n, cc], scale[n, cc]
            for t in range(plane):
                out[t] += g[t] * o[t] / s[t]
        g, xc, s = dy[n, c], x[n, c], scale[n, c]
        for t in range(plane):
            out[t] = g[t] * _neg_pow(s[t], beta, three_quarters) - coef * xc[t] * out[t]


def _as3d(a):
    return a.reshape(a.shape[0], a.shape[1], -1)


def lrn_forward(y, scale, x, size, alpha, beta, k, stream=None):
    """y, scale (shaped like x (N,C,...)) <- normalised x and its denominator base (written)."""
    lrn_forward_kernel(_as3d(y), _as3d(scale), _as3d(x), size // 2, float(alpha), float(beta),
                       float(k), beta == 0.75)


def lrn_backward(dx, dy, x, y, scale, size, alpha, beta, k, stream=None):
    """dx (shaped like x) <- dL/dx from dy and the forward's x, y, scale.  dx is overwritten."""
    lrn_backward_kernel(_as3d(dx), _as3d(dy), _as3d(x), _as3d(y), _as3d(scale), size // 2,
                        float(alpha), float(beta), beta == 0.75)
