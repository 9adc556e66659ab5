"""The launcher contract shared by the ``reference``, ``cpu`` and ``cuda`` backends.

Every backend package (``nbalex.reference``, ``nbalex.cpu``, ``nbalex.cuda``) exports the
functions named in :data:`LAUNCHERS` with exactly these signatures. Launchers write into
buffers the caller owns (outputs first) and return ``None``; ``stream`` is a CUDA stream for
the ``cuda`` backend and ignored elsewhere. ``workspace`` (conv and linear) is an optional flat
float32 buffer of at least ``conv2d_workspace_size(...)`` / ``linear_workspace_size(...)``
elements; when it is ``None`` the launcher allocates what it needs (fine for the ops façade,
never done inside a training step, where the network's arena holds one shared workspace).

Arguments are checked once, by :mod:`nbalex.checks`: each backend's launcher is wrapped by
``checks.checked(checks.<launcher>, backend)``, so the three backends refuse the same bad call
with the same ``ValueError`` ("<launcher>: <what is wrong>").  ``launcher.unchecked`` is the
same launcher without the check, for callers that checked their plan already (the network
does, once, when it is built).  Optional arguments added to the contract go before ``stream``
with a default that keeps the old behaviour, so positional calls stay valid.

Shapes and dtypes (float32 unless stated; the reference also accepts float64):

conv2d_forward(y, x, w, b, stride, pad, groups, relu=False, workspace=None, stream=None)
    x (N,C,H,W), w (F,C/groups,KH,KW), b (F,), y (N,F,OH,OW), OH=(H+2*pad-KH)//stride+1.
    y = conv(x, w) + b, then max(y, 0) when relu.  y is overwritten.
conv2d_backward_data(dx, dy, w, stride, pad, groups, workspace=None, stream=None)
    dx (N,C,H,W) overwritten with the gradient w.r.t. x.
conv2d_backward_weights(dw, db, dy, x, stride, pad, groups, workspace=None, stream=None)
    dw (F,C/groups,KH,KW), db (F,) overwritten (gradients are never accumulated).
conv2d_workspace_size(x_shape, w_shape, stride, pad, groups) -> int
    float32 elements of workspace the conv launchers want (0 when none).
linear_forward(y, x, w, b, relu=False, workspace=None, stream=None)
    x (N,K), w (M,K), b (M,), y (N,M) = x @ w.T + b, then max(y, 0) when relu.
linear_backward_data(dx, dy, w, workspace=None, stream=None)          dx (N,K) = dy @ w
linear_backward_weights(dw, db, dy, x, workspace=None, stream=None)   dw (M,K) = dy.T @ x,
    db = dy.sum(0)
linear_workspace_size(x_shape, w_shape) -> int
    float32 elements of workspace the linear launchers want (0 when none).
relu_forward(y, x, stream=None)                       y = max(x, 0); y may be x
relu_backward(dx, dy, y, stream=None)                 dx = dy * (y > 0); dx may be dy
lrn_forward(y, scale, x, size, alpha, beta, k, stream=None)
    scale[n,c] = k + alpha * sum_{c' in [c-size//2, c+size//2] ∩ [0,C)} x[n,c']**2
    y = x * scale**(-beta).  scale is kept for the backward pass; scale=None (inference)
    keeps nothing.  Works on any (N,C,...) x; size >= 1, alpha >= 0, k > 0.
lrn_backward(dx, dy, x, y, scale, size, alpha, beta, k, stream=None)
    dx[c] = dy[c]*scale[c]**-beta - 2*alpha*beta*x[c] * sum_{j: c in window(j)} dy[j]*y[j]/scale[j]
maxpool_forward(y, idx, x, size, stride, stream=None)
    x (N,C,H,W), y (N,C,OH,OW), OH=(H-size)//stride+1 (floor).  idx int32 (N,C,OH,OW): the
    argmax as h*W+w within its (n,c) plane; ties go to the first in row-major window order.
    idx=None (inference) keeps nothing.  size <= H and size <= W.
maxpool_backward(dx, dy, idx, size, stride, stream=None)
    dx (N,C,H,W) overwritten: each dy routed to its idx (summed where windows overlap).
dropout_forward(y, mask, x, p, seed, offset=0, stream=None)
    mask uint8, same shape as x: 1 where kept, mask[i] = dropout_keep(seed, offset + i, p)
    (i the flat C-order index); y = x * mask / (1-p); 0 <= p < 1.  offset >= 0 is the flat
    index of x[0] in the global batch when x is a slice of it (data parallelism: rank r of a
    batch split in N holding examples [r*B/N, (r+1)*B/N) passes offset = r*B/N * elements per
    example), so every slice draws the mask one process would draw for the whole batch.
dropout_backward(dx, dy, mask, p, stream=None)        dx = dy * mask / (1-p)
softmax_xent_forward(losses, probs, logits, labels, stream=None)
    logits (N,K), labels int32 (N,), probs (N,K) softmax, losses (N,) = logsumexp - logit[label].
softmax_xent_backward(dlogits, probs, labels, stream=None)
    dlogits = (probs - onehot(labels)) / N.
sgd_update(w, dw, v, lr, momentum, weight_decay, offsets=None, lr_mults=None, decay_mults=None, nonfinite=None, stream=None)
    Flat 1-D float32 w, dw, v, updated in place, the paper's rule per element i of tensor t:
      v <- momentum*v - lr*lr_mults[t]*(weight_decay*decay_mults[t]*w + dw);  w <- w + v
    offsets int64 (T+1,) are the tensors' boundaries in the flat buffers; None = one tensor
    with both multipliers 1.  nonfinite, int32 (1,) (a device array on cuda) or None: set to
    1 when any w is NaN or infinite after the update, never cleared (the caller zeroes it).
augment_batch(out, images, crop_y, crop_x, flip, rgb_shift, mean, stream=None)
    images uint8 (B,S,S,3) HWC RGB, out float32 (B,3,Cr,Cr), crop_y/crop_x int32 (B,),
    flip uint8 (B,), rgb_shift float32 (B,3) (PCA colour noise), mean float32 (S,S,3):
      out[b,c,i,j] = images[b,y+i,x+jj,c] - mean[y+i,x+jj,c] + rgb_shift[b,c],
      y=crop_y[b], x=crop_x[b], jj = Cr-1-j if flip[b] else j.

Dropout masks come from a counter-based hash, identical on every backend (see
:func:`dropout_keep`), so the same seed gives the same mask everywhere.

Device-resident scalars (planned, for CUDA graph capture; not implemented): a captured graph
freezes kernel arguments, so the two per-step scalars will be accepted, in the same
positional places, as 1-element device arrays besides Python numbers: ``dropout_forward``'s
``seed`` as uint32 (1,) (the layer's seed, mixed inside the kernel) and ``sgd_update``'s
``lr`` as float32 (1,).  The kernel then reads element 0 when it runs; the network keeps one
small device table (a seed per dropout layer, the learning rate) that a single host-to-device
copy from pinned memory refreshes before each replay.  The checks will accept a (1,) array of
that dtype there; no other argument changes.
"""

