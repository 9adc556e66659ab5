"""Max pooling on the CPU (Numba kernels, one task per (n, c) plane, the planes split between
the worker threads).

x (N,C,H,W), y and idx (N,C,OH,OW), OH = (H - size)//stride + 1.  idx (int32) is the winner's
position h*W + w in its plane; ties go to the first maximum in row-major window order (a
later element replaces the running maximum only when strictly larger), and a NaN beats
every number: the first NaN of the window wins, as np.argmax picks it in the reference.
The forward pass walks the window's elements in that order for a whole output row at once
(one unit-stride or strided loop per window element), which vectorises: window by window
it ran at 3 ns per input element.  The backward pass overwrites dx with each dy added at its idx (sums where windows overlap); a task
owns its plane, so overlapping windows never race.
"""

import numpy as np
from numba import njit

from nbalex import checks

from . import workers


@njit(nogil=True, cache=True, error_model="numpy")
def maxpool_forward_kernel(y, idx, x, size, stride, lo, hi):
    """Write y and idx (unless None) for the planes lo <= n*C + c < hi.

    For each output row, y's row holds the running maxima (idx's row their positions) while
    the window elements (p, q) are visited in row-major order, each for every output of the
    row; an element replaces the running maximum when larger, or when it is the first NaN.
    """
    channels, w = x.shape[1], x.shape[3]
    oh, ow = y.shape[2], y.shape[3]
    for task in range(lo, hi):
        n = task // channels
        c = task % channels
        src = x[n, c]
        for i in range(oh):
            h0 = i * stride
            best = y[n, c, i]
            top = src[h0, 0:(ow - 1) * stride + 1:stride]
            for j in range(ow):
                best[j] = top[j]
            if idx is not None:      # None (inference): compiled without the positions
                arg = idx[n, c, i]
                for j in range(ow):
                    arg[j] = h0 * w + j * stride
            for p in range(size):
                row = src[h0 + p]
                for q in range(size):
                    if p == 0 and q == 0:
                        continue
                    base = (h0 + p) * w + q
                    seg = row[q:q + (ow - 1) * stride + 1:stride]   # a view indexed from 0
                    for j in range(ow):
                        v = seg[j]
                        b = best[j]
                        # max(b, v) keeps b unless v > b, a NaN b included; a NaN v is
                        # taken below.  Written this way (a select and an arithmetic blend
                        # of the position), LLVM keeps the loop branch-free: the same rule
                        # as one branchy condition ran 3x slower on random data.
                        best[j] = max(b, v)
                        if v != v:
                            best[j] = v
                        if idx is not None:
                            a = arg[j]
                            take = np.int32(((v > b) | (v != v)) & (b == b))   # first NaN wins
                            arg[j] = a + take * (np.int32(base + j * stride) - a)


@njit(nogil=True, cache=True, error_model="numpy")
def maxpool_backward_kernel(dx, dy, idx, lo, hi):
    """Overwrite the planes lo <= n*C + c < hi of dx: zero each, then add dy[n, c, i, j] at
    idx[n, c, i, j] in row-major order of (i, j)."""
    channels = dx.shape[1]
    plane = dx.shape[2] * dx.shape[3]
    outs = dy.shape[2] * dy.shape[3]
    for task in range(lo, hi):
        n = task // channels
        c = task % channels
        dst = dx[n, c].reshape(plane)
        g = dy[n, c].reshape(outs)
        where = idx[n, c].reshape(outs)
        for t in range(plane):
            dst[t] = 0.0
        for t in range(outs):
            dst[where[t]] += g[t]


@checks.checked(checks.maxpool_forward, "cpu")
def maxpool_forward(y, idx, x, size, stride, stream=None):
    """y, idx (N,C,OH,OW) <- window maxima of x and their positions.  Both overwritten;
    ``idx`` None (inference) skips the positions."""
    workers.for_ranges(maxpool_forward_kernel, x.shape[0] * x.shape[1], y, idx, x, size, stride,
                       work=size * size * y.size)


@checks.checked(checks.maxpool_backward, "cpu")
def maxpool_backward(dx, dy, idx, size, stride, stream=None):
    """dx (N,C,H,W) <- dy routed to idx, summed where windows overlap.  dx is overwritten."""
    workers.for_ranges(maxpool_backward_kernel, dx.shape[0] * dx.shape[1], dx, dy, idx,
                       work=dx.size)
