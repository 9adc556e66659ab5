"""NumPy reference backend: the oracle every other backend is tested against.

One file per layer, forward and backward side by side, written to be read.  Each launcher
has the signature fixed in :mod:`nbalex.backends` (outputs first, written into buffers the
caller owns, ``stream`` ignored) and computes in the dtype of the arrays it is given, so the
same code runs in float32 (to compare with the kernels) and float64 (for finite differences).
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
