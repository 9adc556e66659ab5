"""The GPU leg's shapes of the GEMM ladder (fc6 and fc7 forward, conv3 forward as a GEMM) and
of the convolution labs (conv1 ... conv5 with their stride, padding and groups) at AlexNet's
sizes times ``sc.scale``; see :mod:`nbalex.labs.alexnet_shapes`.  The GEMM rungs are compared
with the package's ``nbalex.cuda.linear.linear_forward`` (c = a @ b as x @ w.T with w = b.T
made beforehand, bias 0), the conv labs with ``nbalex.cuda.conv2d``; the package's split-K
workspace is made once, outside the timed calls.
"""

import math

import numpy as np

from nbalex.labs.alexnet_shapes import Shape, entry, normal, rng_for, same, workspace, zeros
from nbalex.labs.cases import Case
from nbalex.labs.conv_cases import _label as conv_label
from nbalex.labs.conv_cases import _out_shape, _tol


def sgemm_plan(sc, net):
    fc6, c3 = net["fc6"], net["conv3"]
    k6, m6 = fc6.params[0].shape[1], fc6.params[0].shape[0]
    m7 = net["fc7"].params[0].shape[0]
    f3, c, kh, kw = c3.params[0].shape
    pixels = sc.n(c3.out_shape[1]) * sc.n(c3.out_shape[2])
    gemms = [("fc6", "fc6 forward", sc.batch, sc.n(k6), sc.n(m6)),
             ("fc7", "fc7 forward", sc.batch, sc.n(m6), sc.n(m7)),
             ("conv3", "conv3 forward as a GEMM (filters x taps @ taps x pixels)",
              sc.n(f3), sc.n(c) * kh * kw, sc.batch * pixels)]
    out = []
    for layer, what, m, k, n in gemms:
        label = f"sgemm {what} M={m} K={k} N={n}"

        def build(layer=layer, label=label, m=m, k=k, n=n):
            rng = rng_for(label)
            a, b = normal(rng, (m, k)), normal(rng, (k, n))
            call = lambda f, arr: f(arr["c"], arr["a"], arr["b"])    # noqa: E731
            case = Case("sgemm", label, call, {"a": a, "b": b}, {"c": zeros((m, n))},
                        tol={"c": (1e-4, 1e-5 * k)})

            def package(module, arr):      # y (M,N) = x (M,K) @ w (N,K).T + 0
                ws = workspace(arr, module.linear_workspace_size(arr["a"].shape,
                                                                 arr["bt"].shape))
                module.linear_forward(arr["c"], arr["a"], arr["bt"], arr["zero"], workspace=ws)
            return Shape(case, layer, package, {},
                         extra={"bt": np.ascontiguousarray(b.T), "zero": zeros(n)})
        out.append(entry("sgemm", label, build))
    return out


def conv_plan(pass_name):
    """The plan of conv2d_<pass_name> over conv1 ... conv5."""
    launcher = f"conv2d_{pass_name}"

    def plan_fn(sc, net):
        out = []
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            spec = net[name]
            g, s, p, relu = spec["groups"], spec["stride"], spec["pad"], spec["relu"]
            f, cg, kh, kw = spec.params[0].shape
            c, h, w = spec.in_shape
            xs = (sc.batch, sc.n(c, multiple=g), sc.n(h, low=max(kh - 2 * p, 1)),
                  sc.n(w, low=max(kw - 2 * p, 1)))
            ws = (sc.n(f, multiple=g), xs[1] // g, kh, kw)
            extra = " relu" if relu and pass_name == "forward" else ""
            label = f"{conv_label(launcher, xs, ws, s, p, g, extra)} ({name})"
            params = {"stride": s, "pad": p, "groups": g, "relu": relu}
            out.append(entry(launcher, label,
                              lambda n=name, label=label, xs=xs, ws=ws, pr=params:
                              _conv_shape(pass_name, n, label, xs, ws, pr)))
        return out
    return plan_fn


def _conv_shape(pass_name, layer, label, xs, ws, pr):
    rng = rng_for(label)
    s, p, g, relu = pr["stride"], pr["pad"], pr["groups"], pr["relu"]
    ys = _out_shape(xs, ws, s, p)
    if pass_name == "forward":
        call = lambda f, a: f(a["y"], a["x"], a["w"], a["b"], s, p, g, relu=relu)  # noqa
        case = Case("conv2d_forward", label, call,
                    {"x": normal(rng, xs), "w": normal(rng, ws), "b": normal(rng, ws[0])},
                    {"y": zeros(ys)}, tol={"y": _tol(math.prod(ws[1:]))})
    elif pass_name == "backward_data":
        call = lambda f, a: f(a["dx"], a["dy"], a["w"], s, p, g)    # noqa: E731
        case = Case("conv2d_backward_data", label, call,
                    {"dy": normal(rng, ys), "w": normal(rng, ws)}, {"dx": zeros(xs)},
                    tol={"dx": _tol(ws[0] // g * ws[2] * ws[3])})
    else:
        call = lambda f, a: f(a["dw"], a["db"], a["dy"], a["x"], s, p, g)    # noqa: E731
        k = ys[0] * ys[2] * ys[3]
        case = Case("conv2d_backward_weights", label, call,
                    {"dy": normal(rng, ys), "x": normal(rng, xs)},
                    {"dw": zeros(ws), "db": zeros(ws[0])}, tol={"dw": _tol(k), "db": _tol(k)})

        def package(module, a):
            space = workspace(a, module.conv2d_workspace_size(xs, ws, s, p, g))
            module.conv2d_backward_weights(a["dw"], a["db"], a["dy"], a["x"], s, p, g,
                                           workspace=space)
        return Shape(case, layer, package, pr)
    return Shape(case, layer, same(case.launcher, call), pr)


PLANS = {"gemm_naive": sgemm_plan, "gemm_tiled": sgemm_plan, "gemm_register": sgemm_plan,
         "conv2d_forward": conv_plan("forward"),
         "conv2d_backward_data": conv_plan("backward_data"),
         "conv2d_backward_weights": conv_plan("backward_weights")}
