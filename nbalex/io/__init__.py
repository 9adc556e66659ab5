"""Data: ImageNet-style folders packed into HDF5, and the loader that feeds the network.

``pack`` (folders of images → HDF5), ``synth`` (a synthetic dataset for demos and tests),
``H5Dataset`` (reading a packed file), ``Loader`` (seeded, resumable, prefetched batches with
the paper's augmentation on the backend's device).
"""

from .dataset import H5Dataset
from .errors import DataError
from .loader import Loader
from .pack import load_and_resize, pack
from .synth import synth

__all__ = ["DataError", "H5Dataset", "Loader", "load_and_resize", "pack", "synth"]
