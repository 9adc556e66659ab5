"""ReLU on the GPU: elementwise grid-stride kernels over the flattened tensor.

The convolution and linear launchers fuse ReLU into their epilogue (``relu=True``); these
kernels serve the layers where it stands alone, and the backward pass everywhere.
"""

# lab:begin relu.imports
from numba import cuda, float32

from nbalex import checks
from nbalex.cuda.launch import flat, grid_1d, stream_or_default, THREADS_PER_BLOCK
# lab:end relu.imports


# lab:begin relu.forward_kernel
@cuda.jit
def relu_forward_kernel(y, x):
    """y[i] = max(x[i], 0) for every i (a NaN stays NaN, as with np.maximum), one grid-stride
    loop.

    x, y: 1-D float32 of the same length; y is written and may be the same array as x.
    """
    # lab:end relu.forward_kernel
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, x.shape[0], step):
        v = x[i]
        y[i] = float32(0.0) if v < 0 else v


# lab:begin relu.backward_kernel
@cuda.jit
def relu_backward_kernel(dx, dy, y):
    """dx[i] = dy[i] * (y[i] > 0), a multiply as in the reference (a NaN or inf dy at an
    inactive unit gives NaN, not 0), one grid-stride loop.

    dx, dy, y: 1-D float32 of the same length; dx is written and may be the same array as dy.
    """
    # lab:end relu.backward_kernel
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, y.shape[0], step):
        g = dy[i]
        dx[i] = g if y[i] > 0 else g * float32(0.0)


# lab:begin relu.launchers
STATIC_SIGNATURES = [
    (relu_forward_kernel, "void(float32[::1], float32[::1])", False),
    (relu_backward_kernel, "void(float32[::1], float32[::1], float32[::1])", False),
]


@checks.checked(checks.relu_forward, "cuda")
def relu_forward(y, x, stream=None):
    """y = max(x, 0), any shape, float32; ``y`` may be ``x`` (in place)."""
    if x.size == 0:
        return
    relu_forward_kernel[grid_1d(x.size), THREADS_PER_BLOCK, stream_or_default(stream)](
        flat(y), flat(x))


@checks.checked(checks.relu_backward, "cuda")
def relu_backward(dx, dy, y, stream=None):
    """dx = dy * (y > 0), any shape, float32; ``dx`` may be ``dy`` (in place)."""
    if y.size == 0:
        return
    relu_backward_kernel[grid_1d(y.size), THREADS_PER_BLOCK, stream_or_default(stream)](
        flat(dx), flat(dy), flat(y))
# lab:end relu.launchers
