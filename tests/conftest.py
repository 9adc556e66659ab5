"""Test setup: without a GPU, CUDA kernels run under Numba's simulator at tiny shapes.

The simulator must be switched on before numba is first imported, so this happens here, at
collection time.  On a machine with a GPU (``nvidia-smi`` answers) the same suite runs the
kernels for real and the ``gpu``-marked tests run at AlexNet's shapes.
"""

import os

from nbalex.labs.grader import gpu_present   # imports neither numba nor the kernels

if "NUMBA_ENABLE_CUDASIM" not in os.environ and not gpu_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

requires_gpu = pytest.mark.skipif(SIMULATOR, reason="needs a real GPU (AlexNet-sized shapes)")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
