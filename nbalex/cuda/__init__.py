"""The CUDA backend: one file per layer, Numba ``@cuda.jit`` kernels then their launchers.

Every launcher of :mod:`nbalex.backends` is exported here with the contract's signature; it
takes Numba device arrays the caller owns and an explicit ``stream``.  The kernels also run
under Numba's simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported).

``memory`` (the arena, pinned buffers, the transfer counter), ``device`` (a tower: its GPU,
streams and events) and ``static`` (PTX/SASS reports for sm_90) are imported on demand.
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
