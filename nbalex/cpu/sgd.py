"""SGD with momentum and weight decay on the CPU: one pass over the flat buffers, split between
the worker threads.

Per element i of tensor t (the paper's rule, ``nbalex.backends``)::

    v[i] <- momentum*v[i] - lr*lr_mults[t] * (weight_decay*decay_mults[t]*w[i] + dw[i])
    w[i] <- w[i] + v[i]

Tensor t spans [offsets[t], offsets[t+1]) of w, dw and v (all flat float32, same layout).
Plain IEEE arithmetic (no ``fastmath``, which assumes no NaN and may contract into FMAs):
every element is computed exactly as the reference computes it, whatever the compiler did.
The same pass counts the updated w that are not finite (an integer sum, so its order cannot
matter); the launcher turns a nonzero count into the caller's ``nonfinite`` flag.
"""

import numpy as np
from numba import njit

from nbalex import checks

from . import workers


BLOCK = 4096    # weights a block of the kernel: updated, then counted while in cache


@njit(nogil=True, cache=True, error_model="numpy")
def sgd_kernel(w, dw, v, offsets, steps, decays, momentum, lo, hi):
    """Update w[i] and v[i] in place for lo <= i < hi, each element with its tensor's step and
    decay; steps[t] = lr*lr_mults[t], decays[t] = wd*decay_mults[t].  Returns how many of
    those w are NaN or infinite after the update.  (One range over all the tensors: a
    parallel loop per tensor cost AlexNet's 16 tensors 16 thread wake-ups a step.)

    The loops run over views from index 0: an index that might be negative makes Numba
    wrap it around, and that check kept LLVM from vectorising (2.5x slower).  The count is a
    second loop over each block of BLOCK updated weights, still in cache: counted inside the
    update loop, it kept that loop scalar (AlexNet's 61 M parameters: 28.7-30.6 -> 25.8-26.3
    ms).
    """
    bad = 0
    for t in range(offsets.shape[0] - 1):
        step = steps[t]
        decay = decays[t]
        for first in range(max(lo, offsets[t]), min(hi, offsets[t + 1]), BLOCK):
            last = min(hi, offsets[t + 1], first + BLOCK)
            ws, gs, vs = w[first:last], dw[first:last], v[first:last]
            for i in range(last - first):
                vi = momentum * vs[i] - step * (decay * ws[i] + gs[i])
                vs[i] = vi
                ws[i] = ws[i] + vi
            for i in range(last - first):
                d = ws[i] - ws[i]               # NaN exactly when ws[i] is NaN or infinite
                bad += d != d
    return bad


@checks.checked(checks.sgd_update, "cpu")
def sgd_update(w, dw, v, lr, momentum, weight_decay, offsets=None, lr_mults=None,
               decay_mults=None, nonfinite=None, stream=None):
    """w, v (flat 1-D float32) updated in place from dw; offsets None = one tensor, mults 1.

    ``nonfinite`` (int32 (1,)), when given, is set to 1 if any updated w is not finite; it is
    never cleared here.
    """
    if offsets is None:
        offsets = np.array([0, w.size], dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    tensors = len(offsets) - 1
    lr_m = np.ones(tensors) if lr_mults is None else np.asarray(lr_mults, dtype=np.float64)
    decay_m = np.ones(tensors) if decay_mults is None else np.asarray(decay_mults, dtype=np.float64)
    steps = (lr * lr_m).astype(np.float32)
    decays = (weight_decay * decay_m).astype(np.float32)
    bad = sum(workers.for_ranges(sgd_kernel, w.size, w, dw, v, offsets, steps, decays,
                                 np.float32(momentum), work=4 * w.size))
    if bad and nonfinite is not None:
        nonfinite[0] = 1
