"""Threading choice shared by the CPU kernels.

The CPU backend alternates Numba parallel regions (im2col, LRN, pooling, ...) with
multithreaded BLAS calls.  Under the OpenMP threading layer, Numba's worker threads keep
spinning after each region and starve the BLAS threads that follow (measured: a grouped conv
forward ran 1.5-2x slower next to PyTorch's OpenMP runtime).  Numba's ``workqueue`` layer
parks its threads instead, so it is chosen here unless the user picked a layer through
``NUMBA_THREADING_LAYER``.  This only takes effect if no parallel kernel has run yet in the
process.  (``workqueue`` must not be entered from two Python threads at the same time.)
"""

import os

from numba import config

if "NUMBA_THREADING_LAYER" not in os.environ:
    config.THREADING_LAYER = "workqueue"
