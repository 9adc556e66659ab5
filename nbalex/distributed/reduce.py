"""The gradient allreduce on host buffers: bucketed, overlapped with backward, deterministic.

:class:`HostAllreduce` averages a flat float32 gradient buffer across the ranks of a
:class:`~nbalex.distributed.world.World`, in place, one bucket (an element range, usually one
layer's weight and bias) at a time::

    reducer = HostAllreduce(world, grads, buckets)     # once: plans and buffers allocated here
    for step ...:
        for layer in reversed(layers):                 # backward, last layer first
            layer.backward_weights(); reducer.start(bucket_of[layer])
            layer.backward_data();    reducer.progress()
        reducer.wait()                                 # grads now hold the average

**The order is fixed, so the bits are.**  MPI promises no summation order for its reductions
beyond two ranks, so none is used.  Each bucket is cut into N chunks (chunk r goes to rank r);
an ``Ialltoallv`` brings rank r everyone's copy of chunk r; rank r adds them in rank order
0..N-1 in float32 and divides by N; an ``Iallgatherv`` hands every rank every averaged chunk.
Each element's result is ``((g_0 + g_1) + ... + g_{N-1}) / N`` whatever the timing, the
launcher or the network: the same command with the same N gives the same bits.  Traffic per
rank is that of a ring allreduce (each element sent twice, (N-1)/N of the bucket each time).

**Overlap.**  Non-blocking collectives advance only inside MPI calls: :meth:`progress` tests
every bucket in flight (and, when a bucket's exchange has landed, sums it and starts its
gather), so calling it between layers lets the early buckets finish while backward runs.
Each bucket has its own communicator (duplicated once), so buckets may be started in any
order and finish in any order without the ranks' collective sequences having to match.

Nothing is allocated per step: receive buffers (one bucket's worth per bucket, N chunks) and
the message plans are built in the constructor.  In a world of one, every call is a no-op.
"""

import time

import numpy as np

IDLE, EXCHANGING, GATHERING, DONE = "idle", "exchanging", "gathering", "done"


