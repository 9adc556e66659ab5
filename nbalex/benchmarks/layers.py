"""AlexNet's layers as benchmark cases: shapes, inputs, and each pass's launcher call.

A :class:`LayerSpec` holds one layer's per-example shapes; :func:`passes` lists what can be
timed for it (forward, backward-data, backward-weights; ``update`` for SGD), each a
:class:`Pass` that names the arrays it reads and writes and calls one launcher of any
backend (the launcher contract is the same everywhere, see :mod:`nbalex.backends`).
Backward passes read the forward pass's outputs (the LRN's ``scale``, the pool's argmax),
so the passes of a layer always run in the listed order on one dict of arrays.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .peers import (DROPOUT_P, LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, POOL_SIZE, POOL_STRIDE,
                    SGD_DECAY, SGD_LR, SGD_MOMENTUM)

DROPOUT_SEED = 1234
FLOAT = np.float32


@dataclass(frozen=True)
class LayerSpec:
    """One layer at one example: (C,H,W) or (K,) shapes and the conv's geometry."""
    name: str
    kind: str                 # conv, fc, lrn, pool, relu, dropout, softmax-xent, sgd
    in_shape: tuple
    out_shape: tuple
    kernel: int = 0
    stride: int = 1
    pad: int = 0
    groups: int = 1
    params: int = 0           # sgd: parameters updated

    def describe(self):
        """Short text for tables, e.g. '96x27x27->256x27x27 k5 s1 p2 g2'."""
        if self.kind == "sgd":
            return f"{self.params:,} params"
        shape = "x".join(map(str, self.in_shape)) + "->" + "x".join(map(str, self.out_shape))
        if self.kind == "conv":
            shape += f" k{self.kernel} s{self.stride} p{self.pad} g{self.groups}"
        return shape


def _conv(name, c, h, f, oh, k, s, p, g):
    return LayerSpec(name, "conv", (c, h, h), (f, oh, oh), k, s, p, g)


ALEXNET_CONV_FC = [
    _conv("conv1", 3, 227, 96, 55, 11, 4, 0, 1),
    _conv("conv2", 96, 27, 256, 27, 5, 1, 2, 2),
    _conv("conv3", 256, 13, 384, 13, 3, 1, 1, 1),
    _conv("conv4", 384, 13, 384, 13, 3, 1, 1, 2),
    _conv("conv5", 384, 13, 256, 13, 3, 1, 1, 2),
    LayerSpec("fc6", "fc", (9216,), (4096,)),
    LayerSpec("fc7", "fc", (4096,), (4096,)),
    LayerSpec("fc8", "fc", (4096,), (1000,)),
]


