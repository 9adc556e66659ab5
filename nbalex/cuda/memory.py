"""Device memory managed by hand: one arena per GPU, pinned host buffers, counted copies.

The network asks for every buffer it will ever use while it is built (parameters,
gradients, momentum, activations, workspaces), sizes one :class:`Arena` for exactly that,
and carves the buffers out of it as views.  Nothing is allocated afterwards: the arena
counts its views (``allocations``) so a test can prove a training step adds none.  Every
host<->device copy the network makes goes through a :class:`TransferCounter`.
"""

import numpy as np
from numba import cuda

from nbalex.memory import ArenaBase, TransferCounter as _Counts


class Arena(ArenaBase):
    """One device allocation of ``capacity`` bytes, carved into 256-byte-aligned views.

    ``alloc(shape, dtype, name)`` returns a C-contiguous device array viewing the next free
    bytes (contents undefined); ``used``/``capacity`` are bytes, ``allocations`` the number
    of views carved.  Views are never freed: an arena lives as long as its network.
    """

    def __init__(self, capacity, name="arena"):
        super().__init__(capacity, name)
        self._buffer = cuda.device_array(self.capacity, dtype=np.uint8)  # the one allocation
        self.zeroed = False   # device memory starts undefined


def pinned_buffer(shape, dtype=np.float32):
    """Page-locked host memory: the fast, asynchronous end of a host<->device copy."""
    return cuda.pinned_array(shape, dtype=dtype)


def is_device_array(x):
    """Is ``x`` a CUDA device array (real or simulated)?"""
    return cuda.is_cuda_array(x) if hasattr(cuda, "is_cuda_array") else hasattr(x, "copy_to_host")


class TransferCounter(_Counts):
    """Makes every host<->device copy of the network, and counts copies and bytes.

    ``to_device(dst, src, stream)``: device ``dst`` <- host ``src`` (h2d);
    ``to_host(dst, src, stream)``: host ``dst`` <- device ``src`` (d2h).  Both are
    asynchronous on ``stream`` when the host side is pinned.
    """

    def to_device(self, dst, src, stream=0):
        src = np.ascontiguousarray(src, dtype=dst.dtype)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"host array of shape {src.shape} copied into device array {dst.shape}")
        dst.copy_to_device(src, stream=stream)
        self.h2d += 1
        self.h2d_bytes += src.nbytes

    def to_host(self, dst, src, stream=0):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"device array of shape {src.shape} copied into host array {dst.shape}")
        src.copy_to_host(dst, stream=stream)
        self.d2h += 1
        self.d2h_bytes += dst.nbytes
