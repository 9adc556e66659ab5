"""The network's buffers: where everything a tower holds sits, carved once from its arena.

:class:`ParamLayout` places each parameter tensor in a tower's flat parameter, gradient and
momentum buffers (each tower holds its block of axis 0); :func:`build` carves those, the
input, labels, losses, activation-gradient, exchange and workspace buffers and every stage's
own buffers (:mod:`nbalex.layers`, :mod:`nbalex.towers`) from one arena per tower, on the
places :func:`make_places` makes.  Built on sizing arenas (:mod:`nbalex.memory`), it
measures instead: :func:`arena_bytes` is that measurement for a config, without a network.
"""

import numpy as np

from nbalex.backends import get_backend
from nbalex.layers import LayerStage, TowerContext
from nbalex.memory import HostPlace, SizingArena, TransferCounter, aligned
from nbalex.towers import Gather, GatherStep, plan_steps, prod


class ParamLayout:
    """Where each parameter tensor sits in one tower's flat buffers (its block of axis 0)."""

    def __init__(self, specs, towers):
        self.specs = [p for layer in specs for p in layer.params]
        self.towers = towers
        self.shapes, self.offsets = {}, [0]
        for p in self.specs:
            shape = (p.shape[0] // towers, *p.shape[1:]) if towers > 1 else p.shape
            self.shapes[p.name] = shape
            self.offsets.append(self.offsets[-1] + prod(shape))
        self.size = self.offsets[-1]

    def views(self, flat):
        return {p.name: flat[a:b].reshape(self.shapes[p.name])
                for p, a, b in zip(self.specs, self.offsets, self.offsets[1:])}


def workspace_size(backend, step, shapes, batch):
    """float32 elements of workspace ``step``'s launchers want at ``batch`` (0 for most layers).

    One workspace per tower serves every conv and linear layer: they run one after another
    on the tower's stream."""
    spec = step.spec
    if spec.type == "conv":
        return backend.conv2d_workspace_size((batch, *step.in_shape), shapes[f"{spec.name}.weight"],
                                             spec["stride"], spec["pad"], step.groups)
    if spec.type == "fc":
        return backend.linear_workspace_size((batch, prod(step.in_shape)), shapes[f"{spec.name}.weight"])
    return 0


def build(specs, steps, layout, backend, places, arenas, batch, dtype, towers):
    """Carve every buffer of every tower from ``arenas``; returns (contexts, stages, buffers)."""
    first = specs[0].in_shape
    classes = specs[-1].out_shape[0]
    grad_size = max(prod(s.shape if isinstance(s, GatherStep) else s.out_shape) for s in steps)
    block = max([prod(s.shape) // towers for s in steps if isinstance(s, GatherStep)] or [0])
    workspace = max([workspace_size(backend, s, layout.shapes, batch) for s in steps
                     if not isinstance(s, GatherStep)] or [0])
    ctxs, buffers = [], []
    for place, arena in zip(places, arenas):
        flats = {k: arena.alloc((layout.size,), dtype, k) for k in ("params", "grads", "momentum")}
        b = dict(flats)
        b["offsets"] = arena.alloc((len(layout.offsets),), np.int64, "sgd.offsets")
        b["lr_mults"] = arena.alloc((len(layout.specs),), np.float32, "sgd.lr_mults")
        b["decay_mults"] = arena.alloc((len(layout.specs),), np.float32, "sgd.decay_mults")
        b["nonfinite"] = arena.alloc((1,), np.int32, "sgd.nonfinite")
        b["input"] = arena.alloc((batch, *first), dtype, "input")
        b["labels"] = arena.alloc((batch,), np.int32, "labels")
        b["losses"] = arena.alloc((batch,), dtype, "losses")
        b["probs"] = arena.alloc((batch, classes), dtype, "probs")
        b["grad_bufs"] = [arena.alloc((batch * grad_size,), dtype, f"activation_grads{i}") for i in (0, 1)]
        b["recv"] = arena.alloc((batch * block,), dtype, "recv") if towers > 1 else None
        b["send"] = arena.alloc((batch * block,), dtype, "send") if towers > 1 else None
        ws = arena.alloc((workspace,), np.float32, "workspace") if workspace else None
        ctxs.append(TowerContext(backend, place, arena, batch, dtype, layout.views(flats["params"]),
                                 layout.views(flats["grads"]), ws))
        b["momentum_views"] = layout.views(flats["momentum"])
        buffers.append(b)
    stages = []
    for step in steps:
        if isinstance(step, GatherStep):
            stages.append(Gather(step, ctxs, [b["recv"] for b in buffers], [b["send"] for b in buffers]))
        else:
            stages.append(LayerStage(step, ctxs, specs.index(step.spec)))
    return ctxs, stages, buffers


def make_places(backend_name, gpus):
    if backend_name == "cuda":
        from nbalex.cuda.device import make_towers
        from nbalex.cuda.memory import TransferCounter as DeviceCounter
        transfers = DeviceCounter()
        return make_towers(gpus, transfers), transfers
    transfers = TransferCounter()
    return [HostPlace(i, transfers) for i in range(len(gpus))], transfers


def arena_bytes(specs, batch_size, backend="cuda", towers=1, dtype=np.float32):
    """Bytes one tower's arena needs for a training step at ``batch_size``."""
    steps = plan_steps(specs, towers)
    layout = ParamLayout(specs, towers)
    sizers = [SizingArena() for _ in range(towers)]
    places = [HostPlace(i) for i in range(towers)]
    build(specs, steps, layout, get_backend(backend, need_device=False), places, sizers,
           batch_size, dtype, towers)
    return sizers[0].used, 3 * aligned(layout.size * np.dtype(dtype).itemsize)
