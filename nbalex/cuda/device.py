"""A tower: one GPU's share of the network, with its streams, events and arena.

The paper split AlexNet across two GPUs ("towers"): each holds half of every layer's filters
and the towers trade activations only where a layer needs both halves (conv3 and the fully
connected layers).  Here a :class:`Tower` owns

* its device (``device_id``; two towers may share one GPU, which the simulator can run),
* a compute stream (every kernel of the tower) and a copy stream (transfers between towers),
* two events that order them: ``compute_event`` marks "the compute stream got here",
  ``copy_event`` "the copy finished",
* its :class:`~nbalex.cuda.memory.Arena`, sized once by the network.

Trading blocks of activations needs two small kernels, defined here: :func:`copy_rows`
(copy a block of columns of a row-major matrix into another's) and :func:`accumulate`.
"""

import contextlib

from numba import cuda

from nbalex.cuda.launch import THREADS_PER_BLOCK, grid_1d, stream_or_default
from nbalex.cuda.memory import Arena, TransferCounter, is_device_array, pinned_buffer


@cuda.jit
def copy_rows_kernel(dst, dst_row, dst_offset, src, src_row, src_offset, cols, total):
    """dst[r*dst_row + dst_offset + c] = src[r*src_row + src_offset + c] for r*cols + c < total.

    One thread per copied element (grid-stride); dst and src are flat 1-D float32 arrays,
    read as row-major matrices with rows of dst_row and src_row elements.  dst is written
    only in the copied block.
    """
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, total, step):
        r = i // cols
        c = i - r * cols
        dst[r * dst_row + dst_offset + c] = src[r * src_row + src_offset + c]


@cuda.jit
def accumulate_kernel(dst, src):
    """dst[i] += src[i] for every i (grid-stride); dst and src flat 1-D float32 of one length."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, dst.shape[0], step):
        dst[i] += src[i]


STATIC_SIGNATURES = [
    (copy_rows_kernel,
     "void(float32[::1], int64, int64, float32[::1], int64, int64, int64, int64)", False),
    (accumulate_kernel, "void(float32[::1], float32[::1])", False),
]


def _threads(total):
    """Block size: a full block of 256, or fewer warps when there is less work than that."""
    return min(THREADS_PER_BLOCK, 32 * ((int(total) + 31) // 32))


def copy_rows(dst, dst_row, dst_offset, src, src_row, src_offset, rows, cols, stream=None):
    """Copy ``rows`` x ``cols`` elements between flat arrays (see :func:`copy_rows_kernel`)."""
    if rows * cols == 0:
        return
    if dst_offset + cols > dst_row or src_offset + cols > src_row:
        raise ValueError(f"block of {cols} columns does not fit rows of {dst_row} / {src_row}")
    if rows * dst_row > dst.shape[0] or rows * src_row > src.shape[0]:
        raise ValueError(f"{rows} rows do not fit arrays of {dst.shape[0]} / {src.shape[0]} elements")
    total = rows * cols
    threads = _threads(total)
    copy_rows_kernel[grid_1d(total, threads), threads, stream_or_default(stream)](
        dst, dst_row, dst_offset, src, src_row, src_offset, cols, total)


def accumulate(dst, src, stream=None):
    """dst += src, flat 1-D float32 arrays of one length."""
    if dst.shape != src.shape:
        raise ValueError(f"accumulate: shapes {dst.shape} and {src.shape} differ")
    if dst.shape[0]:
        threads = _threads(dst.shape[0])
        accumulate_kernel[grid_1d(dst.shape[0], threads), threads, stream_or_default(stream)](dst, src)


class Tower:
    """One GPU's share of the network: device, compute and copy streams, events, arena.

    ``index`` is the tower's position (which half of each layer it holds); ``transfers`` is
    the :class:`TransferCounter` every host<->device copy goes through (shared by towers).
    """

    def __init__(self, device_id=0, index=0, transfers=None):
        self.device_id = int(device_id)
        self.index = index
        self.transfers = transfers if transfers is not None else TransferCounter()
        self.arena = None
        with self.activate():
            self.compute_stream = cuda.stream()
            self.copy_stream = cuda.stream()
            self.compute_event = cuda.event()
            self.copy_event = cuda.event()

    def __repr__(self):
        return f"Tower({self.index}, gpu={self.device_id})"

    def activate(self):
        """Context manager making this tower's GPU current (kernels and copies need it)."""
        return cuda.gpus[self.device_id] if len(cuda.gpus) > 1 else contextlib.nullcontext()

    def create_arena(self, capacity):
        with self.activate():
            self.arena = Arena(capacity, name=f"gpu{self.device_id}.tower{self.index}")
        return self.arena

    def is_local(self, x):
        """Is ``x`` a device array the kernels can use directly?"""
        return is_device_array(x)

    def to_device(self, dst, src):
        self.transfers.to_device(dst, src, stream=self.compute_stream)

    def to_host(self, dst, src):
        self.transfers.to_host(dst, src, stream=self.compute_stream)

    def host_buffer(self, shape, dtype):
        return pinned_buffer(shape, dtype)

    def copy_rows(self, dst, dst_row, dst_offset, src, src_row, src_offset, rows, cols):
        copy_rows(dst, dst_row, dst_offset, src, src_row, src_offset, rows, cols,
                  stream=self.compute_stream)

    def accumulate(self, dst, src):
        accumulate(dst, src, stream=self.compute_stream)

    def pull(self, dst, src, source):
        """dst (on this tower) <- src (on tower ``source``): a device-to-device copy.

        The copy runs on this tower's copy stream once both compute streams have reached
        this point (src written, dst's previous readers done); both compute streams then
        wait for the copy, so neither overwrites or reads the buffers too early.
        """
        source.compute_event.record(source.compute_stream)
        self.compute_event.record(self.compute_stream)
        source.compute_event.wait(self.copy_stream)
        self.compute_event.wait(self.copy_stream)
        dst.copy_to_device(src, stream=self.copy_stream)
        self.copy_event.record(self.copy_stream)
        self.copy_event.wait(self.compute_stream)
        self.copy_event.wait(source.compute_stream)

    def synchronize(self):
        self.compute_stream.synchronize()
        self.copy_stream.synchronize()


def make_towers(gpus, transfers=None):
    """One :class:`Tower` per entry of ``gpus`` (device ids; repeats share a GPU)."""
    transfers = transfers if transfers is not None else TransferCounter()
    available = len(cuda.gpus)
    for device_id in gpus:
        if not 0 <= int(device_id) < available:
            raise ValueError(f"no GPU {device_id}: this machine has {available} (ids 0..{available - 1})")
    return [Tower(device_id, index, transfers) for index, device_id in enumerate(gpus)]


