"""Per-layer bookkeeping of the network: which buffers each layer owns, which launchers run.

A layer step (:mod:`nbalex.towers` plans the steps and explains how layers split over
towers) is a :class:`LayerStage`: one executor per tower (:class:`Conv`, :class:`Linear`,
:class:`LRN`, :class:`MaxPool`, :class:`Dropout`), run tower by tower.  Executors allocate
their buffers from their tower's arena (:class:`TowerContext`) when built and never again;
``check`` runs :mod:`nbalex.checks` over every launch the executor will make (once, when the
network is built: the per-step launches then take the unchecked fast path,
``TowerContext.run``); ``forward(x, n, run)`` (``run`` a :class:`Pass`) returns the output
view, ``backward`` takes the gradient of the output and a free flat gradient buffer and
returns ``(dx, wrote_free)``: the gradient of the input and whether it landed in the free
buffer (``False`` when it was computed in place or passed through).
"""

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from nbalex import checks
from nbalex.backends import LAUNCHERS, mix32
from nbalex.towers import prod, view


def layer_seed(seed, index):
    """A 32-bit dropout seed for layer ``index`` at step ``seed``: distinct layers, distinct masks."""
    return mix32((int(seed) + 0x9E3779B9 * (index + 1)) & 0xFFFFFFFF)


@dataclass(frozen=True)
class Pass:
    """What one forward pass is for.  ``train`` switches dropout on (masks from ``seed``);
    ``batch_offset`` is the index of this batch's first example in the global batch (its
    dropout masks are then the global batch's); ``keep`` saves what backward needs (max-pool
    argmax, LRN scale): off for inference."""
    train: bool = False
    seed: int = 0
    batch_offset: int = 0
    keep: bool = True


class TowerContext:
    """What every executor of one tower needs: backend, place, stream, arena, buffers.

    ``run`` holds the backend's launchers without their argument checks (the fast path,
    for plans already checked with :mod:`nbalex.checks`)."""

    def __init__(self, backend, place, arena, batch, dtype, params, grads, workspace):
        self.backend = backend
        self.run = SimpleNamespace(**{n: checks.fast(getattr(backend, n)) for n in LAUNCHERS})
        self.place = place
        self.stream = place.compute_stream
        self.arena = arena
        self.batch = batch
        self.dtype = dtype
        self.params = params      # {name: view of the flat parameter buffer}
        self.grads = grads        # {name: view of the flat gradient buffer}
        self.workspace = workspace


class Conv:
    """Convolution (+ fused ReLU): y = relu(conv(x, w) + b).  Keeps x and y for backward."""

    def __init__(self, step, ctx):
        s = step.spec
        self.ctx, self.step, self.spec = ctx, step, s
        self.stride, self.pad, self.relu = s["stride"], s["pad"], s["relu"]
        self.w, self.b = ctx.params[f"{s.name}.weight"], ctx.params[f"{s.name}.bias"]
        self.dw, self.db = ctx.grads[f"{s.name}.weight"], ctx.grads[f"{s.name}.bias"]
        self.out = ctx.arena.alloc((ctx.batch, *step.out_shape), ctx.dtype, f"{s.name}.out")

    def check(self, backend):
        ctx, y = self.ctx, self.out
        x = checks.like((ctx.batch, *self.step.in_shape), ctx.dtype)
        args = (self.stride, self.pad, self.step.groups)
        checks.conv2d_forward(y, x, self.w, self.b, *args, backend=backend)
        checks.relu_backward(y, y, y, backend=backend)
        checks.conv2d_backward_weights(self.dw, self.db, y, x, *args, backend=backend)
        checks.conv2d_backward_data(x, y, self.w, *args, backend=backend)

    def forward(self, x, n, run):
        y = self.out[:n]
        self.ctx.run.conv2d_forward(y, x, self.w, self.b, self.stride, self.pad, self.step.groups,
                                        relu=self.relu, workspace=self.ctx.workspace, stream=self.ctx.stream)
        self.x, self.y = x, y
        return y

    def backward(self, dy, free, n, need_dx, on_weights=None):
        be, ctx = self.ctx.run, self.ctx
        if self.relu:
            be.relu_backward(dy, dy, self.y, stream=ctx.stream)
        be.conv2d_backward_weights(self.dw, self.db, dy, self.x, self.stride, self.pad, self.step.groups,
                                   workspace=ctx.workspace, stream=ctx.stream)
        if on_weights is not None:      # this layer's gradients are final (queued on ctx.stream)
            on_weights()
        if not need_dx:
            return None, False
        dx = view(free, n, self.step.in_shape)
        be.conv2d_backward_data(dx, dy, self.w, self.stride, self.pad, self.step.groups,
                                workspace=ctx.workspace, stream=ctx.stream)
        return dx, True


