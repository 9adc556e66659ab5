"""The GPU leg's shapes of the layer labs (relu, dropout, maxpool, lrn, softmax_xent, sgd) at
AlexNet's sizes times ``sc.scale``; see :mod:`nbalex.labs.alexnet_shapes`.  Each plan takes a
:class:`~nbalex.labs.alexnet_shapes.Scaled` and AlexNet's layers by name, and returns
[Planned]; inputs that must be consistent (relu's y, maxpool's argmax, lrn's y and scale,
softmax's probabilities, dropout's mask) come from the NumPy reference.
"""

import math

import numpy as np

from nbalex import reference as ref
from nbalex.labs.alexnet_shapes import Shape, entry, normal, rng_for, same, zeros
from nbalex.labs.cases import Case
from nbalex.reference.dropout import keep_mask


def relu_plan(sc, net):
    shape = (sc.batch, *(sc.n(d) for d in net["conv1"].out_shape))
    tail = f"conv1's output {shape}"

    def forward():
        rng = rng_for("relu_forward")
        call = lambda f, a: f(a["y"], a["x"])     # noqa: E731
        case = Case("relu_forward", f"relu_forward {tail}", call,
                    {"x": normal(rng, shape)}, {"y": zeros(shape)})
        return Shape(case, "conv1", same("relu_forward", call), {})

    def backward():
        rng = rng_for("relu_backward")
        call = lambda f, a: f(a["dx"], a["dy"], a["y"])     # noqa: E731
        case = Case("relu_backward", f"relu_backward {tail}", call,
                    {"dy": normal(rng, shape), "y": np.maximum(normal(rng, shape), 0)},
                    {"dx": zeros(shape)})
        return Shape(case, "conv1", same("relu_backward", call), {})
    return [entry("relu_forward", f"relu_forward {tail}", forward),
            entry("relu_backward", f"relu_backward {tail}", backward)]


def dropout_plan(sc, net):
    shape, p = (sc.batch, sc.n(net["drop6"].out_shape[0])), net["drop6"]["p"]
    tail = f"drop6 x{shape} p={p}"

    def forward():
        call = lambda f, a: f(a["y"], a["mask"], a["x"], p, 2012, 0)     # noqa: E731
        case = Case("dropout_forward", f"dropout_forward {tail}", call,
                    {"x": normal(rng_for(tail), shape)},
                    {"y": zeros(shape), "mask": zeros(shape, np.uint8)})
        return Shape(case, "drop6", same("dropout_forward", call), {"p": p})

    def backward():
        rng = rng_for("dropout_backward")
        mask = keep_mask(shape, p, 7, 0)
        call = lambda f, a: f(a["dx"], a["dy"], a["mask"], p)     # noqa: E731
        case = Case("dropout_backward", f"dropout_backward {tail}", call,
                    {"dy": normal(rng, shape), "mask": mask}, {"dx": zeros(shape)})
        return Shape(case, "drop6", same("dropout_backward", call), {"p": p})
    return [entry("dropout_forward", f"dropout_forward {tail}", forward),
            entry("dropout_backward", f"dropout_backward {tail}", backward)]


