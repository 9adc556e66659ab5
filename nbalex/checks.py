"""One argument check per launcher, shared by every backend, the ops façade and the network.

Each launcher of :mod:`nbalex.backends` has a check here of the same name and signature plus
a keyword ``backend``; every backend's launcher is wrapped by :func:`checked`, so the three
backends refuse the same bad call with the same ``ValueError`` and the same message
("<launcher>: <what is wrong>").  What is checked:

* arrays: dtype, C-contiguity, number of axes and every shape the contract ties together
  (a bias as long as the filter count, outputs of the right size, ...);
* one float dtype per call: float32 everywhere; the ``reference`` backend alone also takes
  float64 (for finite-difference gradient checks);
* integers (stride, pad, groups, pool size, dropout seed and offset) are integers in range,
  floats (dropout p, LRN and SGD hyper-parameters) are finite and in range;
* values of index arrays (labels, SGD offsets, crop offsets) when they are host NumPy arrays;
  device arrays are never read back (a check must not copy or synchronise).

Checks read only ``shape``, ``dtype`` and ``flags``, so :func:`like` (a stand-in with no
memory) lets the network check its whole plan once when it is built.  The per-step fast path
is ``launcher.unchecked`` (the same function without the check; :func:`fast` finds it), which
the network uses after that build-time check and nobody else needs.
"""

import functools
import math
import operator

import numpy as np

__all__ = ["checked", "fast", "like", "conv2d_geometry", "pooled_shape", "integer", "sgd_scalars"]

FLOATS = {"reference": ("float32", "float64")}
"""Float dtypes a backend computes in; a backend not listed takes float32 only."""


class like:
    """A stand-in for an array of ``shape`` and ``dtype`` (C-contiguous, no memory): lets a
    caller check a launch before the arrays exist."""

    def __init__(self, shape, dtype=np.float32):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.size = math.prod(self.shape)
        self.flags = {"C_CONTIGUOUS": True}


def checked(check, backend=None):
    """Decorator: run ``check(*args, backend=backend, **kwargs)`` before the launcher.

    The wrapped launcher keeps its name, docstring and signature (``inspect.signature``
    follows ``__wrapped__``) and gains ``.unchecked``, the bare launcher.
    """
    def wrap(launcher):
        @functools.wraps(launcher)
        def checked_launcher(*args, **kwargs):
            check(*args, backend=backend, **kwargs)
            return launcher(*args, **kwargs)
        checked_launcher.unchecked = launcher
        return checked_launcher
    return wrap


def fast(launcher):
    """The launcher without its argument check (itself when it has none)."""
    return getattr(launcher, "unchecked", launcher)


