"""Memory the network owns, allocated once: arenas, a transfer counter, the host "place".

An arena is one allocation carved into aligned views.  The network sizes it by building its
buffers once against a :class:`SizingArena` (which only adds up sizes), allocates an arena of
exactly that capacity, and builds again for real; after that nothing is allocated, and
``arena.allocations`` (views carved so far) lets a test prove it.

A *place* is where one tower's buffers live and its work runs.  :class:`HostPlace` is the
place of the ``reference`` and ``cpu`` backends: host memory, no streams.  The CUDA tower
(:class:`nbalex.cuda.device.Tower`) offers the same methods on a GPU.
"""

import contextlib

import numpy as np

ALIGNMENT = 256
"""Every view starts on a multiple of this many bytes (what cudaMalloc guarantees)."""


def aligned(nbytes, alignment=ALIGNMENT):
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    return (int(nbytes) + alignment - 1) // alignment * alignment


def nbytes_of(shape, dtype):
    n = np.dtype(dtype).itemsize
    for s in shape:
        n *= int(s)
    return n


class SizingArena:
    """Stands in for an arena while the network counts the bytes it will need.

    ``alloc`` returns a read-only, zero-strided placeholder of the right shape and dtype (no
    memory behind it) and adds the aligned size to ``used``; ``names`` records each request.
    """

    def __init__(self):
        self.used = 0
        self.allocations = 0
        self.names = []

    def alloc(self, shape, dtype=np.float32, name=None):
        shape = tuple(int(s) for s in shape)
        self.used += aligned(nbytes_of(shape, dtype))
        self.allocations += 1
        self.names.append((name, shape, np.dtype(dtype).name))
        return np.broadcast_to(np.zeros((), dtype=dtype), shape)


class ArenaBase:
    """The bookkeeping every arena shares: one buffer of ``capacity`` bytes, views carved in
    order at 256-byte boundaries, never freed.  Subclasses set ``_buffer`` (a flat uint8
    array, host or device) and ``zeroed`` (do fresh views read as zeros?)."""

    def __init__(self, capacity, name):
        self.name = name
        self.capacity = aligned(max(int(capacity), ALIGNMENT))
        self.used = 0
        self.allocations = 0

    def _reserve(self, shape, dtype, name):
        """(start byte, byte count) of the next view; counts it, or raises MemoryError."""
        nbytes = nbytes_of(shape, dtype)
        if self.used + nbytes > self.capacity:
            raise MemoryError(f"arena {self.name}: {name or 'buffer'} needs {nbytes} bytes, "
                              f"{self.capacity - self.used} of {self.capacity} left")
        start = self.used
        self.used = min(self.capacity, aligned(start + nbytes))
        self.allocations += 1
        return start, nbytes

    def alloc(self, shape, dtype=np.float32, name=None):
        """A C-contiguous view of ``shape`` and ``dtype``; its contents are undefined."""
        shape = tuple(int(s) for s in shape)
        start, nbytes = self._reserve(shape, dtype, name)
        itemsize = np.dtype(dtype).itemsize
        size = max(nbytes, itemsize)   # keep zero-size views well-formed
        raw = self._buffer[start:start + size].view(dtype)
        return raw[:nbytes // itemsize].reshape(shape)


class HostArena(ArenaBase):
    """One host allocation of ``capacity`` bytes carved into 256-byte-aligned views."""

    def __init__(self, capacity, name="host"):
        super().__init__(capacity, name)
        raw = np.zeros(self.capacity + ALIGNMENT, dtype=np.uint8)   # pages zeroed lazily by the OS
        self.zeroed = True    # fresh views read as zeros
        start = (-raw.ctypes.data) % ALIGNMENT
        self._buffer = raw[start:start + self.capacity]


class TransferCounter:
    """Counts host<->device copies (and their bytes) so a test can check a training step."""

    def __init__(self):
        self.h2d = self.d2h = 0
        self.h2d_bytes = self.d2h_bytes = 0

    def counts(self):
        """(h2d, d2h, h2d_bytes, d2h_bytes) as a tuple, to compare before and after."""
        return self.h2d, self.d2h, self.h2d_bytes, self.d2h_bytes

    def __repr__(self):
        return (f"TransferCounter(h2d={self.h2d} ({self.h2d_bytes} B), "
                f"d2h={self.d2h} ({self.d2h_bytes} B))")


class HostPlace:
    """A tower's worth of host memory for the ``reference`` and ``cpu`` backends.

    The methods mirror :class:`nbalex.cuda.device.Tower` so the network drives both the same
    way; here every copy is a NumPy copy and nothing is asynchronous.
    """

    compute_stream = None

    def __init__(self, index=0, transfers=None):
        self.index = index
        self.arena = None
        self.transfers = transfers if transfers is not None else TransferCounter()

    def __repr__(self):
        return f"HostPlace({self.index})"

    def create_arena(self, capacity):
        self.arena = HostArena(capacity, name=f"host{self.index}")
        return self.arena

    def activate(self):
        return contextlib.nullcontext()

    def is_local(self, x):
        """Is ``x`` an array this place can compute on directly?"""
        return isinstance(x, np.ndarray)

    def to_device(self, dst, src):
        np.copyto(dst, src)

    def to_host(self, dst, src):
        np.copyto(dst, src)

    def host_buffer(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def copy_rows(self, dst, dst_row, dst_offset, src, src_row, src_offset, rows, cols):
        """dst[r*dst_row + dst_offset + c] = src[r*src_row + src_offset + c] over rows x cols (flat arrays)."""
        d = dst[:rows * dst_row].reshape(rows, dst_row)
        s = src[:rows * src_row].reshape(rows, src_row)
        d[:, dst_offset:dst_offset + cols] = s[:, src_offset:src_offset + cols]

    def accumulate(self, dst, src):
        """dst += src (flat arrays of one size)."""
        dst += src

    def pull(self, dst, src, source):
        """dst (here) <- src (on place ``source``)."""
        np.copyto(dst, src)

    def synchronize(self):
        pass
