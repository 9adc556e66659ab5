"""Local response normalisation across channels (the paper's section 3.3) on the GPU.

One thread owns one (n, spatial position) column and walks its channels once, keeping the
channel-window sum as a running sum: add the channel entering the window, subtract the one
leaving it.  Each element is thus fetched from DRAM once per pass (the re-reads at the window
edges come `size` channels later and are meant to hit in L1/L2), and scale and y come out of
the same kernel.
Adjacent threads own adjacent positions, so every load and store is coalesced.

The running sums are kept in float64, so the residue a large value leaves after it has left
the window is 2**-52 of its square (float32 would leave 2**-23 of it).  That only shows when
k is tiny next to alpha * sum and the squares in one column span more than about 1e12.

A running sum cannot forget a NaN or an infinity (inf - inf is NaN): once it is not finite,
it is summed again over the next window from scratch, so a NaN or inf reaches exactly the
channels whose window holds it, as in the reference, and the finite path costs one test.
"""

# lab:begin lrn.imports
import math

import numpy as np
from numba import cuda, float32, float64

from nbalex import checks
from nbalex.cuda.launch import grid_1d, stream_or_default, THREADS_PER_BLOCK
# lab:end lrn.imports


# lab:begin lrn.helpers
@cuda.jit(device=True, inline="always")
def split_column(col, plane):
    """(n, s) of the column index col = n*S + s, S = plane."""
    n = col // plane
    return n, col - n * plane
# lab:end lrn.helpers


# lab:begin lrn.forward_kernel
@cuda.jit
def lrn_forward_kernel(y, scale, x, half, alpha, beta, k):
    """scale[n,c,s] = k + alpha * sum_{c' in [c-half, c+half] ∩ [0,C)} x[n,c',s]**2 and
    y[n,c,s] = x[n,c,s] * scale[n,c,s]**(-beta).

    x, y, scale: (N, C, S) float32, S = every spatial position flattened; y and scale are
    written and must not alias x.  A scale with no elements (inference) is not written.  One thread per column (n, s), grid-stride over the N*S
    columns; it writes y and scale for all C channels.
    """
    # lab:end lrn.forward_kernel
    n_img, channels, plane = x.shape
    keep = scale.shape[0] != 0
    for col in range(cuda.grid(1), n_img * plane, cuda.gridsize(1)):
        n, s = split_column(col, plane)
        window = float64(0.0)  # sum of squares over the window of channel 0: [0, half]
        for j in range(min(half + 1, channels)):
            v = x[n, j, s]
            window += v * v
        for c in range(channels):
            v = x[n, c, s]
            # rounding must not make the sum negative (written so that a NaN stays NaN)
            sc = k + alpha * float32(float64(0.0) if window < 0.0 else window)
            if keep:
                scale[n, c, s] = sc
            y[n, c, s] = v * math.pow(sc, -beta)
            entering = c + half + 1
            if entering < channels:
                e = x[n, entering, s]
                window += e * e
            leaving = c - half
            if leaving >= 0:
                e = x[n, leaving, s]
                window -= e * e
            if not math.isfinite(window):  # sum channel c+1's window afresh
                window = float64(0.0)
                for j in range(max(c + 1 - half, 0), min(entering + 1, channels)):
                    e = x[n, j, s]
                    window += e * e


# lab:begin lrn.backward_kernel
@cuda.jit
def lrn_backward_kernel(dx, dy, x, y, scale, half, two_alpha_beta, beta):
    """dx[n,c,s] = dy[c]*scale[c]**(-beta)
                   - 2*alpha*beta * x[c] * sum_{j in [c-half, c+half] ∩ [0,C)} dy[j]*y[j]/scale[j]
    (every array indexed at [n, ., s]).

    dx, dy, x, y, scale: (N, C, S) float32; dx is written and must not alias dy, y or scale.
    One thread per column (n, s), grid-stride over the N*S columns, walking the C channels
    with the window sum of dy*y/scale kept as a running sum.
    """
    # lab:end lrn.backward_kernel
    n_img, channels, plane = x.shape
    for col in range(cuda.grid(1), n_img * plane, cuda.gridsize(1)):
        n, s = split_column(col, plane)
        window = float64(0.0)  # sum of dy*y/scale over the window of channel 0: [0, half]
        for j in range(min(half + 1, channels)):
            window += dy[n, j, s] * y[n, j, s] / scale[n, j, s]
        for c in range(channels):
            sc = scale[n, c, s]
            dx[n, c, s] = (dy[n, c, s] * math.pow(sc, -beta)
                           - two_alpha_beta * x[n, c, s] * float32(window))
            entering = c + half + 1
            if entering < channels:
                window += dy[n, entering, s] * y[n, entering, s] / scale[n, entering, s]
            leaving = c - half
            if leaving >= 0:
                window -= dy[n, leaving, s] * y[n, leaving, s] / scale[n, leaving, s]
            if not math.isfinite(window):  # sum channel c+1's window afresh
                window = float64(0.0)
                for j in range(max(c + 1 - half, 0), min(entering + 1, channels)):
                    window += dy[n, j, s] * y[n, j, s] / scale[n, j, s]


# lab:begin lrn.launchers
_A3 = "float32[:, :, ::1]"
STATIC_SIGNATURES = [
    (lrn_forward_kernel, f"void({_A3}, {_A3}, {_A3}, int64, float32, float32, float32)", False),
    (lrn_backward_kernel,
     f"void({_A3}, {_A3}, {_A3}, {_A3}, {_A3}, int64, float32, float32)", False),
]


def _columns(x):
    """(N, C, S): x's shape with every axis after the channels flattened into S."""
    n, c = x.shape[0], x.shape[1]
    return n, c, int(np.prod(x.shape[2:], dtype=np.int64))


@checks.checked(checks.lrn_forward, "cuda")
def lrn_forward(y, scale, x, size, alpha, beta, k, stream=None):
    """y = x * scale**(-beta), scale = k + alpha * (window sum of x**2), for any (N, C, ...)
    float32 x; y and scale (same shape, not aliasing x) are written, scale is kept for the
    backward pass (None: not kept, for inference)."""
    half, cols = int(size) // 2, _columns(x)
    if x.size == 0:
        return
    kept = cuda.device_array((0, 0, 0), np.float32) if scale is None else scale.reshape(cols)
    lrn_forward_kernel[grid_1d(cols[0] * cols[2]), THREADS_PER_BLOCK, stream_or_default(stream)](
        y.reshape(cols), kept, x.reshape(cols), half,
        np.float32(alpha), np.float32(beta), np.float32(k))


@checks.checked(checks.lrn_backward, "cuda")
def lrn_backward(dx, dy, x, y, scale, size, alpha, beta, k, stream=None):
    """dx from dy and the forward pass's x, y and scale (all the same shape, float32);
    dx is written and must be a different buffer from dy, y and scale.  ``k`` is unused
    here (it is already inside scale) but kept for the shared launcher signature."""
    half, cols = int(size) // 2, _columns(x)
    if x.size == 0:
        return
    lrn_backward_kernel[grid_1d(cols[0] * cols[2]), THREADS_PER_BLOCK, stream_or_default(stream)](
        dx.reshape(cols), dy.reshape(cols), x.reshape(cols), y.reshape(cols),
        scale.reshape(cols), half, np.float32(2.0 * alpha * beta), np.float32(beta))
# lab:end lrn.launchers
