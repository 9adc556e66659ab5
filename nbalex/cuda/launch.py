"""Small helpers shared by the CUDA launchers: streams, grid sizing, precondition checks.

Every launcher takes arrays the caller owns (numba device arrays, or host NumPy arrays that
numba copies around the launch), checks them with the ``check_*`` functions below (each
raises ``ValueError`` naming the argument), and launches on an explicit stream.
"""

import contextlib
import importlib
import pkgutil
import time

import numpy as np
from numba import cuda

THREADS_PER_BLOCK = 256
"""Block size of the 1-D grid-stride kernels."""

MAX_BLOCKS = 4096
"""Cap on 1-D grid size: 4096 x 256 threads fill any current GPU; grid-stride loops do the rest."""


def stream_or_default(stream):
    """The stream to launch on: ``stream``, or ``cuda.default_stream()`` when it is None."""
    return cuda.default_stream() if stream is None else stream


def grid_1d(n, threads=THREADS_PER_BLOCK):
    """Blocks for a 1-D grid-stride launch over ``n`` items: enough for one item per thread,
    at least 1, at most MAX_BLOCKS (read at call time, so tests can shrink it)."""
    return max(1, min((int(n) + threads - 1) // threads, MAX_BLOCKS))


def check_shape(name, arr, shape):
    """Raise ValueError unless ``arr.shape == shape`` (a tuple of ints)."""
    if tuple(arr.shape) != tuple(int(s) for s in shape):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")


def check_ndim(name, arr, ndim):
    """Raise ValueError unless ``arr`` has ``ndim`` dimensions."""
    if len(arr.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")


def check_dtype(name, arr, dtype):
    """Raise ValueError unless ``arr.dtype == dtype``."""
    if np.dtype(arr.dtype) != np.dtype(dtype):
        raise ValueError(f"{name} must be {np.dtype(dtype)}, got {np.dtype(arr.dtype)}")


def check_contiguous(name, arr):
    """Raise ValueError unless ``arr`` is C-contiguous."""
    if not arr.flags["C_CONTIGUOUS"]:
        raise ValueError(f"{name} must be C-contiguous")


def check_array(name, arr, dtype=np.float32, shape=None):
    """dtype, C-contiguity and (when given) shape of one launcher argument."""
    check_dtype(name, arr, dtype)
    check_contiguous(name, arr)
    if shape is not None:
        check_shape(name, arr, shape)


def flat(arr):
    """A 1-D view of a C-contiguous array (device or host), no copy."""
    return arr.reshape(arr.size)


# ---- counting launches (benchmarks, the sanitizer script) ---------------------------------

def is_kernel(obj):
    """True for a ``@cuda.jit`` kernel (real or simulated), False for device functions."""
    options = getattr(obj, "targetoptions", None)
    if isinstance(options, dict) and hasattr(obj, "configure"):
        return not options.get("device", False)
    if type(obj).__name__ == "FakeCUDAKernel":
        return not getattr(obj, "_device", True)
    return False


class LaunchLog:
    """What :func:`record_launches` saw: one ``(kernel name, grid, block, host seconds)`` per
    launch, the host seconds being the time the launch call took to return (argument
    marshalling and enqueueing, not the kernel's run time, which is asynchronous)."""

    def __init__(self):
        self.launches = []

    def __len__(self):
        return len(self.launches)

    def names(self):
        return [entry[0] for entry in self.launches]

    def host_seconds(self):
        return sum(entry[3] for entry in self.launches)

    def clear(self):
        self.launches.clear()


class _CountingKernel:
    """Stands in for a kernel in its module: ``kernel[config](*args)`` is logged, then run."""

    def __init__(self, kernel, name, log):
        self._kernel, self._name, self._log = kernel, name, log

    def __getitem__(self, config):
        configured = self._kernel[config]

        def launch(*args):
            t0 = time.perf_counter()
            result = configured(*args)
            self._log.launches.append((self._name, _dims(config, 0), _dims(config, 1),
                                       time.perf_counter() - t0))
            return result
        return launch

    def __getattr__(self, attr):
        return getattr(self._kernel, attr)


def _dims(config, i):
    value = config[i] if isinstance(config, tuple) and len(config) > i else None
    return tuple(value) if isinstance(value, (tuple, list)) else value


@contextlib.contextmanager
def record_launches(log=None):
    """Log every kernel launch of ``nbalex.cuda`` while the context is active; yields the
    :class:`LaunchLog`.  Each module's kernels, and the GEMM tile instances in its
    ``{(bm, bn): (kernel, threads)}`` tables, are replaced by loggers for the duration and put
    back on exit (launchers look their kernels up at call time)."""
    import nbalex.cuda as package

    log = LaunchLog() if log is None else log
    saved = []
    try:
        for info in pkgutil.iter_modules(package.__path__):
            if info.name == "static":
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for name, value in list(vars(module).items()):
                if is_kernel(value):
                    saved.append((module, name, value))
                    setattr(module, name, _CountingKernel(value, getattr(value, "__name__", name), log))
                elif isinstance(value, dict):     # tile instances: {(bm, bn): (kernel, threads)}
                    for key, entry in list(value.items()):
                        if isinstance(entry, tuple) and entry and is_kernel(entry[0]):
                            saved.append((value, key, entry))
                            kernel = entry[0]
                            value[key] = (_CountingKernel(kernel, getattr(kernel, "__name__", name), log),
                                          *entry[1:])
        yield log
    finally:
        for holder, name, value in reversed(saved):
            if isinstance(holder, dict):
                holder[name] = value
            else:
                setattr(holder, name, value)
