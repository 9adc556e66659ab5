"""The network across towers: its plan of steps, and the exchange of activations between towers.

The network is a list of *steps* (:func:`plan_steps`): a :class:`LayerStep` is one layer,
run by one executor per tower (:mod:`nbalex.layers`); a :class:`GatherStep` is a
:class:`Gather`, which trades activation blocks between towers.

With T towers, an activation is either *split* (each tower holds 1/T of its channels or
features, the tower's block) or *full* (every tower holds all of it).  Conv layers with
``groups`` a multiple of T, pooling and grouped LRN work on split activations tower by
tower; conv layers with groups = 1 and fc layers read the full input and compute their
tower's block of the outputs; dropout works on full activations (its mask is indexed by the
element's place in the full tensor, and, with ``Pass.batch_offset`` (:mod:`nbalex.layers`),
in the global batch of which this process holds a slice).  A :class:`Gather` before a layer
that needs a full input turns split into full.  In the backward pass, gradients of full
activations are *partial* (each tower holds the part that flowed through its own block of
the next layer), so the gather's backward sums the towers' parts of each block (a
reduce-scatter) -- except after the logits, whose gradient every tower computes whole.
"""

from dataclasses import dataclass

from nbalex.config import ConfigError


def prod(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def view(flat, n, shape):
    """The first n examples of a flat buffer, shaped (n, *shape)."""
    return flat[:n * prod(shape)].reshape((n, *shape))


def split(shape, towers):
    """A split activation's per-tower shape: the first axis (channels / features) divided."""
    return (shape[0] // towers, *shape[1:])


@dataclass
class LayerStep:
    spec: object          # config.LayerSpec
    in_shape: tuple       # per-example shape this tower reads
    out_shape: tuple      # per-example shape this tower writes
    groups: int = 1       # conv / lrn groups within one tower
    split_out: bool = False


@dataclass
class GatherStep:
    shape: tuple          # per-example shape of the full activation
    replicated: bool = False   # backward: every tower already holds the whole gradient


def plan_steps(specs, towers):
    """The steps of the network on ``towers`` towers (see the module docstring)."""
    steps, is_split = [], False
    shape = specs[0].in_shape

    def gather(replicated=False):
        steps.append(GatherStep(shape, replicated))

    for spec in specs:
        kind = spec.type
        where = f"layer {spec.name!r}"
        if towers == 1:
            steps.append(LayerStep(spec, spec.in_shape, spec.out_shape, spec.fields.get("groups", 1)))
            shape = spec.out_shape
            continue
        if kind in ("conv", "fc"):
            if spec.out_shape[0] % towers:
                raise ConfigError(f"{where}: {spec.out_shape[0]} outputs (field 'filters'/'outputs') "
                                  f"do not split over {towers} towers")
            groups = spec.fields.get("groups", 1)
            if groups == 1:
                if is_split:
                    gather()
                local = LayerStep(spec, spec.in_shape, split(spec.out_shape, towers), 1, True)
            elif groups % towers == 0 and is_split:
                local = LayerStep(spec, split(spec.in_shape, towers), split(spec.out_shape, towers),
                                  groups // towers, True)
            else:
                raise ConfigError(f"{where}: field 'groups' ({groups}) cannot be split over {towers} towers "
                                 "(use groups = 1, or a multiple of the towers after a split layer)")
            is_split = True
        elif kind == "lrn":
            groups = spec["groups"]
            if is_split and groups % towers:
                gather()
                is_split = False
            if is_split:
                local = LayerStep(spec, split(shape, towers), split(shape, towers), groups // towers, True)
            else:
                local = LayerStep(spec, shape, shape, groups)
        elif kind == "maxpool":
            if is_split:
                local = LayerStep(spec, split(shape, towers), split(spec.out_shape, towers), 1, True)
            else:
                local = LayerStep(spec, shape, spec.out_shape)
        elif kind == "dropout":
            if is_split:
                gather()
                is_split = False
            local = LayerStep(spec, shape, shape)
        else:
            raise ValueError(f"{where}: unknown layer type {kind!r}")
        steps.append(local)
        shape = spec.out_shape
    if is_split:
        gather(replicated=True)
    return steps


class Gather:
    """Split -> full across towers: each tower gets every tower's block (see module docstring).

    Forward: tower t writes its own block into its full buffer, pulls each other tower's
    block into ``recv`` and copies it into place.  Backward: tower t's gradient block is its
    own part plus every other tower's part of block t (a reduce-scatter through ``send`` and
    ``recv``); when ``replicated``, just its own part.
    """

    def __init__(self, step, ctxs, recv, send):
        self.ctxs, self.recv, self.send, self.replicated = ctxs, recv, send, step.replicated
        self.has_params = False
        self.towers = len(ctxs)
        self.row = prod(step.shape)                 # elements per example, full
        self.block = self.row // self.towers        # elements per example, one tower's block
        self.split_shape = split(step.shape, self.towers)
        self.full = [c.arena.alloc((c.batch, *step.shape), c.dtype, "gather.full") for c in ctxs]

    def check(self, backend):
        """Nothing to check: a gather only copies between buffers it sized itself."""

    def forward(self, xs, n, run):
        row, block = self.row, self.block
        fulls = [f[:n] for f in self.full]
        for t, ctx in enumerate(self.ctxs):
            with ctx.place.activate():
                ctx.place.copy_rows(fulls[t].reshape(n * row), row, t * block,
                                    xs[t].reshape(n * block), block, 0, n, block)
        for t, ctx in enumerate(self.ctxs):
            with ctx.place.activate():
                recv = self.recv[t][:n * block]
                for s, source in enumerate(self.ctxs):
                    if s != t:
                        ctx.place.pull(recv, xs[s].reshape(n * block), source.place)
                        ctx.place.copy_rows(fulls[t].reshape(n * row), row, s * block, recv, block, 0, n, block)
        return fulls

    def backward(self, dys, frees, n, need_dx):
        row, block = self.row, self.block
        dxs = [view(free, n, self.split_shape) for free in frees]
        for t, ctx in enumerate(self.ctxs):
            with ctx.place.activate():
                ctx.place.copy_rows(dxs[t].reshape(n * block), block, 0, dys[t].reshape(n * row), row,
                                    t * block, n, block)
        if self.replicated:
            return dxs, True
        for t, ctx in enumerate(self.ctxs):
            for s, source in enumerate(self.ctxs):
                if s == t:
                    continue
                send, recv = self.send[s][:n * block], self.recv[t][:n * block]
                with source.place.activate():
                    source.place.copy_rows(send, block, 0, dys[s].reshape(n * row), row, t * block, n, block)
                with ctx.place.activate():
                    ctx.place.pull(recv, send, source.place)
                    ctx.place.accumulate(dxs[t].reshape(n * block), recv)
        return dxs, True
