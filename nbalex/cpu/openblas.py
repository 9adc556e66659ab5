"""NumPy's OpenBLAS, reached through ctypes: its thread count, its ``cblas_sgemm``, and a pool
of sleeping threads for its parallel jobs.

OpenBLAS's thread count is switched to 1 while the workers run and restored afterwards,
through the library NumPy loaded (found in /proc/self/maps).  Where that library cannot be
found, the work runs on the calling thread alone with BLAS threaded as usual.

The library's ``cblas_sgemm`` is exposed as :func:`gemm` (None where it is missing): unlike
``np.matmul`` it accumulates into its output (beta = 1) and reads operands with any row
stride, which the stride-1 convolution uses to sum one GEMM per kernel row without copies.
ctypes releases the GIL for the call, so the workers' GEMMs run side by side.

OpenBLAS's own threads spin for about 0.1 s after every multithreaded call (its
``OPENBLAS_THREAD_TIMEOUT``, read only when the library loads) and take a core from the Numba
kernels and worker GEMMs that follow: the fully connected layers' GEMMs slowed the
convolutions after them.  So this module hands its parallel jobs to a pool of its own
(:class:`BlasJobPool`, through ``openblas_set_threads_callback_function``, OpenBLAS >= 0.3.28)
whose idle threads sleep.  OpenBLAS still splits the work: the same jobs on the same data, so
the same bits.  ``NBALEX_BLAS_THREADS=openblas`` (:mod:`nbalex.cpu.threads`) leaves OpenBLAS's
own threads in charge; :data:`BLAS_POOL` says which runs.  The hand-off costs some tens of
microseconds per call, so a lone image's convolution shares its filters between the workers
instead (one handoff a layer, :mod:`nbalex.cpu.conv2d`) and small GEMMs keep BLAS
single-threaded (:func:`nbalex.cpu.conv_strategy.serial_blas`).  A forked child (the
loader's readers) goes back to OpenBLAS's own threads (threads do not survive a fork).
"""

import _thread
import atexit
import ctypes
import os
import threading
from contextlib import contextmanager

import numpy as np  # noqa: F401  (loads the BLAS library looked up below)

from . import threads
from .handoff import Helper