class _Call:
    """The checks of one launcher call: remembers the op's name and its float dtype."""

    def __init__(self, op, backend):
        self.op, self.backend, self.float = op, backend, None

    def fail(self, message):
        raise ValueError(f"{self.op}: {message}")

    def array(self, name, a, shape=None, dtype=None, ndim=None, contiguous=True):
        """Check dtype (None: the call's float dtype), contiguity, ndim and shape of ``a``."""
        if not all(hasattr(a, attr) for attr in ("dtype", "shape")):
            self.fail(f"{name} must be an array, got {type(a).__name__}")
        got = np.dtype(a.dtype)
        if dtype is None:
            self._float(name, got)
        elif got != np.dtype(dtype):
            self.fail(f"{name} must be {np.dtype(dtype)}, got {got}")
        if contiguous and not a.flags["C_CONTIGUOUS"]:
            self.fail(f"{name} must be C-contiguous (np.ascontiguousarray makes a copy that is)")
        if ndim is not None and len(a.shape) != ndim:
            self.fail(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
        if shape is not None and tuple(a.shape) != tuple(int(s) for s in shape):
            self.fail(f"{name} has shape {tuple(a.shape)}, expected {tuple(int(s) for s in shape)}")
        return tuple(int(s) for s in a.shape)

    def _float(self, name, got):
        allowed = FLOATS.get(self.backend, ("float32",))
        if self.float is None:
            if got.name not in allowed:
                if got == np.float64:
                    self.fail(f"{name} is float64; the {self.backend} backend computes in "
                              "float32 (only the reference also takes float64)")
                self.fail(f"{name} must be float32, got {got}")
            self.float = got
        elif got != self.float:
            self.fail(f"{name} is {got} but the other arrays are {self.float}: "
                      "one call takes one float dtype")

    def integer(self, name, value, lowest=None):
        try:
            v = operator.index(value)
        except TypeError:
            self.fail(f"{name} must be an integer, got {value!r}")
        if lowest is not None and v < lowest:
            self.fail(f"{name} must be >= {lowest}, got {v}")
        return v

    def real(self, name, value):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{name} must be a number, got {value!r}")
        if not math.isfinite(v):
            self.fail(f"{name} must be finite, got {v}")
        return v


def _geometry(call, x_shape, w_shape, stride, pad, groups):
    """(N, C, H, W, F, C/G, KH, KW, OH, OW) of a convolution, every rule of it checked."""
    if len(x_shape) != 4 or len(w_shape) != 4:
        call.fail(f"x {tuple(x_shape)} and w {tuple(w_shape)} must both be 4-D (N,C,H,W), "
                  "(F,C/groups,KH,KW)")
    n, c, h, wd = (int(s) for s in x_shape)
    f, cg, kh, kw = (int(s) for s in w_shape)
    for name, v in (("stride", stride), ("pad", pad), ("groups", groups)):
        call.integer(name, v)
    if stride < 1 or pad < 0 or groups < 1:
        call.fail(f"need stride >= 1, pad >= 0, groups >= 1; got {stride}, {pad}, {groups}")
    if min(n, c, h, wd, f, cg, kh, kw) < 1:
        call.fail(f"empty tensors are not supported: x {tuple(x_shape)}, w {tuple(w_shape)}")
    if c % groups or f % groups or c // groups != cg:
        call.fail(f"x {tuple(x_shape)} and w {tuple(w_shape)} do not fit groups={groups} "
                  f"(groups must divide the {c} channels and {f} filters, w.shape[1] = C/groups)")
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    if oh < 1 or ow < 1:
        call.fail(f"kernel {kh}x{kw} larger than padded input {h}x{wd} (pad {pad})")
    return n, c, h, wd, f, cg, kh, kw, oh, ow


def conv2d_geometry(x_shape, w_shape, stride, pad, groups, op="conv2d"):
    """(N, C, H, W, F, C/G, KH, KW, OH, OW), or the ValueError every backend raises."""
    return _geometry(_Call(op, None), x_shape, w_shape, stride, pad, groups)


def conv2d_workspace_size(x_shape, w_shape, stride, pad, groups, backend=None):
    _geometry(_Call("conv2d_workspace_size", backend), x_shape, w_shape, stride, pad, groups)


def _conv(op, backend, img_name, img, w_name, w, stride, pad, groups):
    call = _Call(op, backend)
    x_shape = call.array(img_name, img, ndim=4)
    w_shape = call.array(w_name, w, ndim=4)
    g = _geometry(call, x_shape, w_shape, stride, pad, groups)
    return call, (g[0], g[4], g[8], g[9])


def conv2d_forward(y, x, w, b, stride, pad, groups, relu=False, workspace=None, stream=None,
                   backend=None):
    call, (n, f, oh, ow) = _conv("conv2d_forward", backend, "x", x, "w", w, stride, pad, groups)
    call.array("b", b, shape=(f,))
    call.array("y", y, shape=(n, f, oh, ow))


def conv2d_backward_data(dx, dy, w, stride, pad, groups, workspace=None, stream=None,
                         backend=None):
    call, (n, f, oh, ow) = _conv("conv2d_backward_data", backend, "dx", dx, "w", w,
                                 stride, pad, groups)
    call.array("dy", dy, shape=(n, f, oh, ow))


def conv2d_backward_weights(dw, db, dy, x, stride, pad, groups, workspace=None, stream=None,
                            backend=None):
    call, (n, f, oh, ow) = _conv("conv2d_backward_weights", backend, "x", x, "dw", dw,
                                 stride, pad, groups)
    call.array("dy", dy, shape=(n, f, oh, ow))
    call.array("db", db, shape=(f,))


def _linear_sizes(call, n, m, k):
    if min(n, m, k) < 1:
        call.fail(f"linear layer sizes must be positive, got N={n}, M={m}, K={k}")


def linear_workspace_size(x_shape, w_shape, backend=None):
    call = _Call("linear_workspace_size", backend)
    if len(x_shape) != 2 or len(w_shape) != 2 or int(x_shape[1]) != int(w_shape[1]):
        call.fail(f"x {tuple(x_shape)} and w {tuple(w_shape)} must be (N,K) and (M,K)")
    _linear_sizes(call, int(x_shape[0]), int(w_shape[0]), int(x_shape[1]))


def linear_forward(y, x, w, b, relu=False, workspace=None, stream=None, backend=None):
    call = _Call("linear_forward", backend)
    n, k = call.array("x", x, ndim=2)
    m = call.array("w", w, ndim=2)[0]
    call.array("w", w, shape=(m, k))
    call.array("b", b, shape=(m,))
    call.array("y", y, shape=(n, m))
    _linear_sizes(call, n, m, k)


def linear_backward_data(dx, dy, w, workspace=None, stream=None, backend=None):
    call = _Call("linear_backward_data", backend)
    n, m = call.array("dy", dy, ndim=2)
    k = call.array("w", w, ndim=2)[1]
    call.array("w", w, shape=(m, k))
    call.array("dx", dx, shape=(n, k))
    _linear_sizes(call, n, m, k)


def linear_backward_weights(dw, db, dy, x, workspace=None, stream=None, backend=None):
    call = _Call("linear_backward_weights", backend)
    n, m = call.array("dy", dy, ndim=2)
    k = call.array("x", x, ndim=2)[1]
    call.array("x", x, shape=(n, k))
    call.array("dw", dw, shape=(m, k))
    call.array("db", db, shape=(m,))
    _linear_sizes(call, n, m, k)


def relu_forward(y, x, stream=None, backend=None):
    call = _Call("relu_forward", backend)
    call.array("y", y, shape=call.array("x", x))


def relu_backward(dx, dy, y, stream=None, backend=None):
    call = _Call("relu_backward", backend)
    shape = call.array("y", y)
    call.array("dy", dy, shape=shape)
    call.array("dx", dx, shape=shape)


def _lrn_params(call, size, alpha, beta, k):
    call.integer("size", size, lowest=1)
    alpha, k = call.real("alpha", alpha), call.real("k", k)
    call.real("beta", beta)
    if alpha < 0 or k <= 0:
        call.fail(f"need alpha >= 0 and k > 0 (the denominator stays positive); got alpha "
                  f"{alpha}, k {k}")


def _lrn_input(call, x):
    shape = call.array("x", x)
    if len(shape) < 2:
        call.fail(f"LRN needs an (N, C, ...) array, got shape {shape}")
    return shape


def lrn_forward(y, scale, x, size, alpha, beta, k, stream=None, backend=None):
    call = _Call("lrn_forward", backend)
    shape = _lrn_input(call, x)
    _lrn_params(call, size, alpha, beta, k)
    call.array("y", y, shape=shape)
    if scale is not None:
        call.array("scale", scale, shape=shape)


def lrn_backward(dx, dy, x, y, scale, size, alpha, beta, k, stream=None, backend=None):
    call = _Call("lrn_backward", backend)
    shape = _lrn_input(call, x)
    _lrn_params(call, size, alpha, beta, k)
    if scale is None:
        call.fail("scale is None: lrn_backward needs the scale lrn_forward saved")
    for name, a in (("dx", dx), ("dy", dy), ("y", y), ("scale", scale)):
        call.array(name, a, shape=shape)


def pooled_shape(x_shape, size, stride, op="maxpool"):
    """(N, C, OH, OW) of max-pooling x (N,C,H,W), or the ValueError every backend raises."""
    return _pooled(_Call(op, None), tuple(x_shape), size, stride)


def _pooled(call, shape, size, stride):
    if len(shape) != 4:
        call.fail(f"max-pooling needs an (N, C, H, W) array, got shape {shape}")
    size, stride = call.integer("size", size), call.integer("stride", stride)
    if size < 1 or stride < 1:
        call.fail(f"pool size and stride must be positive, got {size}, {stride}")
    n, c, h, w = shape
    if h < size or w < size:
        call.fail(f"pool window {size} is larger than the input plane {h}x{w}")
    return n, c, (h - size) // stride + 1, (w - size) // stride + 1


def maxpool_forward(y, idx, x, size, stride, stream=None, backend=None):
    call = _Call("maxpool_forward", backend)
    out = _pooled(call, call.array("x", x), size, stride)
    call.array("y", y, shape=out)
    if idx is not None:
        call.array("idx", idx, dtype=np.int32, shape=out)


def maxpool_backward(dx, dy, idx, size, stride, stream=None, backend=None):
    call = _Call("maxpool_backward", backend)
    out = _pooled(call, call.array("dx", dx), size, stride)
    call.array("dy", dy, shape=out)
    if idx is None:
        call.fail("idx is None: maxpool_backward needs the argmax maxpool_forward saved")
    call.array("idx", idx, dtype=np.int32, shape=out)


def _p(call, p):
    p = call.real("p", p)
    if not 0.0 <= p < 1.0:
        call.fail(f"dropout probability must be in [0, 1), got {p}")


def dropout_forward(y, mask, x, p, seed, offset=0, stream=None, backend=None):
    call = _Call("dropout_forward", backend)
    shape = call.array("x", x)
    _p(call, p)
    call.integer("seed", seed)
    call.integer("offset", offset, lowest=0)
    call.array("y", y, shape=shape)
    call.array("mask", mask, dtype=np.uint8, shape=shape)


def dropout_backward(dx, dy, mask, p, stream=None, backend=None):
    call = _Call("dropout_backward", backend)
    shape = call.array("dy", dy)
    _p(call, p)
    call.array("dx", dx, shape=shape)
    call.array("mask", mask, dtype=np.uint8, shape=shape)


def _labels(call, labels, n, classes):
    call.array("labels", labels, dtype=np.int32, shape=(n,))
    if isinstance(labels, np.ndarray) and n and (labels.min() < 0 or labels.max() >= classes):
        call.fail(f"labels must lie in [0, {classes}), got {labels.min()}..{labels.max()}")


def softmax_xent_forward(losses, probs, logits, labels, stream=None, backend=None):
    call = _Call("softmax_xent_forward", backend)
    n, k = call.array("logits", logits, ndim=2)
    if k < 1:
        call.fail(f"logits need at least one class, got shape {(n, k)}")
    _labels(call, labels, n, k)
    call.array("probs", probs, shape=(n, k))
    call.array("losses", losses, shape=(n,))


def softmax_xent_backward(dlogits, probs, labels, stream=None, backend=None):
    call = _Call("softmax_xent_backward", backend)
    n, k = call.array("probs", probs, ndim=2)
    if k < 1:
        call.fail(f"probs need at least one class, got shape {(n, k)}")
    _labels(call, labels, n, k)
    call.array("dlogits", dlogits, shape=(n, k))


def integer(op, name, value, lowest=None):
    """``value`` as an int, or the ValueError "<op>: <name> must be an integer / >= lowest"."""
    return _Call(op, None).integer(name, value, lowest)


def sgd_scalars(lr, momentum, weight_decay, op="sgd_update"):
    """lr, momentum and weight_decay finite numbers: the ValueError every backend raises."""
    call = _Call(op, None)
    for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        call.real(name, v)


def sgd_update(w, dw, v, lr, momentum, weight_decay, offsets=None, lr_mults=None,
               decay_mults=None, nonfinite=None, stream=None, backend=None):
    call = _Call("sgd_update", backend)
    size = call.array("w", w, ndim=1)[0]
    call.array("dw", dw, shape=(size,))
    call.array("v", v, shape=(size,))
    sgd_scalars(lr, momentum, weight_decay)
    if offsets is None:
        if lr_mults is not None or decay_mults is not None:
            call.fail("lr_mults and decay_mults need offsets (the tensors' boundaries)")
    else:
        call.array("offsets", offsets, dtype=np.int64, ndim=1)
        if offsets.shape[0] < 2:
            call.fail(f"offsets must be 1-D with at least 2 entries, got shape "
                      f"{tuple(offsets.shape)}")
        if isinstance(offsets, np.ndarray) and (offsets[0] != 0 or offsets[-1] != size
                                                 or np.any(np.diff(offsets) < 0)):
            call.fail(f"offsets must rise from 0 to len(w) = {size}, got {offsets}")
        tensors = offsets.shape[0] - 1
        for name, mults in (("lr_mults", lr_mults), ("decay_mults", decay_mults)):
            if mults is not None:
                if np.dtype(mults.dtype).kind != "f":
                    call.fail(f"{name} must be float32 or float64, got {np.dtype(mults.dtype)}")
                call.array(name, mults, dtype=mults.dtype, shape=(tensors,))
    if nonfinite is not None:
        call.array("nonfinite", nonfinite, dtype=np.int32, shape=(1,))


def augment_batch(out, images, crop_y, crop_x, flip, rgb_shift, mean, stream=None,
                  backend=None):
    call = _Call("augment_batch", backend)
    batch, channels, crop, crop_w = call.array("out", out, ndim=4, contiguous=False)
    size = call.array("images", images, dtype=np.uint8, ndim=4)[1]
    if channels != 3 or crop != crop_w or images.shape[0] != batch or images.shape[3] != 3 \
            or crop > size:
        call.fail(f"out {tuple(out.shape)} and images {tuple(images.shape)} do not match")
    call.array("mean", mean, shape=(size, size, 3))
    call.array("rgb_shift", rgb_shift, shape=(batch, 3))
    for name, a in (("crop_y", crop_y), ("crop_x", crop_x)):
        call.array(name, a, dtype=np.int32, shape=(batch,))
        if isinstance(a, np.ndarray) and batch and (a.min() < 0 or a.max() > size - crop):
            call.fail(f"crop offsets outside 0..{size - crop}")
    call.array("flip", flip, dtype=np.uint8, shape=(batch,))
