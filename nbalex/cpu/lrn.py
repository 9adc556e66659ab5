"""Local response normalisation across channels on the CPU (Numba kernels on the worker threads).

The contract (``nbalex.backends``), half = size // 2, windows clipped at the channel edges::

    scale[n, c] = k + alpha * sum_{c' in [c-half, c+half]} x[n, c']**2
    y[n, c]     = x[n, c] * scale[n, c]**(-beta)
    dx[n, c]    = dy[n, c] * scale[n, c]**(-beta)
                  - 2*alpha*beta * x[n, c] * sum_{j in [c-half, c+half]} dy[n, j]*y[n, j]/scale[n, j]

The forward pass has one task per (n, c) plane, the backward pass one per block of
CHANNEL_BLOCK planes of an image, split between the worker threads
(:func:`nbalex.cpu.workers.for_ranges`); the few neighbouring planes a task reads stay in
cache.  Both passes sum the window plane by plane in unit-stride loops that vectorise (the
forward pass in y itself): a sum per pixel over the window's planes, strided by the plane
size, ran at 4.5 ns per element, four times the backward pass.  The backward pass computes
dy*y/scale once per plane into a small ring of planes: AlexNet at batch 32 (2-core Xeon),
norm1 11.6 -> 7.3 ms, norm2 6.1 -> 4.3 ms, against dividing 2*half + 1 times per element.
Everything is computed in float32 (float64 constants would drag the loop into double).
beta = 0.75 (the paper's value) takes a pow-free path: s**-0.75 = r * sqrt(r), r = 1/sqrt(s).
Plain IEEE arithmetic, no ``fastmath``: fastmath let LLVM reassociate and approximate
(1/sqrt), so the bits depended on how the kernel happened to be compiled (fresh or loaded
from the cache), and it assumes no NaN or inf.
"""

import math

import numpy as np
from numba import njit

from nbalex import checks

from . import workers


@njit(inline="always", cache=True)
def _neg_pow(s, beta, three_quarters):
    """s**(-beta) in float32; the pow-free form for beta = 0.75."""
    if three_quarters:
        r = np.float32(1.0) / math.sqrt(s)
        return r * math.sqrt(r)
    return s ** (-beta)


@njit(nogil=True, cache=True, error_model="numpy")
def lrn_forward_kernel(y, scale, x, half, alpha, beta, k, three_quarters, lo, hi):
    """x, y, scale (N, C, P) float32: write scale[n, c, :] (unless None) and y[n, c, :] for
    the planes lo <= n*C + c < hi.  The window's sum of squares is summed into y[n, c] in
    increasing channel order, then replaced by the output.

    alpha, beta, k arrive as float32 so that the whole pass stays in single precision.
    """
    channels, plane = x.shape[1], x.shape[2]
    for task in range(lo, hi):
        n = task // channels
        c = task % channels
        first = max(0, c - half)
        last = min(channels - 1, c + half)
        out = y[n, c]
        for t in range(plane):
            out[t] = 0.0
        for cc in range(first, last + 1):
            v = x[n, cc]
            for t in range(plane):
                out[t] += v[t] * v[t]
        xc = x[n, c]
        for t in range(plane):
            s = k + alpha * out[t]
            if scale is not None:      # None (inference): compiled without the store
                scale[n, c, t] = s
            out[t] = xc[t] * _neg_pow(s, beta, three_quarters)


# Channels per task of the backward pass: a task computes dy*y/scale once per plane of its
# block and of the half-window on either side (4 of 32 planes again for the paper's size 5).
CHANNEL_BLOCK = 32


@njit(inline="always", cache=True)
def _ratio(out, g, o, s):
    """out[t] = g[t] * o[t] / s[t] (written)."""
    for t in range(out.shape[0]):
        out[t] = g[t] * o[t] / s[t]


