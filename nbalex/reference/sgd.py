"""Stochastic gradient descent with momentum and weight decay: the paper's rule (section 5).

Parameters, gradients and momentum are each one flat 1-D buffer with the same layout; tensor
t occupies [offsets[t], offsets[t+1]).  Each tensor has its own learning-rate and decay
multipliers (biases usually get decay 0).  For every element i of tensor t::

    v[i] <- momentum * v[i] - lr * lr_mults[t] * (weight_decay * decay_mults[t] * w[i] + dw[i])
    w[i] <- w[i] + v[i]

With both multipliers 1 this is the paper's v <- 0.9 v - 0.0005 lr w - lr g; w <- w + v.

``nonfinite``, when given, is an int32 (1,) flag set to 1 when any w[i] is NaN or infinite
after the update; it is never cleared here (the caller zeroes it), so one flag can collect
several updates.  That is how a training loop notices divergence without reading w back.
"""

import numpy as np

from nbalex import checks


@checks.checked(checks.sgd_update, "reference")
def sgd_update(w, dw, v, lr, momentum, weight_decay, offsets=None, lr_mults=None,
               decay_mults=None, nonfinite=None, stream=None):
    """w, v (flat 1-D) updated in place from dw.  offsets None means one tensor, multipliers 1;
    nonfinite[0] <- 1 when an updated w is not finite (left as it is otherwise)."""
    if offsets is None:
        offsets = np.array([0, w.size], dtype=np.int64)
    tensors = len(offsets) - 1
    lr_mults = np.ones(tensors) if lr_mults is None else lr_mults
    decay_mults = np.ones(tensors) if decay_mults is None else decay_mults
    for t in range(tensors):
        part = slice(int(offsets[t]), int(offsets[t + 1]))
        step = lr * float(lr_mults[t])
        decay = weight_decay * float(decay_mults[t])
        v[part] = momentum * v[part] - step * (decay * w[part] + dw[part])
        w[part] += v[part]
    if nonfinite is not None and not np.isfinite(w).all():
        nonfinite[0] = 1
