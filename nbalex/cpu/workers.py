"""The CPU backend's threads: one team of Python threads for every kernel, single-threaded BLAS.

Every CPU kernel is a serial, GIL-free Numba function over a range of independent tasks;
:func:`for_ranges` splits a pass between the team (the calling thread runs the first range)
and :func:`run` splits a convolution's batch between the workers, each running im2col ->
SGEMM -> epilogue on its own images with single-threaded BLAS.  Numba's own parallel loops
are not used: under the ``workqueue`` layer each launch cost 165 us on the 2-core machine,
and an OpenMP layer's spinning threads took the cores from the GEMMs.  Waking a sleeping
helper still costs tens of microseconds (more on a VM), so small passes stay on the calling
thread (SERIAL_WORK).  Splitting the batch needs one synchronisation per layer instead of
one per kernel and per GEMM; on two shared cores this ran AlexNet's convolutions 1.2-3.7x
faster (median wall time) than the same kernels with both threads inside every GEMM.

OpenBLAS itself (its thread count, its ``cblas_sgemm``, the pool its parallel jobs run on) is
:mod:`nbalex.cpu.openblas`.
"""

import os
import threading

import numba

from . import openblas
from . import threads  # noqa: F401  (picks the threading layer before any kernel runs)
from .handoff import Helper

THREADS = max(1, min(numba.config.NUMBA_NUM_THREADS, os.cpu_count() or 1))
WORKERS = THREADS if openblas.CONTROLS else 1   # the convolution's shares need single-threaded BLAS
SERIAL_WORK = 1 << 19                               # see for_ranges
_pool = []


def _after_fork_in_child():
    """Threads do not survive a fork: the child's first parallel call starts a new team."""
    _pool.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def split(n, parts):
    """[(lo, hi)] contiguous ranges covering range(n), ``parts`` of them (some may be empty)."""
    step = -(-n // parts)
    return [(min(n, t * step), min(n, (t + 1) * step)) for t in range(parts)]


class _Team:
    """``helpers`` :class:`nbalex.cpu.handoff.Helper` threads that each run one share of a
    parallel call while the calling thread runs the first share; between calls they sleep.

    One call at a time: a call made while another runs (from a share, or from a second Python
    thread) runs all its shares on its own thread instead (:func:`_run_shares`).
    """

    def __init__(self, helpers):
        self.busy = threading.Lock()
        self._helpers = [Helper(f"nbalex-cpu-{i + 1}") for i in range(helpers)]

    def run(self, jobs):
        """Run jobs[0] here and jobs[1:] on the helpers; return when all have ended, raising
        the first exception (in share order).  A Ctrl-C does not cut the wait short (the
        helpers write the caller's arrays): it is raised, as itself, once every share has
        ended."""
        helpers = self._helpers[:len(jobs) - 1]
        for helper, job in zip(helpers, jobs[1:]):
            helper.start(job)
        first = None
        try:
            jobs[0]()
        except BaseException as error:
            first = error
        interrupts = [helper.wait() for helper in helpers]
        for error in interrupts + [first] + [helper.error for helper in helpers]:
            if error is not None:
                raise error


def _team():
    if not _pool:
        _pool.append(_Team(THREADS - 1))
    return _pool[0]


def _run_shares(jobs):
    """Run the jobs in parallel on the team, or one after another here when it is taken."""
    if len(jobs) == 1:
        jobs[0]()
        return
    team = _team()
    if not team.busy.acquire(blocking=False):
        for job in jobs:
            job()
        return
    try:
        team.run(jobs)
    finally:
        team.busy.release()


def run(work, n, serial_blas=False):
    """Call work(t, lo, hi) for worker t over its share [lo, hi) of n images, all in parallel
    (WORKERS shares, single-threaded BLAS inside them), the first on the calling thread.

    When a single worker has images it runs on the calling thread, with BLAS threaded as
    usual unless ``serial_blas`` (for GEMMs too small to share: threaded OpenBLAS jobs wait
    on each other, and one descheduled by a busy core stalls the call).  Returns the list
    of workers that had images.  Exceptions propagate to the caller.
    """
    ranges = split(n, WORKERS)
    busy = [t for t, (lo, hi) in enumerate(ranges) if hi > lo]
    if WORKERS == 1 or len(busy) == 1:
        with openblas.serial_if(serial_blas):
            for t in busy:
                work(t, *ranges[t])
        return busy
    with openblas.single_threaded():
        _run_shares([lambda t=t: work(t, *ranges[t]) for t in busy])
    return busy


def for_ranges(kernel, tasks, *args, work=None):
    """[kernel(*args, lo, hi)] for THREADS contiguous ranges [lo, hi) covering range(tasks),
    run in parallel, the first on the calling thread; the results in range order.

    The kernels are serial ``nogil`` Numba functions whose tasks are independent, so the
    split never changes a bit.  A pass whose ``work`` (elements it touches; ``tasks`` when
    None) is below SERIAL_WORK runs as one range on the calling thread: waking a helper costs
    more than such a pass.  (Numba's own parallel loops cost 165 us a launch under the
    ``workqueue`` layer on the 2-core machine, more than most of a small step's passes.)
    """
    if THREADS == 1 or (tasks if work is None else work) < SERIAL_WORK or tasks < 2:
        return [kernel(*args, 0, tasks)]
    ranges = [r for r in split(tasks, THREADS) if r[1] > r[0]]
    results = [None] * len(ranges)

    def job(i):
        results[i] = kernel(*args, *ranges[i])

    _run_shares([lambda i=i: job(i) for i in range(len(ranges))])
    return results
