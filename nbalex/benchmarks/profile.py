"""Per-layer profiling of a training step by wrapping a backend's launchers.

:func:`instrument` replaces every launcher of a backend module (``nbalex.cpu``,
``nbalex.cuda``) by a wrapper that counts the call and, while recording, times it with the
device synchronised before and after; the originals come back when the context ends. Each
call is attributed to a layer of the config by the shapes of its arrays (a conv or fc by its
weight shape, an LRN or pool by its input's size); ReLU, dropout, the loss and the SGD step
each get one bucket of their own. Nothing here knows how the network calls the launchers,
only that it calls them through the backend module.
"""

import contextlib
import inspect
import math
import time
from collections import defaultdict

from .. import backends

NOT_LAUNCHES = ("conv2d_workspace_size", "linear_workspace_size")  # arithmetic, not launches

# launcher -> (argument holding the array that identifies the layer, layer type it belongs to)
_KEYS = {
    "conv2d_forward": ("w", "conv"), "conv2d_backward_data": ("w", "conv"),
    "conv2d_backward_weights": ("dw", "conv"),
    "linear_forward": ("w", "fc"), "linear_backward_data": ("w", "fc"),
    "linear_backward_weights": ("dw", "fc"),
    "lrn_forward": ("x", "lrn"), "lrn_backward": ("dx", "lrn"),
    "maxpool_forward": ("x", "maxpool"), "maxpool_backward": ("dx", "maxpool"),
}
_BUCKETS = {"relu_forward": "relu", "relu_backward": "relu",
            "dropout_forward": "dropout", "dropout_backward": "dropout",
            "softmax_xent_forward": "softmax-xent", "softmax_xent_backward": "softmax-xent",
            "sgd_update": "sgd", "augment_batch": "augment"}


class LayerAttributor:
    """Maps a launcher call to a layer name using the config's layer specs and the batch."""

    def __init__(self, layer_specs, batch):
        self.batch = batch
        self.by_weight = {}
        self.by_size = defaultdict(dict)
        for spec in layer_specs:
            if spec.type in ("conv", "fc"):
                self.by_weight.setdefault((spec.type, tuple(spec.params[0].shape)), spec.name)
            elif spec.type in ("lrn", "maxpool"):
                self.by_size[spec.type].setdefault(batch * math.prod(spec.in_shape), spec.name)
        self.signatures = {n: inspect.signature(getattr(_reference(), n)) for n in backends.LAUNCHERS}

    def layer(self, launcher, args, kwargs):
        if launcher in _BUCKETS:
            return _BUCKETS[launcher]
        key = _KEYS.get(launcher)
        if key is None:
            return launcher
        try:
            arr = self.signatures[launcher].bind(*args, **kwargs).arguments[key[0]]
            shape = tuple(int(s) for s in arr.shape)
        except (TypeError, KeyError, AttributeError):
            return launcher
        if key[1] in ("conv", "fc"):
            return self.by_weight.get((key[1], shape), launcher)
        return self.by_size[key[1]].get(math.prod(shape), launcher)


def _reference():
    import nbalex.reference
    return nbalex.reference


class LaunchRecorder:
    """Counts launcher calls; while ``recording`` also times each one per layer."""

    def __init__(self, attributor, sync):
        self.attributor, self.sync = attributor, sync
        self.recording = False
        self.calls = 0
        self.seconds = defaultdict(float)
        self.counts = defaultdict(int)

    def reset(self):
        self.calls = 0
        self.seconds.clear()
        self.counts.clear()

    def wrap(self, name, fn):
        def launcher(*args, **kwargs):
            if not self.recording:
                return fn(*args, **kwargs)
            self.calls += 1
            layer = self.attributor.layer(name, args, kwargs)
            self.sync()
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            self.sync()
            self.seconds[layer] += time.perf_counter() - t0
            self.counts[layer] += 1
            return result
        launcher.__wrapped__ = fn
        launcher.__name__ = name
        if hasattr(fn, "unchecked"):     # Net's fast path (nbalex.checks) is timed too
            launcher.unchecked = self.wrap(name, fn.unchecked)
        return launcher


@contextlib.contextmanager
def instrument(modules, recorder):
    """Wrap the launchers of every module in ``modules`` with ``recorder``; restore on exit."""
    saved = []
    try:
        for module in modules:
            for name in backends.LAUNCHERS:
                if name in NOT_LAUNCHES:
                    continue
                fn = getattr(module, name, None)
                if callable(fn):
                    saved.append((module, name, fn))
                    setattr(module, name, recorder.wrap(name, fn))
        yield recorder
    finally:
        for module, name, fn in reversed(saved):
            setattr(module, name, fn)
