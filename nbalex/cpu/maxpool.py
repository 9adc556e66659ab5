"""Max pooling on the CPU (Numba kernels, one task per (n, c) plane, the planes split between
the worker threads).

x (N,C,H,W), y and idx (N,C,OH,OW), OH = (H - size)//stride + 1.  idx (int32) is the winner's
position h*W + w in its plane; ties go to the first maximum in row-major window order (a
later element replaces the running maximum only when strictly larger), and a NaN beats
every number: the first NaN of the window wins, as np.argmax picks it in the reference.

The forward pass is separable and runs on the flat plane: sweeps along the rows give m[k],
the maximum of x[k .. k+size-1] (with its position), then sweeps down the columns give
vm[k], the maximum of m[k], m[k+W] .. m[k+(size-1)W]; each output is vm at its window's
corner.  That is exact: the first maximum (or NaN) of each row of the window, then the first
of those down the rows, is the first in row-major window order.  The sweeps compute every
position, the unneeded ones too, but their loops are unit-stride and a plane long, so they
vectorise; walking the window element by element over each output row (strided loads, 13
or 6 iterations on pool2/pool5) did not.  On the 2-core machine at batch 32, both cores,
old and new in the same run (median ms, with idx / without): pool1 7.8 / 4.4 -> 4.3 / 2.4,
pool2 10.4 / 4.6 -> 2.4 / 1.6, pool5 3.0 / 1.4 -> 0.8 / 0.5.  The first sweep each way
folds 3 elements (one sweep per element was 10-40% slower); the column sweeps done in place
in m were 4-5x slower (not vectorised, presumably: they read m where they write it), and a
copy hard-wired to size 3, stride 2 was only 5-15% faster, not worth a second kernel.

The backward pass overwrites dx with each dy added at its idx (sums where windows overlap);
a task owns its plane, so overlapping windows never race.
"""

import numpy as np
from numba import njit

from nbalex import checks

from . import workers

U = np.uint64   # offsets into the flat views: unsigned, so no wrap-around test blocks vectorising


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _fold(b, a, v, pos):
    """(v, pos) when v beats the running maximum b (at a): v > b, or v is NaN and b is not.
    Both are selects, which keeps the sweeps' loops branch-free."""
    take = (b == b) ^ (v <= b)      # b NaN: never; else not (v <= b): v > b or v NaN
    return (v if take else b), (pos if take else a)


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _fold_value(b, v):
    """_fold without the position (inference)."""
    return v if (b == b) ^ (v <= b) else b


@njit(nogil=True, cache=True, error_model="numpy")
def maxpool_forward_kernel(y, idx, x, size, stride, lo, hi):
    """Write y and idx (unless None: compiled without the positions) for the planes
    lo <= n*C + c < hi, every element of both.

    Scratch: four arrays of one plane (m, vm and their positions; two without idx: 48 KB at
    most on pool1), allocated once per call, i.e. per thread and pass, reused for every plane.
    """
    channels, w = x.shape[1], x.shape[3]
    oh, ow = y.shape[2], y.shape[3]
    plane = x.shape[2] * w
    npos = plane if idx is not None else 0
    m, vm = np.empty(plane, x.dtype), np.empty(plane, x.dtype)
    mi, vmi = np.empty(npos, np.int32), np.empty(npos, np.int32)
    nv = U((oh - 1) * stride * w + (ow - 1) * stride + 1)    # vm up to the last window's corner
    nh = nv + U((size - 1) * w)                               # m on the rows that vm reads
    # The first sweeps fold elements 0, d1 and d2 of the window's row (column) at once: 0, 1, 2
    # when size >= 3; for a smaller size an element is folded twice, which changes nothing.
    d1, d2 = U(min(1, size - 1)), U(min(2, size - 1))
    r1, r2 = d1 * U(w), d2 * U(w)
    for task in range(lo, hi):
        n = task // channels
        c = task % channels
        src = x[n, c].reshape(plane)
        for k in range(nh):
            if idx is not None:
                b, a = _fold(src[k], np.int32(k), src[k + d1], np.int32(k + d1))
                m[k], mi[k] = _fold(b, a, src[k + d2], np.int32(k + d2))
            else:
                m[k] = _fold_value(_fold_value(src[k], src[k + d1]), src[k + d2])
        for q in range(3, size):
            for k in range(nh):
                if idx is not None:
                    m[k], mi[k] = _fold(m[k], mi[k], src[k + U(q)], np.int32(k + U(q)))
                else:
                    m[k] = _fold_value(m[k], src[k + U(q)])
        for k in range(nv):
            if idx is not None:
                b, a = _fold(m[k], mi[k], m[k + r1], mi[k + r1])
                vm[k], vmi[k] = _fold(b, a, m[k + r2], mi[k + r2])
            else:
                vm[k] = _fold_value(_fold_value(m[k], m[k + r1]), m[k + r2])
        for p in range(3, size):
            o = U(p * w)
            for k in range(nv):
                if idx is not None:
                    vm[k], vmi[k] = _fold(vm[k], vmi[k], m[k + o], mi[k + o])
                else:
                    vm[k] = _fold_value(vm[k], m[k + o])
        for i in range(oh):
            corner = U(i * stride * w)
            row = y[n, c, i]
            for j in range(ow):
                row[U(j)] = vm[corner + U(j * stride)]
            if idx is not None:
                arg = idx[n, c, i]
                for j in range(ow):
                    arg[U(j)] = vmi[corner + U(j * stride)]


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
