"""The network: a config's layers over a backend, on one or more towers, memory allocated once.

::

    net = Net("alexnet-mini", backend="cpu", batch_size=32)
    loss = net.forward_backward(x, labels, train=True, seed=step)   # fills the gradients
    loss = net.forward_backward(x, labels, seed=step, batch_offset=r * len(x))  # rank r's slice
    net.sgd_step(lr=0.01)                                           # the paper's update rule
    logits = net.forward(x)                                         # (B, classes), NumPy

Parameters, gradients and momentum are each one flat buffer per tower with one layout,
carved into named views (``conv1.weight`` ... ``fc8.bias``, PyTorch's names); the SGD step
is one ``sgd_update`` launch over them with per-tensor multipliers.  Activations, saved
state, gradient buffers and workspaces come from one arena per tower, sized once for
``batch_size`` (:mod:`nbalex.buffers` lays them out, :mod:`nbalex.memory` has the arenas).
Memory is kept small: ReLU is fused into the conv/fc layers and applied in place in the
backward pass, max-pooling keeps only its argmax indices, the gradients of activations live
in two ping-pong buffers, and no gradient is computed for the input image.
:mod:`nbalex.towers` explains how layers split over towers.

Arguments are checked once, when the network is built: every launch of the plan goes through
:mod:`nbalex.checks` with the arena's buffers (and stand-ins for the views a step takes of
them), and each step then calls the launchers' unchecked fast path.  Per step only what the
caller passes in is checked (input shape, labels, ``batch_offset``, the SGD scalars).
``forward`` (inference) saves nothing for backward (no max-pool argmax, no LRN scale).
"""

import numpy as np

from nbalex import checks
from nbalex.backends import get_backend, resolve
from nbalex.buffers import ParamLayout, arena_bytes, build, make_places
from nbalex.config import ConfigError, load_config
from nbalex.layers import Pass
from nbalex.memory import SizingArena
from nbalex.towers import plan_steps, view

__all__ = ["Net", "describe", "initial_params", "ConfigError"]


def _c_contiguous(x):
    return bool(x.flags["C_CONTIGUOUS"])   # NumPy and numba device arrays both have .flags


