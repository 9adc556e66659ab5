"""Max pooling on the CPU (parallel Numba kernels, one task per (n, c) plane).

x (N,C,H,W), y and idx (N,C,OH,OW), OH = (H - size)//stride + 1.  idx (int32) is the winner's
position h*W + w in its plane; ties go to the first maximum in row-major window order (a
later element replaces the running maximum only when strictly larger), and a NaN beats
every number: the first NaN of the window wins, as np.argmax picks it in the reference.
The backward pass overwrites dx with each dy added at its idx (sums where windows overlap); a task
owns its plane, so overlapping windows never race.
"""

from numba import njit, prange

from nbalex import checks

from . import threads  # noqa: F401  (picks the threading layer before any kernel runs)


@njit(parallel=True, cache=True)
def maxpool_forward_kernel(y, idx, x, size, stride):
    """Write y and idx for every (n, c) plane; one task per plane."""
    n_img, channels, h, w = x.shape
    oh, ow = y.shape[2], y.shape[3]
    for task in prange(n_img * channels):
        n = task // channels
        c = task % channels
        src = x[n, c]
        for i in range(oh):
            for j in range(ow):
                h0 = i * stride
                w0 = j * stride
                best = src[h0, w0]
                arg = h0 * w + w0
                for p in range(size):
                    for q in range(size):
                        v = src[h0 + p, w0 + q]
                        if (v > best or v != v) and best == best:   # first NaN wins
                            best = v
                            arg = (h0 + p) * w + w0 + q
                y[n, c, i, j] = best
                if idx is not None:      # None (inference): compiled without the store
                    idx[n, c, i, j] = arg


@njit(parallel=True, cache=True)
def maxpool_backward_kernel(dx, dy, idx):
    """Overwrite dx: zero each plane, then add dy[n, c, i, j] at idx[n, c, i, j]."""
    n_img, channels = dx.shape[0], dx.shape[1]
    plane = dx.shape[2] * dx.shape[3]
    outs = dy.shape[2] * dy.shape[3]
    for task in prange(n_img * channels):
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
    maxpool_forward_kernel(y, idx, x, size, stride)


@checks.checked(checks.maxpool_backward, "cpu")
def maxpool_backward(dx, dy, idx, size, stride, stream=None):
    """dx (N,C,H,W) <- dy routed to idx, summed where windows overlap.  dx is overwritten."""
    maxpool_backward_kernel(dx, dy, idx)