import importlib
import inspect

LAUNCHERS = (
    "conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights", "conv2d_workspace_size",
    "linear_forward", "linear_backward_data", "linear_backward_weights", "linear_workspace_size",
    "relu_forward", "relu_backward",
    "lrn_forward", "lrn_backward",
    "maxpool_forward", "maxpool_backward",
    "dropout_forward", "dropout_backward",
    "softmax_xent_forward", "softmax_xent_backward",
    "sgd_update",
    "augment_batch",
)

BACKENDS = ("reference", "cpu", "cuda")

MASK32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer finaliser (lowbias32): the dropout hash's mixing step.

    Backends must reproduce it bit for bit in uint32 arithmetic (wrap-around multiply).
    """
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def dropout_threshold(p):
    """Elements whose 24-bit draw is below this are dropped: floor(p * 2**24)."""
    return int(p * 16777216.0)


def dropout_keep(seed, index, p):
    """The dropout rule, for one element: keep element ``index`` (flat, C order) for ``seed``?

    u = mix32(index ^ mix32(seed ^ 0x9E3779B9)); kept iff (u >> 8) >= floor(p * 2**24).
    """
    s = mix32((seed & MASK32) ^ 0x9E3779B9)
    u = mix32((index & MASK32) ^ s)
    return (u >> 8) >= dropout_threshold(p)


def workspace_view(workspace, size, allocate):
    """The first ``size`` elements of a caller's ``workspace`` (flat float32, NumPy or device
    array), or ``allocate(size)`` when it is None; a ValueError when it does not qualify."""
    if workspace is None:
        return allocate(size)
    kind = (workspace.dtype.kind, workspace.dtype.itemsize)    # float32 (str(dtype) is slow)
    if kind != ("f", 4) or len(workspace.shape) != 1 or workspace.size < size:
        raise ValueError(f"workspace must be flat float32 with >= {size} elements")
    return workspace[:size]


def host_array(size):
    """A new flat float32 NumPy array: the host backends' ``allocate`` for workspace_view."""
    import numpy as np
    return np.empty(size, np.float32)


def cuda_available():
    """True when a real CUDA GPU is usable, or the simulator is switched on."""
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # no driver, no toolkit
        return False


def resolve(name, need_device=True):
    """Map ``auto`` to ``cuda`` when a GPU is present, else ``cpu``; check the name.

    Asking for ``cuda`` where no GPU is usable (and the simulator is off) is a ValueError
    that says so, rather than a driver error at the first kernel launch; with
    ``need_device=False`` (sizing memory, reading launcher rules) it is allowed.
    """
    if name in (None, "auto"):
        return "cuda" if cuda_available() else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of auto, {', '.join(BACKENDS)}")
    if name == "cuda" and need_device and not cuda_available():
        raise ValueError("backend cuda needs an NVIDIA GPU with its driver, and none is usable "
                         "here; use --backend cpu (or set NUMBA_ENABLE_CUDASIM=1 for the "
                         "simulator)")
    return name


def get_backend(name="auto", need_device=True):
    """The backend module (``nbalex.reference``, ``nbalex.cpu`` or ``nbalex.cuda``);
    ``need_device`` as in :func:`resolve`."""
    return importlib.import_module(f"nbalex.{resolve(name, need_device)}")


def signatures(module):
    """{launcher name: inspect.Signature} for a backend module, for the contract test."""
    return {n: inspect.signature(getattr(module, n)) for n in LAUNCHERS}
