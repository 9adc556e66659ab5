"""Small helpers shared by the CUDA launchers: streams, grid sizing, precondition checks.

Every launcher takes arrays the caller owns (numba device arrays, or host NumPy arrays that
numba copies around the launch), checks them with the ``check_*`` functions below (each
raises ``ValueError`` naming the argument), and launches on an explicit stream.
"""

import numpy as np
from numba import cuda

THREADS_PER_BLOCK = 256
"""Block size of the 1-D grid-stride kernels."""

MAX_BLOCKS = 4096
"""Cap on 1-D grid size: 4096 x 256 threads fill any current GPU; grid-stride loops do the rest."""


def stream_or_default(stream):
    """The stream to launch on: ``stream``, or ``cuda.default_stream()`` when it is None."""
    return cuda.default_stream() if stream is None else stream


def grid_1d(n, threads=THREADS_PER_BLOCK):
    """Blocks for a 1-D grid-stride launch over ``n`` items: enough for one item per thread,
    at least 1, at most MAX_BLOCKS (read at call time, so tests can shrink it)."""
    return max(1, min((int(n) + threads - 1) // threads, MAX_BLOCKS))


def check_shape(name, arr, shape):
    """Raise ValueError unless ``arr.shape == shape`` (a tuple of ints)."""
    if tuple(arr.shape) != tuple(int(s) for s in shape):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")


def check_ndim(name, arr, ndim):
    """Raise ValueError unless ``arr`` has ``ndim`` dimensions."""
    if len(arr.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")


def check_dtype(name, arr, dtype):
    """Raise ValueError unless ``arr.dtype == dtype``."""
    if np.dtype(arr.dtype) != np.dtype(dtype):
        raise ValueError(f"{name} must be {np.dtype(dtype)}, got {np.dtype(arr.dtype)}")


def check_contiguous(name, arr):
    """Raise ValueError unless ``arr`` is C-contiguous."""
    if not arr.flags["C_CONTIGUOUS"]:
        raise ValueError(f"{name} must be C-contiguous")


def check_array(name, arr, dtype=np.float32, shape=None):
    """dtype, C-contiguity and (when given) shape of one launcher argument."""
    check_dtype(name, arr, dtype)
    check_contiguous(name, arr)
    if shape is not None:
        check_shape(name, arr, shape)


def flat(arr):
    """A 1-D view of a C-contiguous array (device or host), no copy."""
    return arr.reshape(arr.size)