def _openblas_libraries():
    """The OpenBLAS shared libraries loaded in this process (NumPy's), opened with ctypes."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return
    for path in paths:
        try:
            yield ctypes.CDLL(path)
        except OSError:
            continue


def _openblas_thread_controls():
    """(get, set) for the OpenBLAS NumPy links, or None when it cannot be found."""
    for lib in _openblas_libraries():
        for suffix in ("64_", "", "_64"):
            for prefix in ("scipy_openblas", "openblas"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype = ctypes.c_int
                    put.argtypes = [ctypes.c_int]
                    return get, put
    return None


def _openblas_sgemm():
    """cblas_sgemm (64-bit integer interface) of the OpenBLAS NumPy links, or None."""
    for lib in _openblas_libraries():
        for name in ("scipy_cblas_sgemm64_", "cblas_sgemm64_"):
            fn = getattr(lib, name, None)
            if fn is not None:
                i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, f32,
                               ptr, i64, ptr, i64, f32, ptr, i64]
                fn.restype = None
                return fn
    return None


def _openblas_callback_setter():
    """openblas_set_threads_callback_function of the OpenBLAS NumPy links, or None."""
    for lib in _openblas_libraries():
        for name in ("scipy_openblas_set_threads_callback_function64_",
                     "scipy_openblas_set_threads_callback_function",
                     "openblas_set_threads_callback_function64_",
                     "openblas_set_threads_callback_function"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_void_p]
                fn.restype = None
                return fn
    return None


# OpenBLAS's callback contract (cblas.h): job i is dojob(i, jobdata + i * elsize, dojob_data);
# every job must have run when the callback returns.
_DOJOB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t,
                             ctypes.c_void_p, ctypes.c_int)


class BlasJobPool:
    """Runs the jobs of one multithreaded OpenBLAS call: job 0 on the calling thread, jobs
    1..n-1 on :class:`nbalex.cpu.handoff.Helper` threads, asleep (not spinning) between calls.

    All n jobs run at the same time (OpenBLAS's GEMM jobs wait on each other), so the pool
    grows to n-1 threads.  One call at a time (a lock): the jobs of a call use OpenBLAS's
    per-job-index buffers.  ``calls`` counts the calls served."""

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()
        self._helpers = []

    def __call__(self, sync, dojob, numjobs, elsize, jobdata, dojob_data):
        fn = _DOJOB(dojob)
        jobdata = jobdata or 0
        with self._lock:
            self.calls += 1
            while len(self._helpers) < numjobs - 1:
                self._helpers.append(Helper(f"nbalex-blas-{len(self._helpers)}"))
            for i, helper in enumerate(self._helpers[:numjobs - 1], start=1):
                helper.start(lambda i=i: fn(i, jobdata + i * elsize, dojob_data))
            fn(0, jobdata, dojob_data)
            # OpenBLAS reuses the jobs' buffers once the callback returns, so a Ctrl-C does
            # not cut the wait short: it is raised again after.
            if [h.wait() for h in self._helpers[:numjobs - 1]] != [None] * (numjobs - 1):
                _thread.interrupt_main()


SET_CALLBACK = _openblas_callback_setter()
_installed = []                              # [(BlasJobPool, its C function pointer)] while installed


def install_blas_pool():
    """Route OpenBLAS's parallel jobs through a new :class:`BlasJobPool`; returns it (None
    where this OpenBLAS has no callback entry point).  Replaces a pool installed before."""
    if SET_CALLBACK is None:
        return None
    pool = BlasJobPool()
    pointer = _CALLBACK(pool)
    SET_CALLBACK(ctypes.cast(pointer, ctypes.c_void_p))
    _installed[:] = [(pool, pointer)]        # keeps the C function pointer alive
    return pool


def uninstall_blas_pool():
    """Give OpenBLAS its own threads back (a no-op when no pool is installed)."""
    if _installed:
        SET_CALLBACK(None)
        _installed.clear()


def blas_pool():
    """The installed :class:`BlasJobPool`, or None."""
    return _installed[0][0] if _installed else None


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _row_stride(a):
    if a.dtype != np.float32 or a.ndim != 2 or a.strides[1] != 4 or a.strides[0] % 4:
        raise ValueError("gemm operands must be 2-D float32 with unit-stride rows")
    return max(a.strides[0] // 4, a.shape[1], 1)


def _gemm(a, b, c, beta, trans_a=False, trans_b=False):
    """c = op(a) @ op(b) + beta * c, float32, through cblas_sgemm; op(z) is z.T if trans_z.

    op(a) (M, K), op(b) (K, N), c (M, N): 2-D views whose rows are contiguous (any row
    stride).  Only ``c`` is written.
    """
    m, kk = a.shape[::-1] if trans_a else a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != kk or c.shape != (m, n):
        raise ValueError(f"gemm shapes {a.shape} {b.shape} -> {c.shape} do not fit")
    op_a, op_b = (_TRANS if t else _NO_TRANS for t in (trans_a, trans_b))
    _SGEMM(_ROW_MAJOR, op_a, op_b, m, n, kk, 1.0,
           a.ctypes.data, _row_stride(a), b.ctypes.data, _row_stride(b), float(beta),
           c.ctypes.data, _row_stride(c))


CONTROLS = _openblas_thread_controls()
_SGEMM = _openblas_sgemm()
gemm = _gemm if _SGEMM is not None else None
if threads.BLAS_THREADS == "pool" and install_blas_pool() is not None:
    BLAS_POOL = "nbalex pool (idle threads sleep)"
    atexit.register(uninstall_blas_pool)     # before interpreter teardown stops the pool's threads
else:
    BLAS_POOL = "OpenBLAS's own" + (" (NBALEX_BLAS_THREADS=openblas)" if threads.BLAS_THREADS != "pool"
                                    else " (no callback entry point)")



def _after_fork_in_child():
    """Threads do not survive a fork: the child's BLAS runs on OpenBLAS's own threads."""
    uninstall_blas_pool()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def _nothing():
    yield


@contextmanager
def single_threaded():
    get, put = CONTROLS
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)


def serial_if(serial):
    """A context in which BLAS runs single-threaded when ``serial`` (else nothing changes)."""
    return single_threaded() if serial and CONTROLS else _nothing()
