"""Fully connected layer.

Shapes::

    x (N, K)    inputs, one row per example
    w (M, K)    weights, one row per output unit (PyTorch's layout)
    b (M,)      biases
    y (N, M)    y = x @ w.T + b

Gradients, given dy = dL/dy (N, M)::

    dx = dy @ w          (N, K)
    dw = dy.T @ x        (M, K)
    db = dy.sum(axis=0)  (M,)
"""

import numpy as np

from nbalex import checks


@checks.checked(checks.linear_workspace_size, "reference")
def linear_workspace_size(x_shape, w_shape):
    """The reference needs no caller-provided workspace: 0."""
    return 0


@checks.checked(checks.linear_forward, "reference")
def linear_forward(y, x, w, b, relu=False, workspace=None, stream=None):
    """y (N,M) <- x @ w.T + b, then max(y, 0) if ``relu``.  y is overwritten."""
    np.matmul(x, w.T, out=y)
    y += b
    if relu:
        np.maximum(y, 0, out=y)


@checks.checked(checks.linear_backward_data, "reference")
def linear_backward_data(dx, dy, w, workspace=None, stream=None):
    """dx (N,K) <- dy @ w.  dx is overwritten."""
    np.matmul(dy, w, out=dx)


@checks.checked(checks.linear_backward_weights, "reference")
def linear_backward_weights(dw, db, dy, x, workspace=None, stream=None):
    """dw (M,K) <- dy.T @ x and db (M,) <- dy summed over the batch.  Both overwritten."""
    np.matmul(dy.T, x, out=dw)
    db[...] = dy.sum(axis=0)
