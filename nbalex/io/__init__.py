"""Data: ImageNet-style folders packed into HDF5, and the loader that feeds the network.

Modules: ``pack`` (folders of images → HDF5: ``nbalex.io.pack.pack``), ``synth`` (a
synthetic dataset for demos and tests: ``nbalex.io.synth.synth``), ``dataset``
(``H5Dataset``, reading a packed file), ``loader`` (``Loader``: seeded, resumable, prefetched
batches with the paper's augmentation on the backend's device), ``augment`` (the random
draws), ``image`` (the one path from an image file to a packed square, shared by pack and
predict), ``children`` (start-up of every worker process: it dies with its parent).  The functions ``pack`` and ``synth`` are not re-exported here, so that the module
names stay the modules.
"""

from .dataset import H5Dataset
from .errors import DataError
from .loader import Loader

__all__ = ["DataError", "H5Dataset", "Loader"]
