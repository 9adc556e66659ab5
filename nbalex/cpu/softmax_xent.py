"""Softmax cross-entropy on the CPU: one task per example (row of the logits), the rows split
between the worker threads.

logits, probs, dlogits (N, K); labels int32 (N,); losses (N,)::

    probs[n]  = softmax(logits[n])                 (max subtracted first, sums in float64)
    losses[n] = logsumexp(logits[n]) - logits[n, labels[n]]
    dlogits   = (probs - onehot(labels)) / N
"""

import math

import numpy as np
from numba import njit

from nbalex import checks

from . import workers


@njit(nogil=True, cache=True, error_model="numpy")
def softmax_xent_forward_kernel(losses, probs, logits, labels, lo, hi):
    """Write probs[n, :] and losses[n] for rows lo <= n < hi."""
    classes = logits.shape[1]
    for n in range(lo, hi):
        row = logits[n]
        top = row[0]
        for j in range(1, classes):
            top = max(top, row[j])
        total = 0.0
        for j in range(classes):
            e = math.exp(np.float64(row[j] - top))
            probs[n, j] = e
            total += e
        inv = 1.0 / total
        for j in range(classes):
            probs[n, j] = probs[n, j] * inv
        losses[n] = math.log(total) - (row[labels[n]] - top)


@njit(nogil=True, cache=True, error_model="numpy")
def softmax_xent_backward_kernel(dlogits, probs, labels, lo, hi):
    """Write dlogits[n, :] = (probs[n, :] - onehot(labels[n])) / N for rows lo <= n < hi."""
    n_rows, classes = probs.shape
    inv_n = np.float32(1.0 / n_rows)
    for n in range(lo, hi):
        for j in range(classes):
            dlogits[n, j] = probs[n, j] * inv_n
        dlogits[n, labels[n]] = (probs[n, labels[n]] - np.float32(1.0)) * inv_n


@checks.checked(checks.softmax_xent_forward, "cpu")
def softmax_xent_forward(losses, probs, logits, labels, stream=None):
    """losses (N,), probs (N,K) <- per-example loss and softmax of logits.  Both overwritten."""
    workers.for_ranges(softmax_xent_forward_kernel, logits.shape[0], losses, probs, logits, labels,
                       work=20 * logits.size)


@checks.checked(checks.softmax_xent_backward, "cpu")
def softmax_xent_backward(dlogits, probs, labels, stream=None):
    """dlogits (N,K) <- (probs - onehot(labels)) / N.  dlogits is overwritten."""
    workers.for_ranges(softmax_xent_backward_kernel, probs.shape[0], dlogits, probs, labels,
                       work=probs.size)
