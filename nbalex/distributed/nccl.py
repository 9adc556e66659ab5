"""The gradient allreduce on device buffers (CUDA backend): NCCL, its own stream, a watchdog.

NOT YET RUN ON A GPU.  What runs without one is tested: the NCCL id exchange over MPI (with a
stand-in id) and the order of calls (with the CUDA simulator and a stand-in communicator);
the watchdog is tested with a fake clock.  Multi-GPU needs one GPU per rank (NCCL refuses two
ranks on one GPU), so it is untested here.

Engine: ``nccl4py`` (``nccl.core``), NCCL's own Python bindings, kept by NCCL's authors in the
NCCL repository.  Its collectives take any object with ``__cuda_array_interface__`` (Numba
device arrays and their slices, no copy) and a stream as an integer handle (``int(stream)``
of a Numba stream).  ``pip install 'nbalex[nccl]'``.

:class:`NcclAllreduce` has the shape of :class:`~nbalex.distributed.reduce.HostAllreduce`:

* ``start(bucket, stream)``: an event recorded on the producing (compute) ``stream`` is waited
  on by the communication stream, then ``ncclAllReduce(avg)`` of the bucket, in place, on the
  communication stream; a second event marks its end.  The host never blocks.
* ``progress()``: nothing to do (NCCL runs as GPU kernels); it raises an asynchronous NCCL
  error if there is one.
* ``wait(stream)``: ``stream`` waits, on the GPU, for every bucket's end event, so the SGD
  kernel queued after it reads averaged gradients.  The host does not block.

The watchdog polls each bucket's end event from a thread; one that has not finished within
``timeout_s`` (a dead or stuck peer) aborts the NCCL communicator and then the MPI job, with
one line naming the rank.  NCCL's reduction is deterministic for a fixed N, topology and
algorithm (set ``NCCL_ALGO=Ring`` to pin the algorithm across machines).
"""

from nbalex.distributed.reduce import check_buckets
from nbalex.distributed.watchdog import Watchdog

NCCL_ID_BYTES = 128
"""Size of an ``ncclUniqueId``."""


def load_nccl():
    """``nccl.core`` (nccl4py), or RuntimeError saying how to install it."""
    try:
        import nccl.core as nccl
    except ImportError:
        raise RuntimeError("the CUDA allreduce needs NCCL: pip install 'nbalex[nccl]'") from None
    return nccl


def exchange_id(world, make_id):
    """The NCCL unique id made by ``make_id()`` (bytes) on rank 0, on every rank, over MPI."""
    return world.broadcast_bytes(make_id() if world.rank == 0 else None, NCCL_ID_BYTES)


def make_communicator(world):
    """An NCCL communicator over ``world``'s ranks on the current CUDA device."""
    nccl = load_nccl()
    raw = exchange_id(world, lambda: bytes(nccl.get_unique_id()))
    return nccl.Communicator.init(nranks=world.size, rank=world.rank,
                                  unique_id=nccl.UniqueId.from_bytes(raw))


def _event(cuda):
    try:
        return cuda.event(timing=False)
    except TypeError:  # the simulator's events take no arguments
        return cuda.event()


def _handle(stream):
    """A stream as NCCL takes it: the integer ``cudaStream_t`` of a Numba stream."""
    return int(stream) if hasattr(type(stream), "__int__") else stream


class NcclAllreduce:
    """Averages the flat float32 device ``buffer`` over ``world``'s ranks, bucket by bucket.

    ``buckets`` as for :class:`~nbalex.distributed.reduce.HostAllreduce`.  ``communicator``
    and ``average`` (the reduction op) default to a new NCCL communicator and ``nccl.AVG``.
    """

    def __init__(self, world, buffer, buckets, timeout_s=300.0, communicator=None,
                 average=None):
        from numba import cuda
        if len(buffer.shape) != 1 or str(buffer.dtype) != "float32":
            raise ValueError("the gradient buffer must be a 1-D float32 device array")
        self.world, self.buffer = world, buffer
        self.buckets = check_buckets(buffer.shape[0], buckets)
        if communicator is None:
            communicator = make_communicator(world)
        if average is None:
            average = load_nccl().AVG
        self.comm, self.average = communicator, average
        self.stream = cuda.stream()
        self.ready = [_event(cuda) for _ in self.buckets]
        self.finished = [_event(cuda) for _ in self.buckets]
        self.views = [buffer[a:b] for a, b in self.buckets]
        self.started = [False] * len(self.buckets)
        device = cuda.get_current_device().id if not _simulated(cuda) else None
        self.watchdog = Watchdog(timeout_s, self._timed_out,
                                 thread_setup=(lambda: cuda.select_device(device))
                                 if device is not None else None)

    def start(self, bucket, stream):
        """Average bucket ``bucket`` once the work queued on ``stream`` so far is done."""
        if self.started[bucket]:
            raise RuntimeError(f"bucket {bucket} was started twice in one step")
        self.started[bucket] = True
        self.ready[bucket].record(stream)
        self.ready[bucket].wait(self.stream)
        view = self.views[bucket]
        self.comm.allreduce(view, view, self.average, stream=_handle(self.stream))
        done = self.finished[bucket]
        done.record(self.stream)
        self.watchdog.arm(f"allreduce of bucket {bucket}", getattr(done, "query", lambda: True))

    def progress(self):
        """Raise if NCCL reported an asynchronous error; the reduction itself needs no help."""
        check = getattr(self.comm, "get_async_error", None)
        if check is not None:
            error = check()
            if error:
                raise RuntimeError(f"NCCL asynchronous error: {error}")

    def wait(self, stream):
        """Order ``stream`` after every bucket's allreduce (on the GPU; the host goes on)."""
        missing = [b for b, s in enumerate(self.started) if not s]
        if missing:
            raise RuntimeError(f"bucket(s) {missing} were never started this step")
        for done in self.finished:
            done.wait(stream)
        self.started = [False] * len(self.buckets)

    def _timed_out(self, label, waited):
        try:
            self.comm.abort()
        finally:
            self.world.abort(f"NCCL {label} has not finished after {waited:.0f} s "
                             f"(a peer died or hangs)")

    def close(self):
        """Stop the watchdog and destroy the communicator (collective)."""
        self.watchdog.stop()
        destroy = getattr(self.comm, "destroy", None)
        if destroy is not None:
            destroy()


def _simulated(cuda):
    from numba import config
    return bool(config.ENABLE_CUDASIM)