@njit(nogil=True, cache=True, error_model="numpy")
def lrn_backward_kernel(dx, dy, x, y, scale, half, alpha, beta, three_quarters, lo, hi):
    """All (N, C, P) float32: write dx[n, c, :] for the tasks lo <= task < hi, task
    n*B + b covering the channels [b*CHANNEL_BLOCK, (b+1)*CHANNEL_BLOCK) of image n
    (B blocks an image).

    dy*y/scale is computed once per plane into a ring of 2*half + 1 planes, just before the
    first channel whose window needs it; each dx plane sums its window's planes of the ring
    in increasing channel order (unit-stride loops that vectorise), then is finished in
    place.  One division per element, where summing g*o/s over each window made 2*half + 1.
    """
    channels, plane = x.shape[1], x.shape[2]
    blocks = -(-channels // CHANNEL_BLOCK)
    width = 2 * half + 1
    ring = np.empty((width, plane), np.float32)
    coef = np.float32(2.0) * alpha * beta
    for task in range(lo, hi):
        n = task // blocks
        c0 = (task % blocks) * CHANNEL_BLOCK
        for j in range(max(0, c0 - half), min(channels, c0 + half)):
            _ratio(ring[j % width], dy[n, j], y[n, j], scale[n, j])
        for c in range(c0, min(channels, c0 + CHANNEL_BLOCK)):
            j = c + half
            if j < channels:
                _ratio(ring[j % width], dy[n, j], y[n, j], scale[n, j])
            out, g, xc, s = dx[n, c], dy[n, c], x[n, c], scale[n, c]
            if half == 2 and 2 <= c < channels - 2:         # the paper's size, a full window
                r0, r1, r2 = ring[(c - 2) % 5], ring[(c - 1) % 5], ring[c % 5]
                r3, r4 = ring[(c + 1) % 5], ring[(c + 2) % 5]
                if three_quarters:      # one loop per form of the power (see _finish)
                    for t in range(plane):
                        out[t] = g[t] * _neg_pow(s[t], beta, True) - coef * xc[t] * (
                            (((r0[t] + r1[t]) + r2[t]) + r3[t]) + r4[t])
                else:
                    for t in range(plane):
                        out[t] = g[t] * _neg_pow(s[t], beta, False) - coef * xc[t] * (
                            (((r0[t] + r1[t]) + r2[t]) + r3[t]) + r4[t])
                continue
            for t in range(plane):
                out[t] = 0.0
            for cc in range(max(0, c - half), min(channels - 1, c + half) + 1):
                r = ring[cc % width]
                for t in range(plane):
                    out[t] += r[t]
            _finish(out, g, xc, s, beta, coef, three_quarters)


@njit(inline="always", cache=True)
def _finish(out, g, xc, s, beta, coef, three_quarters):
    """out[t] = g[t] * s[t]**(-beta) - coef * xc[t] * out[t], one loop per form of the power
    (a test of ``three_quarters`` inside the loop kept it from vectorising: 3x slower)."""
    if three_quarters:
        for t in range(out.shape[0]):
            out[t] = g[t] * _neg_pow(s[t], beta, True) - coef * xc[t] * out[t]
    else:
        for t in range(out.shape[0]):
            out[t] = g[t] * _neg_pow(s[t], beta, False) - coef * xc[t] * out[t]


def _as3d(a):
    return a.reshape(a.shape[0], a.shape[1], -1)


@checks.checked(checks.lrn_forward, "cpu")
def lrn_forward(y, scale, x, size, alpha, beta, k, stream=None):
    """y, scale (shaped like x (N,C,...)) <- normalised x and its denominator base (written);
    ``scale`` None (inference) is not kept."""
    f32 = np.float32
    x3 = _as3d(x)
    workers.for_ranges(lrn_forward_kernel, x3.shape[0] * x3.shape[1], _as3d(y),
                       None if scale is None else _as3d(scale), x3, size // 2, f32(alpha),
                       f32(beta), f32(k), beta == 0.75, work=(size + 4) * x.size)


@checks.checked(checks.lrn_backward, "cpu")
def lrn_backward(dx, dy, x, y, scale, size, alpha, beta, k, stream=None):
    """dx (shaped like x) <- dL/dx from dy and the forward's x, y, scale.  dx is overwritten."""
    f32 = np.float32
    x3 = _as3d(x)
    tasks = x3.shape[0] * -(-x3.shape[1] // CHANNEL_BLOCK)
    workers.for_ranges(lrn_backward_kernel, tasks, _as3d(dx), _as3d(dy), x3,
                       _as3d(y), _as3d(scale), size // 2, f32(alpha), f32(beta), beta == 0.75,
                       work=(size + 4) * x.size)
