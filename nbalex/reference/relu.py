"""Rectified linear unit, y = max(x, 0), any shape.

The backward pass needs only the output: dL/dx = dL/dy where y > 0, else 0
(the derivative at exactly 0 is taken to be 0).

NaN: the forward pass keeps it (``np.maximum``), and the backward pass is a multiply,
dy * (y > 0), so a NaN or inf in dy gives NaN even where the unit is inactive.  Every backend
follows both rules.
"""

import numpy as np

from nbalex import checks


@checks.checked(checks.relu_forward, "reference")
def relu_forward(y, x, stream=None):
    """y <- max(x, 0), elementwise.  y may be x (in place)."""
    np.maximum(x, 0, out=y)


@checks.checked(checks.relu_backward, "reference")
def relu_backward(dx, dy, y, stream=None):
    """dx <- dy * (y > 0), elementwise.  dx may be dy (in place)."""
    np.multiply(dy, y > 0, out=dx)
