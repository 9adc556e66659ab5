"""One call per op, NumPy in and NumPy out, backend chosen per call: the façade for labs.

Each function allocates its outputs (in the dtype of its main input), runs the chosen
backend's launcher (see :mod:`nbalex.backends`) and returns NumPy arrays.  ``backend`` is
``"reference"`` (NumPy), ``"cpu"`` (Numba on the CPU), ``"cuda"`` (Numba CUDA kernels; inputs
are copied to the device and results copied back, on a real GPU or under the simulator with
``NUMBA_ENABLE_CUDASIM=1``) or ``None``/``"auto"`` (``cuda`` when a GPU is present, else ``cpu``).
The ``cpu`` and ``cuda`` launchers expect float32; the reference also takes float64.  Every
call is checked on the host by :mod:`nbalex.checks` before anything is copied or computed, so
a bad call is the same ``ValueError`` on every backend.

A lab checking its own kernel against two backends::

    import numpy as np
    from nbalex import ops

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 13, 13), dtype=np.float32)
    w = rng.standard_normal((8, 3, 3, 3), dtype=np.float32)
    b = np.zeros(8, np.float32)

    y_ref = ops.conv2d_forward(x, w, b, stride=2, pad=1, backend="reference")
    y_gpu = ops.conv2d_forward(x, w, b, stride=2, pad=1, backend="cuda")
    assert np.allclose(y_ref, y_gpu, atol=1e-4)

    dx, dw, db = ops.conv2d_backward(np.ones_like(y_ref), x, w, stride=2, pad=1)
    y, idx = ops.maxpool_forward(y_ref, size=3, stride=2)
    loss, probs = ops.softmax_xent_forward(rng.standard_normal((4, 10)), np.arange(4))

Gradients are returned fresh from every backward call (the backends overwrite, never
accumulate, the buffers they are given).
"""

import numpy as np

from nbalex import checks
from nbalex.backends import get_backend, resolve

__all__ = [
    "conv2d_forward", "conv2d_backward",
    "linear_forward", "linear_backward",
    "relu_forward", "relu_backward",
    "lrn_forward", "lrn_backward",
    "maxpool_forward", "maxpool_backward",
    "dropout_forward", "dropout_backward",
    "softmax_xent_forward", "softmax_xent_backward",
    "sgd_update",
]


def _launcher(backend, name):
    """The launcher ``name`` of the backend ``backend`` (resolving None/"auto")."""
    module = get_backend(backend)
    fn = getattr(module, name, None)
    if fn is None:
        raise NotImplementedError(f"backend {module.__name__} has no launcher {name}")
    return fn


def _run(backend, name, outputs, inputs, *args):
    """Call launcher ``name`` as fn(*outputs, *inputs, *args) and leave results in ``outputs``.

    ``outputs`` and ``inputs`` are NumPy arrays (an output may be None: not wanted).  The call
    is checked here, on the host arrays (so label values are checked for cuda too); for the
    cuda backend the arrays are then copied to the device and the outputs copied back.
    """
    fn = _launcher(backend, name)
    which = resolve(backend)
    getattr(checks, name)(*outputs, *inputs, *args, backend=which)
    fn = checks.fast(fn)
    if which != "cuda":
        fn(*outputs, *inputs, *args)
        return
    from numba import cuda
    d_outputs = [None if o is None else cuda.device_array(o.shape, o.dtype) for o in outputs]
    d_inputs = [cuda.to_device(a) for a in inputs]
    fn(*d_outputs, *d_inputs, *args)
    for host, dev in zip(outputs, d_outputs):
        if host is not None:
            dev.copy_to_host(host)


def _array(a, dtype=None):
    """A C-contiguous NumPy array (the launchers' precondition)."""
    return np.ascontiguousarray(a, dtype=dtype)


# --- convolution ------------------------------------------------------------------------