def parameter_count(specs):
    """Weights plus biases of the conv and fc layers in ``specs``."""
    total = 0
    for s in specs:
        if s.kind == "conv":
            total += s.out_shape[0] * (s.in_shape[0] // s.groups * s.kernel * s.kernel + 1)
        elif s.kind == "fc":
            total += s.out_shape[0] * (s.in_shape[0] + 1)
    return total


ALEXNET_LAYERS = ALEXNET_CONV_FC[:5] + [
    LayerSpec("norm1", "lrn", (96, 55, 55), (96, 55, 55)),
    LayerSpec("norm2", "lrn", (256, 27, 27), (256, 27, 27)),
    LayerSpec("pool1", "pool", (96, 55, 55), (96, 27, 27)),
    LayerSpec("pool2", "pool", (256, 27, 27), (256, 13, 13)),
    LayerSpec("pool5", "pool", (256, 13, 13), (256, 6, 6)),
] + ALEXNET_CONV_FC[5:] + [
    LayerSpec("relu", "relu", (96, 55, 55), (96, 55, 55)),        # after conv1, the largest
    LayerSpec("dropout", "dropout", (4096,), (4096,)),           # after fc6
    LayerSpec("softmax-xent", "softmax-xent", (1000,), (1000,)),
    LayerSpec("sgd", "sgd", (), (), params=parameter_count(ALEXNET_CONV_FC)),
]
"""Every layer ``nbalex bench kernels`` times, in table order (the paper's shapes)."""


@dataclass
class Pass:
    """One timed launcher call: what it reads, what it writes, how to call it."""
    name: str
    reads: tuple
    writes: dict                                  # name -> (shape, dtype) at a batch
    launch: Callable                              # launch(backend, arrays, workspace)
    flops: Optional[int] = None                   # multiply-adds x 2, conv and fc only
    in_place: tuple = ()                          # read and written (sgd's w and v)

    def min_bytes(self, arrays_shapes):
        """Each input read once plus each output written once, in bytes."""
        total = 0
        for name in self.reads:
            shape, dtype = arrays_shapes[name]
            total += int(np.prod(shape)) * np.dtype(dtype).itemsize
        for name in self.in_place:                # read once and written once
            shape, dtype = arrays_shapes[name]
            total += 2 * int(np.prod(shape)) * np.dtype(dtype).itemsize
        for shape, dtype in self.writes.values():
            total += int(np.prod(shape)) * np.dtype(dtype).itemsize
        return total


def make_inputs(spec, n, rng):
    """The random inputs of every pass of ``spec`` at batch ``n`` (host, C-contiguous)."""
    def normal(*shape, scale=1.0):
        a = rng.standard_normal(shape, dtype=FLOAT)
        if scale != 1.0:
            a *= FLOAT(scale)
        return a

    if spec.kind == "conv":
        c, f, k, g = spec.in_shape[0], spec.out_shape[0], spec.kernel, spec.groups
        fan_in = c // g * k * k
        return {"x": normal(n, *spec.in_shape), "w": normal(f, c // g, k, k, scale=fan_in ** -0.5),
                "b": normal(f), "dy": normal(n, *spec.out_shape)}
    if spec.kind == "fc":
        k, m = spec.in_shape[0], spec.out_shape[0]
        return {"x": normal(n, k), "w": normal(m, k, scale=k ** -0.5), "b": normal(m),
                "dy": normal(n, m)}
    if spec.kind == "softmax-xent":
        classes = spec.in_shape[0]
        return {"logits": normal(n, classes, scale=3.0),
                "labels": rng.integers(0, classes, n).astype(np.int32)}
    if spec.kind == "sgd":
        p = spec.params
        return {"w": normal(p, scale=0.01), "dw": normal(p, scale=0.01), "v": normal(p, scale=0.001)}
    return {"x": normal(n, *spec.in_shape), "dy": normal(n, *spec.out_shape)}


def passes(spec, n):
    """The passes of layer ``spec`` at batch ``n``, in the order they must run."""
    kind, s, p, g = spec.kind, spec.stride, spec.pad, spec.groups
    x_shape, y_shape = (n, *spec.in_shape), (n, *spec.out_shape)
    f32 = FLOAT
    if kind == "conv":
        c, f, k = spec.in_shape[0], spec.out_shape[0], spec.kernel
        flops = 2 * n * f * spec.out_shape[1] * spec.out_shape[2] * (c // g) * k * k
        return [
            Pass("forward", ("x", "w", "b"), {"y": (y_shape, f32)},
                 lambda m, a, ws: m.conv2d_forward(a["y"], a["x"], a["w"], a["b"], s, p, g, workspace=ws),
                 flops),
            Pass("backward-data", ("dy", "w"), {"dx": (x_shape, f32)},
                 lambda m, a, ws: m.conv2d_backward_data(a["dx"], a["dy"], a["w"], s, p, g, workspace=ws),
                 flops),
            Pass("backward-weights", ("dy", "x"), {"dw": ((f, c // g, k, k), f32), "db": ((f,), f32)},
                 lambda m, a, ws: m.conv2d_backward_weights(a["dw"], a["db"], a["dy"], a["x"], s, p, g,
                                                            workspace=ws),
                 flops),
        ]
    if kind == "fc":
        k, m_ = spec.in_shape[0], spec.out_shape[0]
        flops = 2 * n * m_ * k
        return [
            Pass("forward", ("x", "w", "b"), {"y": (y_shape, f32)},
                 lambda m, a, ws: m.linear_forward(a["y"], a["x"], a["w"], a["b"], workspace=ws), flops),
            Pass("backward-data", ("dy", "w"), {"dx": (x_shape, f32)},
                 lambda m, a, ws: m.linear_backward_data(a["dx"], a["dy"], a["w"], workspace=ws), flops),
            Pass("backward-weights", ("dy", "x"), {"dw": ((m_, k), f32), "db": ((m_,), f32)},
                 lambda m, a, ws: m.linear_backward_weights(a["dw"], a["db"], a["dy"], a["x"]), flops),
        ]
    if kind == "relu":
        return [
            Pass("forward", ("x",), {"y": (y_shape, f32)}, lambda m, a, ws: m.relu_forward(a["y"], a["x"])),
            Pass("backward-data", ("dy", "y"), {"dx": (x_shape, f32)},
                 lambda m, a, ws: m.relu_backward(a["dx"], a["dy"], a["y"])),
        ]
    if kind == "lrn":
        lrn = (LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
        return [
            Pass("forward", ("x",), {"y": (y_shape, f32), "scale": (x_shape, f32)},
                 lambda m, a, ws: m.lrn_forward(a["y"], a["scale"], a["x"], *lrn)),
            Pass("backward-data", ("dy", "x", "y", "scale"), {"dx": (x_shape, f32)},
                 lambda m, a, ws: m.lrn_backward(a["dx"], a["dy"], a["x"], a["y"], a["scale"], *lrn)),
        ]
    if kind == "pool":
        return [
            Pass("forward", ("x",), {"y": (y_shape, f32), "idx": (y_shape, np.int32)},
                 lambda m, a, ws: m.maxpool_forward(a["y"], a["idx"], a["x"], POOL_SIZE, POOL_STRIDE)),
            Pass("backward-data", ("dy", "idx"), {"dx": (x_shape, f32)},
                 lambda m, a, ws: m.maxpool_backward(a["dx"], a["dy"], a["idx"], POOL_SIZE, POOL_STRIDE)),
        ]
    if kind == "dropout":
        return [
            Pass("forward", ("x",), {"y": (y_shape, f32), "mask": (x_shape, np.uint8)},
                 lambda m, a, ws: m.dropout_forward(a["y"], a["mask"], a["x"], DROPOUT_P, DROPOUT_SEED)),
            Pass("backward-data", ("dy", "mask"), {"dx": (x_shape, f32)},
                 lambda m, a, ws: m.dropout_backward(a["dx"], a["dy"], a["mask"], DROPOUT_P)),
        ]
    if kind == "softmax-xent":
        return [
            Pass("forward", ("logits", "labels"), {"losses": ((n,), f32), "probs": (x_shape, f32)},
                 lambda m, a, ws: m.softmax_xent_forward(a["losses"], a["probs"], a["logits"], a["labels"])),
            Pass("backward-data", ("probs", "labels"), {"dlogits": (x_shape, f32)},
                 lambda m, a, ws: m.softmax_xent_backward(a["dlogits"], a["probs"], a["labels"])),
        ]
    if kind == "sgd":
        return [
            Pass("update", ("dw",), {},
                 lambda m, a, ws: m.sgd_update(a["w"], a["dw"], a["v"], SGD_LR, SGD_MOMENTUM, SGD_DECAY),
                 in_place=("w", "v")),
        ]
    raise ValueError(f"unknown layer kind {kind!r}")


def workspace_size(backend, spec, n):
    """float32 elements of workspace ``backend`` wants for ``spec`` at batch ``n`` (else 0)."""
    if spec.kind == "fc":
        return int(backend.linear_workspace_size((n, *spec.in_shape), (spec.out_shape[0], spec.in_shape[0])))
    if spec.kind != "conv":
        return 0
    c, k = spec.in_shape[0], spec.kernel
    w_shape = (spec.out_shape[0], c // spec.groups, k, k)
    return int(backend.conv2d_workspace_size((n, *spec.in_shape), w_shape, spec.stride, spec.pad,
                                             spec.groups))


def array_shapes(spec, n, inputs):
    """{name: (shape, dtype)} of every array the passes of ``spec`` touch at batch ``n``."""
    shapes = {name: (a.shape, a.dtype) for name, a in inputs.items()}
    for pa in passes(spec, n):
        shapes.update(pa.writes)
    return shapes