def buckets_from_views(buffer, groups):
    """``(start, stop)`` element ranges of ``buffer``, one per group of views into it.

    ``groups`` lists, in backward order, each bucket's arrays (views of ``buffer``, e.g. a
    layer's weight and bias gradients); the views of one group must be adjacent in the
    buffer.  Raises ValueError otherwise.
    """
    base, item = buffer.ctypes.data, buffer.itemsize
    ranges = []
    for group in groups:
        spans = sorted(((v.ctypes.data - base) // item, (v.ctypes.data - base) // item + v.size)
                       for v in group)
        for (_, stop), (start, _) in zip(spans, spans[1:]):
            if start != stop:
                raise ValueError("buckets_from_views: a group's views are not adjacent")
        if spans[0][0] < 0 or spans[-1][1] > buffer.size:
            raise ValueError("buckets_from_views: a view lies outside the buffer")
        ranges.append((spans[0][0], spans[-1][1]))
    return ranges


def split_counts(length, parts):
    """``parts`` chunk lengths that add up to ``length``, the first ones one longer."""
    base, extra = divmod(int(length), int(parts))
    return [base + (r < extra) for r in range(parts)]


def check_buffer(buffer):
    """Refuse anything but a 1-D C-contiguous float32 host array."""
    if not (isinstance(buffer, np.ndarray) and buffer.ndim == 1 and buffer.dtype == np.float32
            and buffer.flags.c_contiguous):
        raise ValueError("the gradient buffer must be a 1-D C-contiguous float32 array")


def check_buckets(size, buckets):
    """Validate non-empty, non-overlapping ranges within ``size`` elements; return the list."""
    buckets = [(int(a), int(b)) for a, b in buckets]
    if not buckets:
        raise ValueError("at least one bucket is needed")
    for a, b in buckets:
        if not 0 <= a < b <= size:
            raise ValueError(f"bucket ({a}, {b}) is empty or outside a buffer of {size}")
    spans = sorted(buckets)
    for (_, b), (a, _) in zip(spans, spans[1:]):
        if a < b:
            raise ValueError(f"buckets overlap at element {a}")
    return buckets


class HostAllreduce:
    """Averages ``buffer`` over the ranks of ``world``, bucket by bucket (see the module).

    ``buckets``: ``(start, stop)`` element ranges, non-overlapping, in the order backward
    produces them.  Elements outside every bucket are left alone.  Every bucket must be
    started once per step before :meth:`wait`; after it the buffer holds, in every bucket, the
    rank-order average, identical on every rank.  ``wait_seconds`` is the time the last
    :meth:`wait` blocked (communication not hidden behind backward).
    """

    def __init__(self, world, buffer, buckets):
        self.world, self.buffer = world, buffer
        check_buffer(buffer)
        self.buckets = check_buckets(buffer.size, buckets)
        self.state = [IDLE] * len(self.buckets)
        self.wait_seconds = 0.0
        self._requests = [None] * len(self.buckets)
        self._plans = []
        n, rank = world.size, world.rank
        if n == 1:
            return
        from mpi4py import MPI
        self._divisor = np.float32(n)
        for start, stop in self.buckets:
            counts = split_counts(stop - start, n)
            displs = [sum(counts[:r]) for r in range(n)]
            mine = counts[rank]
            received = np.empty((n, mine), np.float32)
            bucket = buffer[start:stop]
            self._plans.append({
                "comm": world.comm.Dup(),
                "send": [bucket, (counts, displs), MPI.FLOAT],
                "recv": [received, ([mine] * n, [r * mine for r in range(n)]), MPI.FLOAT],
                "gather": [bucket, (counts, displs), MPI.FLOAT],
                "received": received,
                "chunk": bucket[displs[rank]:displs[rank] + mine],
            })

    def _index(self, bucket):
        if not 0 <= bucket < len(self.buckets):
            raise IndexError(f"bucket {bucket} out of range (there are {len(self.buckets)})")
        return bucket

    def start(self, bucket):
        """Start averaging bucket number ``bucket`` (its gradients are final). Non-blocking."""
        b = self._index(bucket)
        if self.state[b] != IDLE:
            raise RuntimeError(f"bucket {b} was started twice in one step")
        if not self._plans:
            self.state[b] = DONE
            return
        plan = self._plans[b]
        self._requests[b] = plan["comm"].Ialltoallv(plan["send"], plan["recv"])
        self.state[b] = EXCHANGING

    def _sum_and_gather(self, b):
        plan = self._plans[b]
        received, chunk = plan["received"], plan["chunk"]
        if received.shape[0] == 1:
            chunk[:] = received[0]
        else:
            np.add(received[0], received[1], out=chunk)
            for r in range(2, received.shape[0]):
                np.add(chunk, received[r], out=chunk)
        np.divide(chunk, self._divisor, out=chunk)
        from mpi4py import MPI
        self._requests[b] = plan["comm"].Iallgatherv(MPI.IN_PLACE, plan["gather"])
        self.state[b] = GATHERING

    def progress(self):
        """Advance every bucket in flight (call it between layers). Returns how many are done."""
        for b, state in enumerate(self.state):
            if state == EXCHANGING and self._requests[b].Test():
                self._sum_and_gather(b)
                state = GATHERING
            if state == GATHERING and self._requests[b].Test():
                self.state[b] = DONE
        return sum(s == DONE for s in self.state)

    def done(self, bucket):
        """True once bucket ``bucket`` holds its average (before :meth:`wait` resets it)."""
        return self.state[self._index(bucket)] == DONE

    def wait(self):
        """Block until every bucket holds its average; then ready for the next step."""
        missing = [b for b, s in enumerate(self.state) if s == IDLE]
        if missing:
            raise RuntimeError(f"bucket(s) {missing} were never started this step")
        t0 = time.perf_counter()
        for b in range(len(self.state)):
            if self.state[b] == EXCHANGING:
                self._requests[b].Wait()
                self._sum_and_gather(b)
        for b in range(len(self.state)):
            if self.state[b] == GATHERING:
                self._requests[b].Wait()
        self.wait_seconds = time.perf_counter() - t0
        self.state = [IDLE] * len(self.buckets)
        self._requests = [None] * len(self.buckets)

    def close(self):
        """Free the per-bucket communicators (collective: every rank calls it)."""
        for plan in self._plans:
            plan["comm"].Free()
        self._plans = []
