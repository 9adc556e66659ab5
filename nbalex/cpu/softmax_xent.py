"""Softmax cross-entropy on the CPU: one parallel task per example (row of the logits).

logits, probs, dlogits (N, K); labels int32 (N,); losses (N,)::

    probs[n]  = softmax(logits[n])                 (max subtracted first, sums in float64)
    losses[n] = logsumexp(logits[n]) - logits[n, labels[n]]
    dlogits   = (probs - onehot(labels)) / N
"""

import math

import numpy as np
from numba import njit, prange

from nbalex import checks

from . import threads  # noqa: F401  (picks the threading layer before any kernel runs)


@njit(parallel=True, cache=True)
def softmax_xent_forward_kernel(losses, probs, logits, labels):
    """Write probs[n, :] and losses[n] for every row n; one task per row."""
    n_rows, classes = logits.shape
    for n in prange(n_rows):
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


@njit(parallel=True, cache=True)
def softmax_xent_backward_kernel(dlogits, probs, labels):
    """Write dlogits[n, :] = (probs[n, :] - onehot(labels[n])) / N; one task per row."""
    n_rows, classes = probs.shape
    inv_n = np.float32(1.0 / n_rows)
    for n in prange(n_rows):
        for j in range(classes):
            dlogits[n, j] = probs[n, j] * inv_n
        dlogits[n, labels[n]] = (probs[n, labels[n]] - np.float32(1.0)) * inv_n


@checks.checked(checks.softmax_xent_forward, "cpu")
def softmax_xent_forward(losses, probs, logits, labels, stream=None):
    """losses (N,), probs (N,K) <- per-example loss and softmax of logits.  Both overwritten."""
    softmax_xent_forward_kernel(losses, probs, logits, labels)


@checks.checked(checks.softmax_xent_backward, "cpu")
def softmax_xent_backward(dlogits, probs, labels, stream=None):
    """dlogits (N,K) <- (probs - onehot(labels)) / N.  dlogits is overwritten."""
    softmax_xent_backward_kernel(dlogits, probs, labels)
