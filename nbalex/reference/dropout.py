"""Inverted dropout with a counter-based mask.

Shapes: x, y, mask, dy, dx all alike; mask is uint8 (1 = kept).  With keep probability
1 - p, kept units are scaled by 1/(1-p) in training so nothing changes at test time::

    mask[i] = dropout_keep(seed, offset + i, p)     i = flat C-order index
    y       = x * mask / (1 - p)
    dx      = dy * mask / (1 - p)

Both are multiplies, so a NaN or inf at a dropped unit gives NaN (0 * inf), never 0; every
backend follows that rule.

The mask is not drawn from a random-number generator's stream but computed from
(seed, element index) by an integer hash (see :func:`nbalex.backends.dropout_keep`), so
every backend, every thread order and every device draws the same mask for the same seed.
Here the hash is vectorised: NumPy's uint32 arithmetic wraps around on overflow exactly as
the 32-bit hardware multiply does.
"""

import numpy as np

from nbalex import checks
from nbalex.backends import dropout_threshold, mix32


def mix32_array(x):
    """:func:`nbalex.backends.mix32` applied elementwise to a uint32 array."""
    x = x.astype(np.uint32, copy=True)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def keep_mask(shape, p, seed, offset=0):
    """uint8 array of ``shape``: 1 where dropout_keep(seed, offset + flat index, p) holds."""
    s = np.uint32(mix32((int(seed) & 0xFFFFFFFF) ^ 0x9E3779B9))
    index = np.arange(int(offset), int(offset) + int(np.prod(shape)), dtype=np.uint64)
    index = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    u = mix32_array(index ^ s)
    return ((u >> np.uint32(8)) >= dropout_threshold(p)).astype(np.uint8).reshape(shape)


@checks.checked(checks.dropout_forward, "reference")
def dropout_forward(y, mask, x, p, seed, offset=0, stream=None):
    """mask <- the keep mask for (seed, p), element i hashed as offset + i; y <- x * mask /
    (1-p).  Both overwritten."""
    mask[...] = keep_mask(x.shape, p, seed, offset)
    y[...] = x * mask / x.dtype.type(1.0 - p)


@checks.checked(checks.dropout_backward, "reference")
def dropout_backward(dx, dy, mask, p, stream=None):
    """dx <- dy * mask / (1-p).  dx is overwritten; it may be dy."""
    dx[...] = dy * mask / dy.dtype.type(1.0 - p)