class Linear:
    """Fully connected (+ fused ReLU): y = relu(x.reshape(n, K) @ w.T + b)."""

    def __init__(self, step, ctx):
        s = step.spec
        self.ctx, self.step, self.spec, self.relu = ctx, step, s, s["relu"]
        self.inputs = prod(step.in_shape)
        self.w, self.b = ctx.params[f"{s.name}.weight"], ctx.params[f"{s.name}.bias"]
        self.dw, self.db = ctx.grads[f"{s.name}.weight"], ctx.grads[f"{s.name}.bias"]
        self.out = ctx.arena.alloc((ctx.batch, *step.out_shape), ctx.dtype, f"{s.name}.out")

    def check(self, backend):
        ctx, y = self.ctx, self.out
        x = checks.like((ctx.batch, self.inputs), ctx.dtype)
        checks.linear_forward(y, x, self.w, self.b, backend=backend)
        checks.relu_backward(y, y, y, backend=backend)
        checks.linear_backward_weights(self.dw, self.db, y, x, backend=backend)
        checks.linear_backward_data(x, y, self.w, backend=backend)

    def forward(self, x, n, run):
        y = self.out[:n]
        self.x = x.reshape(n, self.inputs)
        self.ctx.run.linear_forward(y, self.x, self.w, self.b, relu=self.relu,
                                        workspace=self.ctx.workspace, stream=self.ctx.stream)
        self.y = y
        return y

    def backward(self, dy, free, n, need_dx, on_weights=None):
        be, ctx = self.ctx.run, self.ctx
        if self.relu:
            be.relu_backward(dy, dy, self.y, stream=ctx.stream)
        be.linear_backward_weights(self.dw, self.db, dy, self.x, workspace=ctx.workspace,
                                   stream=ctx.stream)
        if on_weights is not None:
            on_weights()
        if not need_dx:
            return None, False
        dx = view(free, n, (self.inputs,))
        be.linear_backward_data(dx, dy, self.w, workspace=ctx.workspace, stream=ctx.stream)
        return dx.reshape((n, *self.step.in_shape)), True