def conv2d_forward(x, w, b, stride=1, pad=0, groups=1, backend=None):
    """y (N,F,OH,OW) = conv(x (N,C,H,W), w (F,C/groups,KH,KW)) + b (F,)."""
    x, w, b = _array(x), _array(w), _array(b)
    g = checks.conv2d_geometry(x.shape, w.shape, stride, pad, groups, op="conv2d_forward")
    y = np.empty((g[0], g[4], g[8], g[9]), x.dtype)
    _run(backend, "conv2d_forward", [y], [x, w, b], stride, pad, groups)
    return y


def conv2d_backward(dy, x, w, stride=1, pad=0, groups=1, backend=None):
    """(dx, dw, db): gradients w.r.t. x, w and b given dy = dL/dy (N,F,OH,OW)."""
    dy, x, w = _array(dy), _array(x), _array(w)
    dx = np.empty(x.shape, x.dtype)
    dw = np.empty(w.shape, x.dtype)
    db = np.empty(w.shape[0], x.dtype)
    _run(backend, "conv2d_backward_data", [dx], [dy, w], stride, pad, groups)
    _run(backend, "conv2d_backward_weights", [dw, db], [dy, x], stride, pad, groups)
    return dx, dw, db


# --- fully connected --------------------------------------------------------------------

def linear_forward(x, w, b, backend=None):
    """y (N,M) = x (N,K) @ w.T (K,M) + b (M,)."""
    x, w, b = _array(x), _array(w), _array(b)
    y = np.empty((x.shape[0], w.shape[0]), x.dtype)
    _run(backend, "linear_forward", [y], [x, w, b])
    return y


def linear_backward(dy, x, w, backend=None):
    """(dx, dw, db) = (dy @ w, dy.T @ x, dy.sum(0)) given dy = dL/dy (N,M)."""
    dy, x, w = _array(dy), _array(x), _array(w)
    dx = np.empty(x.shape, x.dtype)
    dw = np.empty(w.shape, x.dtype)
    db = np.empty(w.shape[0], x.dtype)
    _run(backend, "linear_backward_data", [dx], [dy, w])
    _run(backend, "linear_backward_weights", [dw, db], [dy, x])
    return dx, dw, db


# --- elementwise and normalisation ------------------------------------------------------

def relu_forward(x, backend=None):
    """y = max(x, 0)."""
    x = _array(x)
    y = np.empty_like(x)
    _run(backend, "relu_forward", [y], [x])
    return y


def relu_backward(dy, y, backend=None):
    """dx = dy * (y > 0), y being relu_forward's output."""
    dy, y = _array(dy), _array(y)
    dx = np.empty_like(dy)
    _run(backend, "relu_backward", [dx], [dy, y])
    return dx


def lrn_forward(x, size=5, alpha=1e-4, beta=0.75, k=2.0, backend=None):
    """y = x / (k + alpha * sum of x**2 over ``size`` adjacent channels)**beta.

    As in the paper, alpha is not divided by ``size``.
    """
    x = _array(x)
    y = np.empty_like(x)
    _run(backend, "lrn_forward", [y, None], [x], size, alpha, beta, k)   # scale not kept
    return y


def lrn_backward(dy, x, y, size=5, alpha=1e-4, beta=0.75, k=2.0, backend=None):
    """dx given dy, the forward input x and its output y (the denominator is recomputed)."""
    dy, x, y = _array(dy), _array(x), _array(y)
    y_again, scale = np.empty_like(x), np.empty_like(x)
    _run(backend, "lrn_forward", [y_again, scale], [x], size, alpha, beta, k)
    dx = np.empty_like(x)
    _run(backend, "lrn_backward", [dx], [dy, x, y, scale], size, alpha, beta, k)
    return dx


# --- pooling and dropout ----------------------------------------------------------------

