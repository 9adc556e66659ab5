"""SGD with momentum and weight decay (the paper's rule) on the GPU: one launch per step.

Parameters, gradients and momentum are each one flat buffer with the same layout; the
launch walks the whole buffer with a grid-stride loop and each thread finds the tensor of
its element from ``offsets`` (the tensors' boundaries) to pick that tensor's learning-rate
and weight-decay multipliers.  Because a thread's elements only increase, its tensor index
only moves forward: the search is a short forward scan (T is about 16), amortised over the
loop.  Without ``offsets`` a kernel variant with no multipliers updates the whole buffer.

``nonfinite``, an int32 (1,) device array, is set to 1 by any thread whose updated w is NaN
or infinite (many threads may store the same 1: no atomics needed); the kernels never clear
it.  Passed as None, the check is compiled out (Numba prunes the ``is not None`` branch).
"""

# lab:begin sgd.imports
import math

import numpy as np
from numba import cuda

from nbalex import checks
from nbalex.cuda.launch import THREADS_PER_BLOCK, grid_1d, stream_or_default
# lab:end sgd.imports


# lab:begin sgd.helpers
@cuda.jit(device=True, inline="always")
def flag_nonfinite(nonfinite, value):
    """nonfinite[0] = 1 when value is NaN or infinite (nothing when nonfinite is None)."""
    if nonfinite is not None:
        if not math.isfinite(value):
            nonfinite[0] = 1
# lab:end sgd.helpers


# lab:begin sgd.update_kernel
@cuda.jit
def sgd_update_kernel(w, dw, v, lr, momentum, weight_decay, offsets, lr_mults, decay_mults,
                      nonfinite):
    """For every element i of tensor t (offsets[t] <= i < offsets[t+1]):
    v[i] = momentum*v[i] - lr*lr_mults[t] * (weight_decay*decay_mults[t]*w[i] + dw[i]);
    w[i] += v[i]; nonfinite[0] = 1 if that w[i] is not finite (never cleared).

    w, dw, v: 1-D float32 (same length), w and v updated in place, dw read.
    offsets: (T+1,) int64, offsets[0] = 0, offsets[T] = len(w); lr_mults, decay_mults: (T,)
    float32; nonfinite: int32 (1,) or None.  One grid-stride loop over the elements.
    """
    # lab:end sgd.update_kernel
    last_tensor = lr_mults.shape[0] - 1
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    t = 0
    for i in range(start, w.shape[0], step):
        while t < last_tensor and offsets[t + 1] <= i:  # i only grows, so t only moves forward
            t += 1
        step_lr = lr * lr_mults[t]
        decay = weight_decay * decay_mults[t]
        wi = w[i]
        vi = momentum * v[i] - step_lr * (decay * wi + dw[i])
        v[i] = vi
        wi = wi + vi
        w[i] = wi
        flag_nonfinite(nonfinite, wi)


# lab:begin sgd.single_kernel
@cuda.jit
def sgd_update_single_kernel(w, dw, v, lr, momentum, weight_decay, nonfinite):
    """The same rule with both multipliers 1 for every element:
    v[i] = momentum*v[i] - lr*(weight_decay*w[i] + dw[i]);  w[i] += v[i]; the same flag.

    w, dw, v: 1-D float32 (same length), w and v updated in place, dw read; nonfinite:
    int32 (1,) or None.  One grid-stride loop over the elements.
    """
    # lab:end sgd.single_kernel
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, w.shape[0], step):
        wi = w[i]
        vi = momentum * v[i] - lr * (weight_decay * wi + dw[i])
        v[i] = vi
        wi = wi + vi
        w[i] = wi
        flag_nonfinite(nonfinite, wi)


# lab:begin sgd.launchers
_F1 = "float32[::1]"
STATIC_SIGNATURES = [
    (sgd_update_kernel,
     f"void({_F1}, {_F1}, {_F1}, float32, float32, float32, int64[::1], {_F1}, {_F1}, "
     "int32[::1])", False),
    (sgd_update_single_kernel,
     f"void({_F1}, {_F1}, {_F1}, float32, float32, float32, int32[::1])", False),
]


@checks.checked(checks.sgd_update, "cuda")
def sgd_update(w, dw, v, lr, momentum, weight_decay, offsets=None, lr_mults=None,
               decay_mults=None, nonfinite=None, stream=None):
    """One SGD step in place on flat float32 w and v from the gradient dw (the paper's rule,
    see sgd_update_kernel); ``nonfinite`` (int32 (1,) device array or None) is set to 1 when
    an updated w is not finite, never cleared.  ``offsets`` int64 (T+1,) splits the buffers into tensors with
    float32 (T,) ``lr_mults`` and ``decay_mults``; a missing multiplier array means all 1s,
    and offsets None means one tensor (then the multipliers must be None too).  When offsets
    is a host array it is checked to rise from 0 to len(w).  With both multiplier arrays
    given, or both None, nothing is allocated.  The arguments are checked by checks.sgd_update
    (the decorator), as on every backend."""
    scalars = (np.float32(lr), np.float32(momentum), np.float32(weight_decay))
    stream = stream_or_default(stream)
    if w.size == 0:
        return
    if lr_mults is None and decay_mults is None:
        sgd_update_single_kernel[grid_1d(w.size), THREADS_PER_BLOCK, stream](
            w, dw, v, *scalars, nonfinite)
        return
    n_tensors = offsets.shape[0] - 1
    if lr_mults is None or decay_mults is None:
        ones = cuda.to_device(np.ones(n_tensors, np.float32), stream=stream)
        lr_mults = ones if lr_mults is None else lr_mults
        decay_mults = ones if decay_mults is None else decay_mults
    sgd_update_kernel[grid_1d(w.size), THREADS_PER_BLOCK, stream](
        w, dw, v, *scalars, offsets, lr_mults, decay_mults, nonfinite)
# lab:end sgd.launchers
