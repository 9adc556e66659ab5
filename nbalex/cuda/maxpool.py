"""Max pooling (square window, no padding, floor output size) on the GPU.

The forward pass keeps the argmax of every window (as h*W + w within its plane) so the
backward pass is a gather, not a scatter: each input element sums the dy of the few windows
that contain it and chose it.  No atomics, so the result is the same on every run.
"""

# lab:begin maxpool.imports
import numpy as np
from numba import cuda, float32, int32

from nbalex import checks
from nbalex.cuda.launch import THREADS_PER_BLOCK, grid_1d, stream_or_default
# lab:end maxpool.imports


# lab:begin maxpool.helpers
@cuda.jit(device=True, inline="always")
def unravel(i, height, width):
    """(p, h, w) of the C-order flat index i = (p*height + h)*width + w."""
    rest = i // width
    return rest // height, rest % height, i % width
# lab:end maxpool.helpers


# lab:begin maxpool.forward_kernel
@cuda.jit
def maxpool_forward_kernel(y, idx, x, size, stride):
    """y[p,oh,ow] = max of x[p, oh*stride : oh*stride+size, ow*stride : ow*stride+size],
    idx[p,oh,ow] = its position h*W + w in plane p; ties go to the first in row-major
    window order, and a NaN beats every number (the first NaN wins, as np.argmax picks it).

    x (P,H,W) float32, P = N*C planes; y (P,OH,OW) float32 and idx (P,OH,OW) int32 are
    written (an idx with no elements, for inference, is not).  One thread per output element, grid-stride over P*OH*OW in C order (adjacent
    threads take adjacent ow, so the stores are coalesced).
    """
    # lab:end maxpool.forward_kernel
    planes, height, width = x.shape
    out_h, out_w = y.shape[1], y.shape[2]
    keep = idx.shape[0] != 0
    for i in range(cuda.grid(1), planes * out_h * out_w, cuda.gridsize(1)):
        p, oh, ow = unravel(i, out_h, out_w)
        h0 = oh * stride
        w0 = ow * stride
        best = x[p, h0, w0]
        best_at = h0 * width + w0
        for dh in range(size):
            for dw in range(size):
                v = x[p, h0 + dh, w0 + dw]
                if (v > best or v != v) and best == best:   # first NaN wins
                    best = v
                    best_at = (h0 + dh) * width + w0 + dw
        y[p, oh, ow] = best
        if keep:
            idx[p, oh, ow] = int32(best_at)


# lab:begin maxpool.backward_kernel
@cuda.jit
def maxpool_backward_kernel(dx, dy, idx, size, stride):
    """dx[p,h,w] = sum of dy[p,oh,ow] over the windows (oh, ow) that contain (h, w) and
    whose idx[p,oh,ow] == h*W + w (0 when none).

    dx (P,H,W) float32, P = N*C planes, is written (every element); dy (P,OH,OW) float32 and
    idx (P,OH,OW) int32 come from the forward pass.  One thread per input element,
    grid-stride over P*H*W in C order; it visits at most ceil(size/stride)**2 windows.
    """
    # lab:end maxpool.backward_kernel
    planes, height, width = dx.shape
    out_h, out_w = dy.shape[1], dy.shape[2]
    for i in range(cuda.grid(1), planes * height * width, cuda.gridsize(1)):
        p, h, w = unravel(i, height, width)
        here = h * width + w
        # window oh covers h iff oh*stride <= h < oh*stride + size: walk back from the last
        # window starting at or before h while it still reaches h (likewise for ow)
        ow_last = min(w // stride, out_w - 1)
        acc = float32(0.0)
        oh = min(h // stride, out_h - 1)
        while oh >= 0 and oh * stride + size > h:
            ow = ow_last
            while ow >= 0 and ow * stride + size > w:
                if idx[p, oh, ow] == here:
                    acc += dy[p, oh, ow]
                ow -= 1
            oh -= 1
        dx[p, h, w] = acc


# lab:begin maxpool.launchers
_F3 = "float32[:, :, ::1]"
_I3 = "int32[:, :, ::1]"
STATIC_SIGNATURES = [
    (maxpool_forward_kernel, f"void({_F3}, {_I3}, {_F3}, int64, int64)", False),
    (maxpool_backward_kernel, f"void({_F3}, {_F3}, {_I3}, int64, int64)", False),
]


def pooled_size(length, size, stride):
    """Output length of a pooling window sweep: floor((length - size) / stride) + 1."""
    return (length - size) // stride + 1


def _planes(a):
    """(N, C, H, W) -> (N*C, H, W) view: the kernels only care about planes."""
    n, c, h, w = a.shape
    return a.reshape(n * c, h, w)


@checks.checked(checks.maxpool_forward, "cuda")
def maxpool_forward(y, idx, x, size, stride, stream=None):
    """y, idx = max pool of x (N,C,H,W) float32 with a size x size window every stride;
    y float32 and idx int32 (N,C,OH,OW) are written; idx None (inference) is not kept."""
    size, stride = int(size), int(stride)
    if y.size == 0:
        return
    kept = cuda.device_array((0, 0, 0), np.int32) if idx is None else _planes(idx)
    maxpool_forward_kernel[grid_1d(y.size), THREADS_PER_BLOCK, stream_or_default(stream)](
        _planes(y), kept, _planes(x), size, stride)


@checks.checked(checks.maxpool_backward, "cuda")
def maxpool_backward(dx, dy, idx, size, stride, stream=None):
    """dx (N,C,H,W) float32 is overwritten with dy (N,C,OH,OW) routed to each window's argmax
    idx (int32, from maxpool_forward), summed where windows overlap."""
    size, stride = int(size), int(stride)
    if dx.size == 0:
        return
    maxpool_backward_kernel[grid_1d(dx.size), THREADS_PER_BLOCK, stream_or_default(stream)](
        _planes(dx), _planes(dy), _planes(idx), size, stride)
# lab:end maxpool.launchers
