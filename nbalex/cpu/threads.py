"""Threading choices shared by the CPU code.

The CPU backend's kernels run on its own thread team (:mod:`nbalex.cpu.workers`), not in
Numba parallel regions; the one parallel Numba kernel left is the loader's augmentation
(:mod:`nbalex.cpu.augment`, in the reader processes).  For it, Numba's ``workqueue`` layer is
chosen unless the user picked a layer through ``NUMBA_THREADING_LAYER``: under the OpenMP
layer, Numba's worker threads keep spinning after each region and starve the BLAS threads
that follow (measured: a grouped conv forward, then built from parallel im2col + threaded
GEMMs, ran 1.5-2x slower in a process that had also loaded PyTorch's OpenMP runtime).  This
only takes effect if no parallel kernel has run yet in the process.  (``workqueue`` must not
be entered from two Python threads at the same time.)

``NBALEX_BLAS_THREADS`` picks who runs OpenBLAS's parallel jobs: ``pool`` (the default), a
pool of :mod:`nbalex.cpu.openblas` whose idle threads sleep, or ``openblas``, OpenBLAS's own
threads, which spin for a while after each call (see :mod:`nbalex.cpu.openblas`).
"""

import os

from numba import config

if "NUMBA_THREADING_LAYER" not in os.environ:
    config.THREADING_LAYER = "workqueue"

BLAS_THREADS = os.environ.get("NBALEX_BLAS_THREADS", "pool")
if BLAS_THREADS not in ("pool", "openblas"):
    raise ValueError(f"NBALEX_BLAS_THREADS must be 'pool' or 'openblas', got {BLAS_THREADS!r}")
