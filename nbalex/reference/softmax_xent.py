"""Softmax followed by cross-entropy with integer labels, fused.

Shapes: logits, probs, dlogits (N, K); labels int32 (N,); losses (N,).

Forward, computed stably by subtracting each row's maximum first (it cancels)::

    z[n]      = logits[n] - max_k logits[n, k]
    lse[n]    = log sum_k exp(z[n, k])
    probs[n]  = exp(z[n] - lse[n])                    softmax
    losses[n] = lse[n] - z[n, labels[n]]              -log probs[n, labels[n]]

NaN and infinities follow from these formulas and every backend keeps them: a row whose max
is not finite (a NaN, a +inf, or every logit -inf) has NaN probabilities and loss; a -inf
logit in a row with a finite max gets probability 0 (and loss +inf when it is the label).

The training loss is the batch mean, so the gradient of mean(losses) is::

    dlogits[n, k] = (probs[n, k] - [k == labels[n]]) / N
"""

import numpy as np

from nbalex import checks


@checks.checked(checks.softmax_xent_forward, "reference")
def softmax_xent_forward(losses, probs, logits, labels, stream=None):
    """losses (N,) and probs (N,K) <- per-example loss and softmax.  Both overwritten."""
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    probs[...] = np.exp(z - lse)
    losses[...] = lse[:, 0] - z[np.arange(n), labels]


@checks.checked(checks.softmax_xent_backward, "reference")
def softmax_xent_backward(dlogits, probs, labels, stream=None):
    """dlogits (N,K) <- (probs - onehot(labels)) / N.  dlogits is overwritten."""
    n = probs.shape[0]
    dlogits[...] = probs
    dlogits[np.arange(n), labels] -= 1
    dlogits /= dlogits.dtype.type(n)
