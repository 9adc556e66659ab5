"""Max pooling over square windows, per channel (overlapping when stride < size).

Shapes::

    x   (N, C, H, W)
    y   (N, C, OH, OW)      OH = (H - size) // stride + 1 (floor: a last partial window is dropped)
    idx (N, C, OH, OW)      int32, where each maximum came from, as h * W + w in its (n, c) plane

Math::

    y[n, c, i, j] = max_{p, q < size} x[n, c, i*stride + p, j*stride + q]

Ties go to the first maximum in row-major window order (smallest p, then smallest q), which
is what ``argmax`` over the flattened window does.  A NaN counts as larger than every number:
a window holding one gives y = NaN, and idx points at its first NaN in the same order (again
``argmax``'s rule); every backend follows it, so a NaN is never pooled away.  The backward pass routes each dy to the
input that won its window; when windows overlap one input can win several times, and its
gradient is the sum (``np.add.at`` adds repeated indices, plain fancy assignment would not).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nbalex import checks


@checks.checked(checks.maxpool_forward, "reference")
def maxpool_forward(y, idx, x, size, stride, stream=None):
    """y, idx (N,C,OH,OW) <- window maxima of x and their flat positions.  Both overwritten;
    ``idx`` None (inference) skips the positions."""
    n, c, h, w = x.shape
    oh, ow = y.shape[2], y.shape[3]
    windows = sliding_window_view(x, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]
    flat = windows.reshape(n, c, oh, ow, size * size)            # (N, C, OH, OW, size*size)
    arg = flat.argmax(axis=-1)                                    # first maximum wins ties
    y[...] = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    if idx is None:
        return
    rows = np.arange(oh).reshape(oh, 1) * stride + arg // size    # h of each winner
    cols = np.arange(ow).reshape(1, ow) * stride + arg % size     # w of each winner
    idx[...] = rows * w + cols


@checks.checked(checks.maxpool_backward, "reference")
def maxpool_backward(dx, dy, idx, size, stride, stream=None):
    """dx (N,C,H,W) <- dy routed to idx, summed where windows overlap.  dx is overwritten."""
    n, c, h, w = dx.shape
    planes = np.zeros((n * c, h * w), dtype=dx.dtype)
    plane_of = np.arange(n * c).reshape(n * c, 1)                 # which (n, c) plane
    np.add.at(planes, (plane_of, idx.reshape(n * c, -1)), dy.reshape(n * c, -1))
    dx[...] = planes.reshape(n, c, h, w)