class LRN:
    """Local response normalisation over channels, within ``groups`` blocks of channels."""

    def __init__(self, step, ctx):
        s = step.spec
        self.ctx, self.step, self.spec = ctx, step, s
        self.args = (s["size"], s["alpha"], s["beta"], s["k"])
        shape = (ctx.batch, *step.out_shape)
        self.out = ctx.arena.alloc(shape, ctx.dtype, f"{s.name}.out")
        self.scale = ctx.arena.alloc(shape, ctx.dtype, f"{s.name}.scale")

    def _grouped(self, a, n):
        """(n, C, ...) viewed as (n*groups, C/groups, ...): each group normalised on its own."""
        c = self.step.in_shape[0]
        g = self.step.groups
        return a.reshape((n * g, c // g, *self.step.in_shape[1:]))

    def check(self, backend):
        c, g = self.step.in_shape[0], self.step.groups
        if c % g:
            raise ValueError(f"layer {self.spec.name!r}: groups={g} does not divide its {c} channels")
        grouped = checks.like((self.ctx.batch * g, c // g, *self.step.in_shape[1:]), self.ctx.dtype)
        checks.lrn_forward(grouped, grouped, grouped, *self.args, backend=backend)
        checks.lrn_backward(grouped, grouped, grouped, grouped, grouped, *self.args, backend=backend)

    def forward(self, x, n, run):
        y, scale = self.out[:n], self.scale[:n]
        kept = self._grouped(scale, n) if run.keep else None
        self.ctx.run.lrn_forward(self._grouped(y, n), kept, self._grouped(x, n), *self.args,
                                 stream=self.ctx.stream)
        self.x, self.y, self.s = x, y, scale
        return y

    def backward(self, dy, free, n, need_dx):
        if not need_dx:
            return None, False
        dx = view(free, n, self.step.in_shape)
        g = self._grouped
        self.ctx.run.lrn_backward(g(dx, n), g(dy, n), g(self.x, n), g(self.y, n), g(self.s, n),
                                      *self.args, stream=self.ctx.stream)
        return dx, True


class MaxPool:
    """Max-pooling; keeps only the argmax indices for backward (not the input)."""

    def __init__(self, step, ctx):
        s = step.spec
        self.ctx, self.step, self.spec = ctx, step, s
        self.size, self.stride = s["size"], s["stride"]
        shape = (ctx.batch, *step.out_shape)
        self.out = ctx.arena.alloc(shape, ctx.dtype, f"{s.name}.out")
        self.idx = ctx.arena.alloc(shape, np.int32, f"{s.name}.argmax")

    def check(self, backend):
        x = checks.like((self.ctx.batch, *self.step.in_shape), self.ctx.dtype)
        checks.maxpool_forward(self.out, self.idx, x, self.size, self.stride, backend=backend)
        checks.maxpool_backward(x, self.out, self.idx, self.size, self.stride, backend=backend)

    def forward(self, x, n, run):
        y = self.out[:n]
        idx = self.idx[:n] if run.keep else None
        self.ctx.run.maxpool_forward(y, idx, x, self.size, self.stride, stream=self.ctx.stream)
        return y

    def backward(self, dy, free, n, need_dx):
        if not need_dx:
            return None, False
        dx = view(free, n, self.step.in_shape)
        self.ctx.run.maxpool_backward(dx, dy, self.idx[:n], self.size, self.stride, stream=self.ctx.stream)
        return dx, True


class Dropout:
    """Inverted dropout in training, the identity otherwise (no copy)."""

    def __init__(self, step, ctx, index):
        s = step.spec
        self.ctx, self.step, self.spec, self.index, self.p = ctx, step, s, index, s["p"]
        shape = (ctx.batch, *step.out_shape)
        self.out = ctx.arena.alloc(shape, ctx.dtype, f"{s.name}.out")
        self.mask = ctx.arena.alloc(shape, np.uint8, f"{s.name}.mask")
        self.per_example = prod(step.out_shape)
        self.active = False

    def check(self, backend):
        checks.dropout_forward(self.out, self.mask, self.out, self.p, 0, backend=backend)
        checks.dropout_backward(self.out, self.out, self.mask, self.p, backend=backend)

    def forward(self, x, n, run):
        self.active = run.train and self.p > 0
        if not self.active:
            return x
        y = self.out[:n]
        self.ctx.run.dropout_forward(y, self.mask[:n], x, self.p, layer_seed(run.seed, self.index),
                                     run.batch_offset * self.per_example, stream=self.ctx.stream)
        return y

    def backward(self, dy, free, n, need_dx):
        if not need_dx:
            return None, False
        if not self.active:
            return dy, False
        dx = view(free, n, self.step.in_shape)
        self.ctx.run.dropout_backward(dx, dy, self.mask[:n], self.p, stream=self.ctx.stream)
        return dx, True


EXECUTORS = {"conv": Conv, "fc": Linear, "lrn": LRN, "maxpool": MaxPool}


def make_executor(step, ctx, index):
    if step.spec.type == "dropout":
        return Dropout(step, ctx, index)
    return EXECUTORS[step.spec.type](step, ctx)


class LayerStage:
    """One layer step: an executor per tower, run tower by tower."""

    def __init__(self, step, ctxs, index):
        self.step = step
        self.ctxs = ctxs
        self.executors = [make_executor(step, ctx, index) for ctx in ctxs]
        self.has_params = step.spec.type in ("conv", "fc")

    def check(self, backend):
        for ex in self.executors:
            ex.check(backend)

    def forward(self, xs, n, run):
        ys = []
        for ctx, ex, x in zip(self.ctxs, self.executors, xs):
            with ctx.place.activate():
                ys.append(ex.forward(x, n, run))
        return ys

    def backward(self, dys, frees, n, need_dx, on_weights=None):
        """``on_weights(layer_name, tower)`` (conv and fc layers only) is called on each tower
        right after its backward-weights launch, before its backward-data: data parallelism
        starts that layer's gradient allreduce there (:meth:`nbalex.model.Net.forward_backward`)."""
        dxs, wrote = [], False
        for t, (ctx, ex, dy, free) in enumerate(zip(self.ctxs, self.executors, dys, frees)):
            with ctx.place.activate():
                if on_weights is None:
                    dx, wrote = ex.backward(dy, free, n, need_dx)
                else:
                    hook = functools.partial(on_weights, self.step.spec.name, t)
                    dx, wrote = ex.backward(dy, free, n, need_dx, on_weights=hook)
            dxs.append(dx)
        return dxs, wrote
