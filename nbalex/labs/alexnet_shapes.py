"""The GPU leg's cases: every lab at AlexNet's layer shapes (``nbalex/configs/alexnet.toml``,
batch :data:`BATCH`), or at those shapes scaled down (``scale`` < 1, for the simulator).

:func:`plan` lists a lab's shapes as :class:`Planned` (a label, and ``build()`` making the
arrays only when the case runs: sgd's buffers hold 61 M floats).  A built :class:`Shape`
holds a :class:`nbalex.labs.cases.Case` whose ``outputs`` are zero placeholders of the right
shape and dtype (the expected values are the package's launcher's, computed on the same
inputs by :mod:`nbalex.labs.gpu_shapes`), ``package(module, arrays)``, the package's own
call (``module`` is ``nbalex.cuda.<package>``, or ``nbalex.reference.<package>`` in tests),
and ``params``, what :mod:`nbalex.labs.torch_ops` needs for PyTorch's equivalent.
Tolerances are the small-shape cases'.  The plans themselves are in
:mod:`nbalex.labs.alexnet_layer_plans` and :mod:`nbalex.labs.alexnet_gemm_plans`.

Scaling multiplies each size by ``scale`` (batch, channels and filters kept multiples of the
groups, pixels at least what the window needs, kernels and strides as they are), so every
scaled shape is a valid call of the same launcher.
"""

import dataclasses

import numpy as np

from nbalex.labs.cases import Case

BATCH = 128
"""AlexNet's batch (the paper's): every lab fits it on one GPU."""

PACKAGE = {"relu": "relu", "dropout": "dropout", "maxpool": "maxpool", "lrn": "lrn",
           "softmax_xent": "softmax_xent", "sgd": "sgd", "sgemm": "linear", "conv2d": "conv2d"}
"""Lab op -> the nbalex.cuda (and nbalex.reference) module whose launcher is compared."""


@dataclasses.dataclass
class Shape:
    """One launcher call at AlexNet's shape (see the module docstring)."""
    case: Case
    layer: str
    package: object              # package(module, arrays) -> None
    params: dict
    extra: dict = dataclasses.field(default_factory=dict)   # host arrays only package reads


@dataclasses.dataclass
class Planned:
    label: str
    launcher: str
    build: object                # () -> Shape


class Scaled:
    """Sizes at ``scale`` (0 < scale <= 1) of AlexNet's."""

    def __init__(self, scale):
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], not {scale!r}")
        self.scale = scale
        self.batch = self.n(BATCH)

    def n(self, size, low=1, multiple=1):
        """size * scale rounded, at least ``low``, a multiple of ``multiple``."""
        v = max(low, int(round(size * self.scale)))
        return max(multiple, v // multiple * multiple)


def layers():
    """AlexNet's checked layers by name (nbalex/configs/alexnet.toml)."""
    from nbalex.config import load_config
    return {spec.name: spec for spec in load_config("alexnet")[2]}


def rng_for(label):
    """A generator seeded by ``label``: each shape's inputs are the same every run."""
    return np.random.default_rng(sum(label.encode()))


def normal(rng, shape, sd=1.0):
    """float32 N(0, sd**2) of ``shape`` (drawn in float32: sgd's 61 M draws stay fast)."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sd)


def zeros(shape, dtype=np.float32):
    """An output's placeholder: its shape and dtype until the package's values replace it."""
    return np.zeros(shape, dtype)


def same(launcher, call):
    """package(module, arrays): the module's ``launcher`` called as the student's is (the
    case's ``call``)."""
    return lambda module, a: call(getattr(module, launcher), a)


def workspace(a, size):
    """The package's split-K workspace in the arrays ``a`` (made on first use, where the
    arrays are: a device array on cuda, NumPy in tests), so a timed call allocates nothing;
    None when the launcher needs none (size 0)."""
    if "workspace" not in a:
        if size == 0:
            a["workspace"] = None
        elif hasattr(next(iter(a.values())), "copy_to_host"):
            from numba import cuda
            a["workspace"] = cuda.device_array(size, np.float32)
        else:
            a["workspace"] = np.empty(size, np.float32)
    return a["workspace"]


def entry(launcher, label, build):
    """Planned(label, launcher, build)."""
    return Planned(label, launcher, build)


def plan(lab, scale=1.0):
    """[Planned] of ``lab`` at ``scale`` of AlexNet's shapes (cheap: no arrays yet)."""
    from nbalex.labs.alexnet_gemm_plans import PLANS as GEMM_PLANS
    from nbalex.labs.alexnet_layer_plans import PLANS as LAYER_PLANS
    return {**LAYER_PLANS, **GEMM_PLANS}[lab.name](Scaled(scale), layers())