def maxpool_plan(sc, net):
    out = []
    for name in ("pool1", "pool2", "pool5"):
        spec = net[name]
        size, stride = spec["size"], spec["stride"]
        c, h, w = spec.in_shape
        xs = (sc.batch, sc.n(c), sc.n(h, low=size), sc.n(w, low=size))
        ys = (*xs[:2], (xs[2] - size) // stride + 1, (xs[3] - size) // stride + 1)
        tail = f"{name} x{xs} size={size} stride={stride}"
        params = {"size": size, "stride": stride}

        def forward(xs=xs, ys=ys, tail=tail, params=params, name=name):
            call = lambda f, a, s=params["size"], t=params["stride"]: f(    # noqa: E731
                a["y"], a["idx"], a["x"], s, t)
            case = Case("maxpool_forward", f"maxpool_forward {tail}", call,
                        {"x": normal(rng_for(tail), xs)},
                        {"y": zeros(ys), "idx": zeros(ys, np.int32)})
            return Shape(case, name, same("maxpool_forward", call), params)

        def backward(xs=xs, ys=ys, tail=tail, params=params, name=name):
            rng = rng_for("backward " + tail)
            idx = np.empty(ys, np.int32)
            ref.maxpool_forward(np.empty(ys, np.float32), idx, normal(rng, xs),
                                params["size"], params["stride"])
            call = lambda f, a, s=params["size"], t=params["stride"]: f(    # noqa: E731
                a["dx"], a["dy"], a["idx"], s, t)
            case = Case("maxpool_backward", f"maxpool_backward {tail}", call,
                        {"dy": normal(rng, ys), "idx": idx}, {"dx": zeros(xs)},
                        tol={"dx": (1e-6, 1e-6)})
            return Shape(case, name, same("maxpool_backward", call), params)
        out += [entry("maxpool_forward", f"maxpool_forward {tail}", forward),
                entry("maxpool_backward", f"maxpool_backward {tail}", backward)]
    return out


def lrn_plan(sc, net):
    out = []
    for name in ("norm1", "norm2"):
        spec = net[name]
        g = spec["groups"]
        c, h, w = spec.in_shape
        shape = (sc.batch * g, sc.n(c // g), sc.n(h), sc.n(w))
        p = {k: spec[k] for k in ("size", "alpha", "beta", "k")}
        args = (p["size"], p["alpha"], p["beta"], p["k"])
        tail = (f"{name} x{shape} ({sc.batch} images x {g} groups) size={p['size']} "
                f"alpha={p['alpha']:g} beta={p['beta']:g} k={p['k']:g}")

        def forward(shape=shape, tail=tail, args=args, p=p, name=name):
            call = lambda f, a: f(a["y"], a["scale"], a["x"], *args)     # noqa: E731
            tol = (1e-5, 1e-6)
            case = Case("lrn_forward", f"lrn_forward {tail}", call,
                        {"x": normal(rng_for(tail), shape, 3.0)},
                        {"y": zeros(shape), "scale": zeros(shape)},
                        tol={"y": tol, "scale": tol})
            return Shape(case, name, same("lrn_forward", call), p)

        def backward(shape=shape, tail=tail, args=args, p=p, name=name):
            rng = rng_for("backward " + tail)
            x = normal(rng, shape, 3.0)
            y, scale = np.empty_like(x), np.empty_like(x)
            ref.lrn_forward(y, scale, x, *args)
            call = lambda f, a: f(a["dx"], a["dy"], a["x"], a["y"], a["scale"], *args)  # noqa
            case = Case("lrn_backward", f"lrn_backward {tail}", call,
                        {"dy": normal(rng, shape), "x": x, "y": y, "scale": scale},
                        {"dx": zeros(shape)}, tol={"dx": (1e-4, 1e-5)})
            return Shape(case, name, same("lrn_backward", call), p)
        out += [entry("lrn_forward", f"lrn_forward {tail}", forward),
                entry("lrn_backward", f"lrn_backward {tail}", backward)]
    return out


def softmax_xent_plan(sc, net):
    classes = sc.n(net["fc8"].out_shape[0])
    n = sc.batch
    tail = f"fc8's logits ({n}, {classes})"

    def inputs(seed):
        rng = rng_for(seed)
        return normal(rng, (n, classes), 3.0), rng.integers(0, classes, n).astype(np.int32)

    def forward():
        logits, labels = inputs("forward")
        call = lambda f, a: f(a["losses"], a["probs"], a["logits"], a["labels"])   # noqa
        tol = (1e-5, 1e-6)
        case = Case("softmax_xent_forward", f"softmax_xent_forward {tail}", call,
                    {"logits": logits, "labels": labels},
                    {"losses": zeros(n), "probs": zeros((n, classes))},
                    tol={"losses": tol, "probs": tol})
        return Shape(case, "fc8", same("softmax_xent_forward", call), {})

    def backward():
        logits, labels = inputs("backward")
        probs = np.empty_like(logits)
        ref.softmax_xent_forward(np.empty(n, np.float32), probs, logits, labels)
        call = lambda f, a: f(a["dlogits"], a["probs"], a["labels"])    # noqa: E731
        case = Case("softmax_xent_backward", f"softmax_xent_backward {tail}", call,
                    {"probs": probs, "labels": labels}, {"dlogits": zeros((n, classes))},
                    tol={"dlogits": (1e-6, 1e-7)})
        return Shape(case, "fc8", same("softmax_xent_backward", call), {})
    return [entry("softmax_xent_forward", f"softmax_xent_forward {tail}", forward),
            entry("softmax_xent_backward", f"softmax_xent_backward {tail}", backward)]


def sgd_plan(sc, net):
    specs = [p for layer in net.values() for p in layer.params]
    sizes = [math.prod((sc.n(p.shape[0]), *(sc.n(d) for d in p.shape[1:2]), *p.shape[2:]))
             for p in specs]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    label = f"sgd_update AlexNet's {total:,} parameters in {len(specs)} tensors"
    hyper = (0.01, 0.9, 5e-4)

    def build():
        rng = rng_for(label)
        tables = {"offsets": offsets,
                  "lr_mults": np.array([p.lr_mult for p in specs], np.float32),
                  "decay_mults": np.array([p.decay_mult for p in specs], np.float32)}
        w, dw, v = (normal(rng, total, sd) for sd in (0.01, 1e-3, 1e-3))

        def call(f, a):
            f(a["w"], a["dw"], a["v"], *hyper, a["offsets"], a["lr_mults"], a["decay_mults"])
        tol = (1e-6, 1e-6)
        case = Case("sgd_update", label, call, {"dw": dw, **tables}, {},
                    inout={"w": w, "v": v}, expected_inout={"w": w, "v": v},  # placeholders
                    tol={"w": tol, "v": tol})
        return Shape(case, "all", same("sgd_update", call),
                     {"hyper": hyper, **{k: arr.tolist() for k, arr in tables.items()}})
    return [entry("sgd_update", label, build)]


PLANS = {"relu": relu_plan, "dropout": dropout_plan, "maxpool": maxpool_plan,
         "lrn": lrn_plan, "softmax_xent": softmax_xent_plan, "sgd": sgd_plan}
