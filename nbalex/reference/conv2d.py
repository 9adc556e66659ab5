"""2-D convolution (cross-correlation, as every deep-learning library means it), with groups.

Shapes::

    x (N, C, H, W)          input
    w (F, C/G, KH, KW)      filters; G = groups
    b (F,)                  biases
    y (N, F, OH, OW)        OH = (H + 2*pad - KH) // stride + 1, likewise OW

Math, for output channel f in group g = f // (F/G), whose input channels are
c in [g*C/G, (g+1)*C/G)::

    y[n, f, i, j] = b[f] + sum_{c, p, q} w[f, c - g*C/G, p, q] * xp[n, c, i*s + p, j*s + q]

where s = stride and ``xp`` is ``x`` zero-padded by ``pad`` on each side of H and W.

The idea used here is *im2col*: ``sliding_window_view`` turns the padded input into a view of
every (KH, KW) patch, ``cols[n, c, i, j, p, q] = xp[n, c, i*stride + p, j*stride + q]``, without
copying; the convolution is then one ``tensordot`` of those patches with the filters. The
backward pass to the data (*col2im*) scatters each patch's gradient back to where it came
from, one filter tap (p, q) at a time, because patches overlap when stride < kernel.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nbalex import checks


def output_size(size, kernel, stride, pad):
    """Output length along one axis: floor((size + 2*pad - kernel) / stride) + 1."""
    return (size + 2 * pad - kernel) // stride + 1


def _patches(x, kh, kw, stride, pad):
    """im2col as a view: (N, C, OH, OW, KH, KW), patches[n,c,i,j,p,q] = xp[n,c,i*s+p,j*s+q]."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))  # every stride-1 window
    return windows[:, :, ::stride, ::stride]                   # keep every stride-th one


@checks.checked(checks.conv2d_workspace_size, "reference")
def conv2d_workspace_size(x_shape, w_shape, stride, pad, groups):
    """The reference needs no caller-provided workspace: 0."""
    return 0


@checks.checked(checks.conv2d_forward, "reference")
def conv2d_forward(y, x, w, b, stride, pad, groups, relu=False, workspace=None, stream=None):
    """y (N,F,OH,OW) <- conv(x, w) + b, then max(y, 0) if ``relu``.  y is overwritten.

    Per group g: y[:, group g's filters] = tensordot(patches of group g's channels, w_g)
    contracting over (channel, p, q).
    """
    f, c_per_group, kh, kw = w.shape
    f_per_group = f // groups
    cols = _patches(x, kh, kw, stride, pad)                     # (N, C, OH, OW, KH, KW)
    for g in range(groups):
        cs = slice(g * c_per_group, (g + 1) * c_per_group)
        fs = slice(g * f_per_group, (g + 1) * f_per_group)
        out = np.tensordot(cols[:, cs], w[fs], axes=([1, 4, 5], [1, 2, 3]))  # (N, OH, OW, F/G)
        y[:, fs] = out.transpose(0, 3, 1, 2)
    y += b.reshape(1, f, 1, 1)
    if relu:
        np.maximum(y, 0, out=y)


@checks.checked(checks.conv2d_backward_data, "reference")
def conv2d_backward_data(dx, dy, w, stride, pad, groups, workspace=None, stream=None):
    """dx (N,C,H,W) <- dL/dx given dy = dL/dy (N,F,OH,OW).  dx is overwritten.

    dL/dpatches[n, c, i, j, p, q] = sum_f dy[n, f, i, j] * w[f, c, p, q]   (per group), then
    col2im: dxp[n, c, i*s + p, j*s + q] += dL/dpatches[n, c, i, j, p, q] for every tap (p, q);
    dx is dxp without its padding.
    """
    n, c, h, w_ = dx.shape
    f, c_per_group, kh, kw = w.shape
    f_per_group = f // groups
    oh, ow = dy.shape[2], dy.shape[3]
    dxp = np.zeros((n, c, h + 2 * pad, w_ + 2 * pad), dtype=dx.dtype)
    for g in range(groups):
        cs = slice(g * c_per_group, (g + 1) * c_per_group)
        fs = slice(g * f_per_group, (g + 1) * f_per_group)
        dcols = np.tensordot(dy[:, fs], w[fs], axes=([1], [0]))  # (N, OH, OW, C/G, KH, KW)
        for p in range(kh):
            for q in range(kw):
                rows = slice(p, p + stride * (oh - 1) + 1, stride)
                cols = slice(q, q + stride * (ow - 1) + 1, stride)
                dxp[:, cs, rows, cols] += dcols[:, :, :, :, p, q].transpose(0, 3, 1, 2)
    dx[...] = dxp[:, :, pad:pad + h, pad:pad + w_]


@checks.checked(checks.conv2d_backward_weights, "reference")
def conv2d_backward_weights(dw, db, dy, x, stride, pad, groups, workspace=None, stream=None):
    """dw (F,C/G,KH,KW) and db (F,) <- dL/dw, dL/db.  Both overwritten, never accumulated.

    dw[f, c, p, q] = sum_{n, i, j} dy[n, f, i, j] * patches[n, c, i, j, p, q]   (per group)
    db[f]          = sum_{n, i, j} dy[n, f, i, j]
    """
    f, c_per_group, kh, kw = dw.shape
    f_per_group = f // groups
    cols = _patches(x, kh, kw, stride, pad)                     # (N, C, OH, OW, KH, KW)
    for g in range(groups):
        cs = slice(g * c_per_group, (g + 1) * c_per_group)
        fs = slice(g * f_per_group, (g + 1) * f_per_group)
        dw[fs] = np.tensordot(dy[:, fs], cols[:, cs], axes=([0, 2, 3], [0, 2, 3]))
    db[...] = dy.sum(axis=(0, 2, 3))