def initial_params(specs, seed=0, dtype=np.float32):
    """The paper's initialisation, seeded: {name: array}, weights N(0, std), biases constant."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in specs:
        for p in layer.params:
            if p.init_std > 0:
                w = rng.standard_normal(p.shape, dtype=np.float32)
                w *= np.float32(p.init_std)
                out[p.name] = w.astype(dtype, copy=False)
            else:
                out[p.name] = np.full(p.shape, p.init_value, dtype=dtype)
    return out


class Net:
    """AlexNet-style network from a config name, a TOML path or TOML text (see module docstring).

    ``gpus`` lists the towers' GPUs (cuda); two towers split every layer as the paper did
    (see :mod:`nbalex.towers`).  Host backends accept several towers too, emulated in host
    memory.  ``dtype=np.float64`` works with the reference backend (for gradient checks).
    """

    def __init__(self, config, backend="auto", batch_size=128, gpus=(0,), seed=0, dtype=np.float32):
        self.config, self.config_text, self.layers = load_config(config)
        self.name = self.config["name"]
        self.image_size = self.config["image_size"]
        self.input_size = self.config["input_size"]
        self.input_shape = self.layers[0].in_shape
        self.num_classes = self.layers[-1].out_shape[0]
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backend_name = resolve(backend)
        self.backend = get_backend(self.backend_name)
        self.dtype = np.dtype(dtype)
        if self.dtype != np.float32 and not (self.backend_name == "reference" and self.dtype == np.float64):
            raise ValueError(f"dtype {self.dtype} needs the reference backend (float64); others are float32")
        self.gpus = tuple(gpus)
        if not self.gpus:
            raise ValueError("gpus must name at least one device")
        self._places, self.transfers = make_places(self.backend_name, self.gpus)
        self.towers = self._places if self.backend_name == "cuda" else []
        towers = len(self._places)
        self.steps = plan_steps(self.layers, towers)
        self.layout = ParamLayout(self.layers, towers)

        sizers = [SizingArena() for _ in self._places]
        build(self.layers, self.steps, self.layout, self.backend, self._places, sizers,
               self.batch_size, self.dtype, towers)
        self.arenas = [p.create_arena(s.used) for p, s in zip(self._places, sizers)]
        self.arena = self.arenas[0]
        self._ctxs, self._stages, self._buffers = build(
            self.layers, self.steps, self.layout, self.backend, self._places, self.arenas,
            self.batch_size, self.dtype, towers)
        self._first_param_stage = next(i for i, s in enumerate(self._stages) if s.has_params)
        self._logits_host = self._places[0].host_buffer((self.batch_size, self.num_classes), self.dtype)
        self._losses_host = self._places[0].host_buffer((self.batch_size,), self.dtype)

        specs = self.layout.specs
        tables = {"offsets": np.array(self.layout.offsets, dtype=np.int64),
                  "lr_mults": np.array([p.lr_mult for p in specs], dtype=np.float32),
                  "decay_mults": np.array([p.decay_mult for p in specs], dtype=np.float32)}
        zeros = np.zeros(self.layout.size, dtype=self.dtype)   # lazily zeroed pages: cheap unless copied
        for place, b in zip(self._places, self._buffers):
            with place.activate():
                for key, table in tables.items():
                    place.to_device(b[key], table)
                b["nonfinite_host"] = place.host_buffer((1,), np.int32)   # sgd_step reads it
                place.to_device(b["nonfinite"], np.zeros(1, np.int32))
                if not place.arena.zeroed:
                    place.to_device(b["grads"], zeros)
                    place.to_device(b["momentum"], zeros)
        self._check_plan()
        self.load_params(initial_params(self.layers, seed, self.dtype))

    def _check_plan(self):
        """Every launch a step makes, checked once (nbalex.checks) on this tower's buffers."""
        name = self.backend_name
        for stage in self._stages:
            stage.check(name)
        for b in self._buffers:
            probs, labels = b["probs"], checks.like(b["labels"].shape, np.int32)
            checks.softmax_xent_forward(b["losses"], probs, probs, labels, backend=name)
            checks.softmax_xent_backward(probs, probs, labels, backend=name)
            checks.sgd_update(b["params"], b["grads"], b["momentum"], 0.0, 0.0, 0.0, b["offsets"],
                              b["lr_mults"], b["decay_mults"], b["nonfinite"], backend=name)

    # ---- parameters -------------------------------------------------------------------------

    def param_names(self):
        return [p.name for p in self.layout.specs]

    def _gather(self, key):
        self._synchronize()
        out = {}
        for name in self.param_names():
            blocks = []
            for place, ctx, b in zip(self._places, self._ctxs, self._buffers):
                src = {"params": ctx.params, "grads": ctx.grads, "momentum": b["momentum_views"]}[key][name]
                host = np.empty(src.shape, dtype=self.dtype)
                with place.activate():
                    place.to_host(host, src)
                blocks.append(host)
            self._synchronize()
            out[name] = np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
        return out

    def _scatter(self, key, arrays, what):
        expected = {p.name: p.shape for p in self.layout.specs}
        missing = [n for n in expected if n not in arrays]
        extra = [n for n in arrays if n not in expected]
        if missing or extra:
            detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
            raise ValueError(f"{what} do not fit model {self.name!r}: {detail} "
                             f"({len(missing)} missing, {len(extra)} unexpected)")
        for name, shape in expected.items():
            got = tuple(np.shape(arrays[name]))
            if got != tuple(shape):
                raise ValueError(f"{what} do not fit model {self.name!r}: {name} has shape {got}, "
                                 f"the model expects {tuple(shape)}")
        towers = len(self._places)
        for t, (place, ctx, b) in enumerate(zip(self._places, self._ctxs, self._buffers)):
            dst = {"params": ctx.params, "momentum": b["momentum_views"]}[key]
            with place.activate():
                for name in expected:
                    a = np.asarray(arrays[name])
                    rows = a.shape[0] // towers
                    place.to_device(dst[name], np.ascontiguousarray(a[t * rows:(t + 1) * rows], dtype=self.dtype))
        self._synchronize()

    def params(self):
        """{name: copy of the parameter} (towers' blocks concatenated)."""
        return self._gather("params")

    def grads(self):
        """{name: copy of the gradient from the last forward_backward}."""
        return self._gather("grads")

    def momentum(self):
        return self._gather("momentum")

    def load_params(self, arrays):
        """Set every parameter from {name: array}; a name or shape that does not fit raises ValueError."""
        self._scatter("params", arrays, "parameters")

    def load_momentum(self, arrays):
        self._scatter("momentum", arrays, "momentum")

    def num_params(self):
        return sum(p.size for p in self.layout.specs)

    # ---- forward, backward, update ------------------------------------------------------------

    def _synchronize(self):
        for place in self._places:
            with place.activate():
                place.synchronize()

    def _inputs(self, x):
        n = int(x.shape[0])
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"batch of {n} examples; this network was sized for 1..{self.batch_size}")
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"input has shape {tuple(x.shape)}, expected (N, {', '.join(map(str, self.input_shape))})")
        xs = []
        for t, (place, b) in enumerate(zip(self._places, self._buffers)):
            with place.activate():
                if t > 0:                       # other towers copy tower 0's input, device to device
                    place.pull(b["input"][:n], xs[0], self._places[0])
                    xs.append(b["input"][:n])
                elif place.is_local(x) and np.dtype(x.dtype) == self.dtype and _c_contiguous(x):
                    xs.append(x)                # already where the kernels can read it: no copy
                else:
                    place.to_device(b["input"][:n], x)
                    xs.append(b["input"][:n])
        return n, xs

    def _forward(self, xs, n, run):
        for stage in self._stages:
            xs = stage.forward(xs, n, run)
        return xs

    @staticmethod
    def _pass(train, seed, batch_offset, keep):
        return Pass(bool(train), checks.integer("Net", "seed", seed),
                    checks.integer("Net", "batch_offset", batch_offset, lowest=0), keep)

    def forward(self, x, train=False, seed=0, batch_offset=0):
        """Logits (N, classes) as a NumPy array; ``train`` switches dropout on (mask from ``seed``,
        ``batch_offset`` as in :meth:`forward_backward`).  Nothing is saved for backward."""
        n, xs = self._inputs(x)
        logits = self._forward(xs, n, self._pass(train, seed, batch_offset, keep=False))
        place = self._places[0]
        with place.activate():
            place.to_host(self._logits_host[:n], logits[0])
        self._synchronize()
        return np.array(self._logits_host[:n])

    def forward_backward(self, x, labels, train=True, seed=0, batch_offset=0, grad_sync=None):
        """Mean softmax cross-entropy of the batch; fills the gradients (overwriting them).

        ``batch_offset`` is the index of x[0] in the global batch when x is one slice of it
        (data parallelism): dropout then draws, for each example, the mask the whole batch
        would give it in one process (a layer's element offset is batch_offset times its
        elements per example).

        ``grad_sync`` (data parallelism, :class:`nbalex.distributed.sync.GradSync`): its
        ``ready(layer_name, tower)`` is called right after each conv/fc layer's
        backward-weights on each tower (that layer's gradients are final: its allreduce
        starts while the earlier layers' backward runs) and ``progress()`` after every
        backward stage.  The caller waits for the reduction before :meth:`sgd_step`."""
        run = self._pass(train, seed, batch_offset, keep=True)
        n, xs = self._inputs(x)
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels have shape {labels.shape}, expected ({n},)")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        logits = self._forward(xs, n, run)
        grads = []
        for t, (place, ctx, b) in enumerate(zip(self._places, self._ctxs, self._buffers)):
            with place.activate():
                if isinstance(b["labels"], np.ndarray):
                    y = np.ascontiguousarray(labels, dtype=np.int32)
                else:
                    y = b["labels"][:n]
                    place.to_device(y, labels.astype(np.int32, copy=False))
                losses, probs = b["losses"][:n], b["probs"][:n]
                ctx.run.softmax_xent_forward(losses, probs, logits[t], y, stream=ctx.stream)
                dlogits = view(b["grad_bufs"][0], n, (self.num_classes,))
                ctx.run.softmax_xent_backward(dlogits, probs, y, stream=ctx.stream)
                if t == 0:
                    place.to_host(self._losses_host[:n], losses)
                grads.append(dlogits)
        current = 0
        for i in range(len(self._stages) - 1, self._first_param_stage - 1, -1):
            frees = [b["grad_bufs"][1 - current] for b in self._buffers]
            stage, need_dx = self._stages[i], i > self._first_param_stage
            if grad_sync is not None and stage.has_params:
                grads, wrote = stage.backward(grads, frees, n, need_dx, on_weights=grad_sync.ready)
            else:
                grads, wrote = stage.backward(grads, frees, n, need_dx)
            if grad_sync is not None:
                grad_sync.progress()
            current = 1 - current if wrote else current
        self._synchronize()
        return float(np.mean(self._losses_host[:n], dtype=np.float64))

    def sgd_step(self, lr, momentum=0.9, weight_decay=5e-4):
        """v <- momentum*v - lr*lr_mult*(weight_decay*decay_mult*w + g); w <- w + v: one launch per tower.

        Returns True when every parameter is finite after the update, False otherwise: the
        kernel sets each tower's ``nonfinite`` flag, read back with one 4-byte copy per tower
        (a wait for the step on cuda).  The flag is zeroed at build and again after a False.
        """
        checks.sgd_scalars(lr, momentum, weight_decay, op="sgd_step")
        for place, ctx, b in zip(self._places, self._ctxs, self._buffers):
            with place.activate():
                ctx.run.sgd_update(b["params"], b["grads"], b["momentum"], lr, momentum, weight_decay,
                                   b["offsets"], b["lr_mults"], b["decay_mults"], b["nonfinite"],
                                   stream=ctx.stream)
                place.to_host(b["nonfinite_host"], b["nonfinite"])
        finite = True
        for place, b in zip(self._places, self._buffers):
            with place.activate():
                place.synchronize()
                if b["nonfinite_host"][0] != 0:
                    finite = False
                    place.to_device(b["nonfinite"], np.zeros(1, np.int32))
        return finite

    def synchronize(self):
        """Wait until every tower's queued work is done."""
        self._synchronize()

    def __repr__(self):
        return (f"Net({self.name!r}, backend={self.backend_name!r}, batch_size={self.batch_size}, "
                f"towers={len(self._places)}, params={self.num_params():,})")


def describe(config, batch_size=None, backend="cuda"):
    """The layer table and totals of a config: what ``nbalex info`` prints.

    Returns {name, image_size, input_size, input_shape, num_classes, params, macs, layers:
    [{name, type, output_shape, params, macs}]} (macs per image); with ``batch_size`` also
    ``arena_bytes`` (one tower's arena for a training step at that batch on ``backend``,
    parameters, gradients and momentum included) and ``param_bytes`` (those three buffers).
    """
    cfg, _, specs = load_config(config)
    rows = [{"name": s.name, "type": s.type, "output_shape": list(s.out_shape),
             "params": sum(p.size for p in s.params), "macs": s.macs} for s in specs]
    out = {"name": cfg["name"], "image_size": cfg["image_size"], "input_size": cfg["input_size"],
           "input_shape": list(specs[0].in_shape), "num_classes": specs[-1].out_shape[0],
           "params": sum(r["params"] for r in rows), "macs": sum(r["macs"] for r in rows),
           "layers": rows}
    if batch_size is not None:
        out["batch_size"] = int(batch_size)
        out["arena_bytes"], out["param_bytes"] = arena_bytes(specs, int(batch_size), backend)
    return out
