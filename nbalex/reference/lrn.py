"""Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).

For x of shape (N, C, ...) (any trailing spatial axes), with half = size // 2::

    scale[n, c] = k + alpha * sum_{c' = max(0, c-half)}^{min(C-1, c+half)} x[n, c']**2
    y[n, c]     = x[n, c] * scale[n, c]**(-beta)

alpha is NOT divided by ``size`` (the paper's formula; PyTorch's LocalResponseNorm with
alpha' = alpha * size computes the same function).  The window is clipped at the first and
last channel.

Backward, by the product rule: y[j] depends on x[c] through x[j] itself (when j = c) and
through scale[j] whenever c lies in j's window, with d scale[j] / d x[c] = 2 * alpha * x[c]::

    dx[c] = dy[c] * scale[c]**(-beta)
            - 2 * alpha * beta * x[c] * sum_{j : c in window(j)} dy[j] * y[j] / scale[j]

The window is symmetric, so "j whose window contains c" is just c's own window, and the
same windowed channel sum serves both passes.
"""

import numpy as np

from nbalex import checks


def _window_sum(a, size):
    """s[:, c] = sum of a[:, c'] for c' in [c - size//2, c + size//2] ∩ [0, C)."""
    half = size // 2
    channels = a.shape[1]
    pad_width = [(0, 0)] * a.ndim
    pad_width[1] = (half, half)
    padded = np.pad(a, pad_width)           # zero channels stand in for the clipped edges
    s = np.zeros_like(a)
    for shift in range(2 * half + 1):       # padded channel c + shift is channel c - half + shift
        s += padded[:, shift:shift + channels]
    return s


@checks.checked(checks.lrn_forward, "reference")
def lrn_forward(y, scale, x, size, alpha, beta, k, stream=None):
    """y, scale (both shaped like x) <- the normalised x and its denominator base.

    Both are overwritten; ``scale`` is kept for :func:`lrn_backward` (None: not kept).
    """
    s = k + alpha * _window_sum(x * x, size)
    y[...] = x * s ** (-beta)
    if scale is not None:
        scale[...] = s


@checks.checked(checks.lrn_backward, "reference")
def lrn_backward(dx, dy, x, y, scale, size, alpha, beta, k, stream=None):
    """dx (shaped like x) <- dL/dx from dy, the forward's x, y and scale.  dx is overwritten."""
    back = _window_sum(dy * y / scale, size)
    dx[...] = dy * scale ** (-beta) - (2 * alpha * beta) * x * back
