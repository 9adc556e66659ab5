"""The CPU backend: Numba ``@njit`` kernels (parallel, compiled once and cached) and the BLAS
that NumPy links, one file per layer.

Every launcher of :mod:`nbalex.backends` is exported here with the contract's signature; it
takes NumPy arrays the caller owns.  ``stream`` is accepted and ignored.  Convolutions are
lowered to GEMM through an im2col ``workspace`` the caller may preallocate
(``conv2d_workspace_size``); the linear launchers use one for their transposed GEMM output
(``linear_workspace_size``).
"""

from nbalex.backends import LAUNCHERS

from .augment import augment_batch
from .conv2d import (conv2d_backward_data, conv2d_backward_weights, conv2d_forward,
                     conv2d_workspace_size)
from .dropout import dropout_backward, dropout_forward
from .linear import (linear_backward_data, linear_backward_weights, linear_forward,
                     linear_workspace_size)
from .lrn import lrn_backward, lrn_forward
from .maxpool import maxpool_backward, maxpool_forward
from .relu import relu_backward, relu_forward
from .sgd import sgd_update
from .softmax_xent import softmax_xent_backward, softmax_xent_forward

__all__ = list(LAUNCHERS)      # exactly the contract's launchers