def maxpool_forward(x, size=3, stride=2, backend=None):
    """(y, idx): window maxima (N,C,OH,OW) and their int32 positions h*W+w in each plane."""
    x = _array(x)
    shape = checks.pooled_shape(x.shape, size, stride, op="maxpool_forward")
    y, idx = np.empty(shape, x.dtype), np.empty(shape, np.int32)
    _run(backend, "maxpool_forward", [y, idx], [x], size, stride)
    return y, idx


def maxpool_backward(dy, idx, x_shape, size=3, stride=2, backend=None):
    """dx of shape ``x_shape``: each dy routed to its idx, summed where windows overlap."""
    dy, idx = _array(dy), _array(idx, np.int32)
    dx = np.empty(tuple(x_shape), dy.dtype)
    _run(backend, "maxpool_backward", [dx], [dy, idx], size, stride)
    return dx


def dropout_forward(x, p=0.5, seed=0, offset=0, backend=None):
    """(y, mask): y = x * mask / (1-p), mask uint8 from the counter-based hash of (seed,
    offset + flat index); ``offset`` is the flat index of x's first element in a larger batch
    (x a slice of it: the slice then draws the mask the whole batch would)."""
    x = _array(x)
    y, mask = np.empty_like(x), np.empty(x.shape, np.uint8)
    _run(backend, "dropout_forward", [y, mask], [x], p, seed, offset)
    return y, mask


def dropout_backward(dy, mask, p=0.5, backend=None):
    """dx = dy * mask / (1-p)."""
    dy, mask = _array(dy), _array(mask, np.uint8)
    dx = np.empty_like(dy)
    _run(backend, "dropout_backward", [dx], [dy, mask], p)
    return dx


# --- loss and update --------------------------------------------------------------------

def softmax_xent_forward(logits, labels, backend=None):
    """(loss, probs): the batch-mean cross-entropy as a Python float, and the softmax (N,K)."""
    logits, labels = _array(logits), _array(labels, np.int32)
    losses = np.empty(logits.shape[0], logits.dtype)
    probs = np.empty_like(logits)
    _run(backend, "softmax_xent_forward", [losses, probs], [logits, labels])
    return float(losses.mean()), probs


def softmax_xent_backward(probs, labels, backend=None):
    """dlogits = (probs - onehot(labels)) / N, the gradient of the mean loss."""
    probs, labels = _array(probs), _array(labels, np.int32)
    dlogits = np.empty_like(probs)
    _run(backend, "softmax_xent_backward", [dlogits], [probs, labels])
    return dlogits


def sgd_update(w, dw, v, lr, momentum=0.9, weight_decay=5e-4, backend=None):
    """In place, the paper's rule: v <- momentum*v - weight_decay*lr*w - lr*dw; w <- w + v.

    ``w`` and ``v`` (NumPy arrays of any shape, the same as ``dw``) are updated in place.
    """
    fn = _launcher(backend, "sgd_update")
    flat_w, flat_v = _array(w).reshape(-1), _array(v).reshape(-1)
    flat_dw = _array(dw, flat_w.dtype).reshape(-1)
    checks.sgd_update(flat_w, flat_dw, flat_v, lr, momentum, weight_decay, backend=resolve(backend))
    fn = checks.fast(fn)
    if resolve(backend) == "cuda":
        from numba import cuda
        d_w, d_dw, d_v = cuda.to_device(flat_w), cuda.to_device(flat_dw), cuda.to_device(flat_v)
        fn(d_w, d_dw, d_v, lr, momentum, weight_decay)
        d_w.copy_to_host(flat_w)
        d_v.copy_to_host(flat_v)
    else:
        fn(flat_w, flat_dw, flat_v, lr, momentum, weight_decay)
    # When w/v were C-contiguous the flat views already wrote through; otherwise copy back.
    if not np.shares_memory(flat_w, w):
        w[...] = flat_w.reshape(w.shape)
    if not np.shares_memory(flat_v, v):
        v[...] = flat_v.reshape(v.shape)
