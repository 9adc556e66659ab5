"""nbalex: AlexNet (Krizhevsky, Sutskever & Hinton, 2012) rebuilt from scratch.

Every layer's forward and backward pass exists three times, with the same launcher
signatures: ``nbalex.reference`` (NumPy, the oracle), ``nbalex.cpu`` (Numba on the CPU plus
BLAS) and ``nbalex.cuda`` (Numba CUDA kernels). ``nbalex.ops`` is the NumPy-in, NumPy-out
façade for labs; ``nbalex.model.Net`` is the network.
"""

__version__ = "0.1.0"
