"""Max pooling (square window, no padding, floor output size) on the GPU.

The forward pass keeps the argmax of every window (as h*W + w within its plane) so the
backward pass is a gather, not a scatter: each input element sums the dy of the few windows
that contain it and chose it.  No atomics, so the result is the same on every run.
"""

from numba import cuda, float32, int32

from nbalex.cuda.launch import (THREADS_PER_BLOCK, check_array, check_ndim, grid_1d,
                                stream_or_default)


@cuda.jit(device=True, inline="always")
def unravel(i, height, width):
    """(p, h, w) of the C-order flat index i = (p*height + h)*width + w."""
    rest = i // width
    return rest // height, rest % height, i % width


@cuda.jit
def maxpool_forward_kernel(y, idx, x, size, stride):
    """y[p,oh,ow] = max of x[p, oh*stride : oh*stride+size, ow*stride : ow*stride+size],
    idx[p,oh,ow] = its position h*W + w in plane p; ties go to the first in row-major
    window order.

    x (P,H,W) float32, P = N*C planes; y (P,OH,OW) float32 and idx (P,OH,OW) int32 are
    written.  One thread per output element, grid-stride over P*OH*OW in C order (adjacent
    threads take adjacent ow, so the stores are coalesced).
    """
    planes, height, width = x.shape
    out_h, out_w = y.shape[1], y.shape[2]
    for i in range(cuda.grid(1), planes * out_h * out_w, cuda.gridsize(1)):
        p, oh, ow = unravel(i, out_h, out_w)
        h0 = oh * stride
        w0 = ow * stride
        best = x[p, h0, w0]
        best_at = h0 * width + w0
        for dh in range(size):
            for dw in range(size):
                v = x[p, h0 + dh, w0 + dw]
                if v > best:
                    best = v
                    best_at = (h0 + dh) * width + w0 + dw
        y[p, oh, ow] = best
        idx[p, oh, ow] = int32(best_at)


@cuda.jit
def maxpool_backward_kernel(dx, dy, idx, size, stride):
    """dx[p,h,w] = sum of dy[p,oh,ow] over the windows (oh, ow) that contain (h, w) and
    whose idx[p,oh,ow] == h*W + w (0 when none).

    dx (P,H,W) float32, P = N*C planes, is written (every element); dy (P,OH,OW) float32 and
    idx (P,OH,OW) int32 come from the forward pass.  One thread per input element,
    grid-stride over P*H*W in C order; it visits at most ceil(size/stride)**2 windows.
    """
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


def _check_pool(x_name, x, y_name, y, idx, size, stride):
    """Check the input-shaped (N,C,H,W) float32 argument x against the window, then the
    pooled-shaped y (float32) and idx (int32) against it; all C-contiguous."""
    check_array(x_name, x)
    check_ndim(x_name, x, 4)
    n, c, height, width = x.shape
    if size < 1 or stride < 1:
        raise ValueError(f"pool size and stride must be positive, got {size}, {stride}")
    if height < size or width < size:
        raise ValueError(f"pool window {size} is larger than the input plane {height}x{width}")
    out_shape = (n, c, pooled_size(height, size, stride), pooled_size(width, size, stride))
    check_array(y_name, y, shape=out_shape)
    check_array("idx", idx, dtype="int32", shape=out_shape)


def maxpool_forward(y, idx, x, size, stride, stream=None):
    """y, idx = max pool of x (N,C,H,W) float32 with a size x size window every stride;
    y float32 and idx int32 (N,C,OH,OW) are written."""
    size, stride = int(size), int(stride)
    _check_pool("x", x, "y", y, idx, size, stride)
    if y.size == 0:
        return
    maxpool_forward_kernel[grid_1d(y.size), THREADS_PER_BLOCK, stream_or_default(stream)](
        _planes(y), _planes(idx), _planes(x), size, stride)


def maxpool_backward(dx, dy, idx, size, stride, stream=None):
    """dx (N,C,H,W) float32 is overwritten with dy (N,C,OH,OW) routed to each window's argmax
    idx (int32, from maxpool_forward), summed where windows overlap."""
    size, stride = int(size), int(stride)
    _check_pool("dx", dx, "dy", dy, idx, size, stride)
    if dx.size == 0:
        return
    maxpool_backward_kernel[grid_1d(dx.size), THREADS_PER_BLOCK, stream_or_default(stream)](
        _planes(dx), _planes(dy), _planes(idx), size, stride)
