"""The convolution labs' cases: forward, backward-data and backward-weights at tiny, awkward
geometries (odd sizes, stride 2, padding, groups 2, 1x1), expected values from
``nbalex.reference.conv2d``, and the hints a wrong convolution's pattern of errors gives.

The simulator runs every GPU thread in Python, so the GEMMs stay tiny (N*F*OH*OW and the
K of each pass a few dozen): the package's tiled kernels take about a second a case there.
"""

import numpy as np

from nbalex import reference as ref
from nbalex.labs.cases import Case, _normal, _rng

GEOMETRIES = [
    # x shape, w shape, stride, pad, groups
    ((1, 3, 5, 5), (2, 3, 3, 3), 2, 1, 1),     # stride 2 and padding, odd sizes
    ((2, 4, 3, 5), (4, 2, 3, 3), 1, 1, 2),     # groups 2, two images, H != W
    ((1, 3, 3, 4), (5, 3, 1, 1), 1, 0, 1),     # 1x1, five filters
    ((1, 2, 6, 5), (2, 2, 2, 2), 2, 0, 1),     # stride 2 without padding: taps skip pixels
]


def _out_shape(x_shape, w_shape, stride, pad):
    n, _, h, w = x_shape
    f, _, kh, kw = w_shape
    return (n, f, (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1)


def _label(launcher, x_shape, w_shape, stride, pad, groups, extra=""):
    return (f"{launcher} x{x_shape} w{w_shape} stride={stride} pad={pad} groups={groups}"
            + extra)


def _tol(k):
    return (1e-4, 1e-5 * k)


def _matches(got, want, k):
    return got.shape == want.shape and np.allclose(got, want, *_tol(k))


def conv_hint(geometry, candidates, group_axis, border=None):
    """A ``special`` for conv outputs.  ``candidates()`` gives {array: [(what, values)]}: the
    output a known bug computes, tried first; then the pattern hints: right in group 0
    only (``group_axis`` of each array), wrong only where a window meets the padding
    (``border``: {array: mask of those elements})."""
    x_shape, w_shape, stride, pad, groups = geometry
    k = int(np.prod(w_shape[1:]))

    def special(name, got, expected, wrong):
        for what, values in candidates().get(name, ()):
            if _matches(got, values, k):
                return what
        axis = group_axis.get(name)
        if groups > 1 and axis is not None:
            per = got.shape[axis] // groups
            first = np.take(wrong, range(per), axis=axis)
            if not first.any():
                return (f"right in group 0, wrong in later groups: group g's filters are "
                        f"g*F/G ... (g+1)*F/G-1 and read input channels g*C/G ... "
                        f"(g+1)*C/G-1 (here {groups} groups)")
        mask = (border or {}).get(name)
        if mask is not None and mask.any() and not (wrong & ~mask).any():
            return ("wrong only where a window overlaps the padding: a position outside "
                    "[0, H) x [0, W) reads 0 (guard ih and iw on both sides: 0 <= ih < H)")
        return None
    return special


def _border(x_shape, w_shape, stride, pad, y_shape):
    """Mask (broadcast to y_shape) of output pixels whose window reaches into the padding."""
    _, _, h, w = x_shape
    _, _, kh, kw = w_shape
    oh = np.arange(y_shape[2]) * stride - pad
    ow = np.arange(y_shape[3]) * stride - pad
    rows = (oh < 0) | (oh + kh > h)
    cols = (ow < 0) | (ow + kw > w)
    return np.broadcast_to(rows[:, None] | cols[None, :], y_shape)


def _forward(x, w, b, stride, pad, groups, relu=False):
    y = np.empty(_out_shape(x.shape, w.shape, stride, pad), np.float32)
    ref.conv2d_forward(y, x, w, b, stride, pad, groups, relu=relu)
    return y


def _stride1(x, w, b, pad, groups, shape, relu=False):
    """What a kernel that forgot the stride computes: a stride-1 convolution, cropped."""
    y = _forward(x, w, b, 1, pad, groups, relu)
    return y[:, :, :shape[2], :shape[3]]


def conv2d_forward_cases():
    rng, out = _rng(8), []
    for n, (xs, ws, s, p, g) in enumerate(GEOMETRIES):
        relu = n == 2
        x, w, b = _normal(rng, xs), _normal(rng, ws), _normal(rng, (ws[0],))
        y = _forward(x, w, b, s, p, g, relu)

        def candidates(x=x, w=w, b=b, s=s, p=p, g=g, relu=relu, shape=y.shape):
            found = []
            if s > 1:
                found.append(("y is a stride-1 convolution: the window of output (oh, ow) "
                              "starts at (oh*stride - pad, ow*stride - pad)",
                              _stride1(x, w, b, p, g, shape, relu)))
            return {"y": found}
        geo = (xs, ws, s, p, g)
        out.append(Case("conv2d_forward", _label("conv2d_forward", *geo,
                                                 " relu" if relu else ""),
                        lambda f, a, s=s, p=p, g=g, r=relu:
                        f(a["y"], a["x"], a["w"], a["b"], s, p, g, relu=r),
                        {"x": x, "w": w, "b": b}, {"y": y}, tol={"y": _tol(w[0].size)},
                        special=conv_hint(geo, candidates, {"y": 1},
                                          {"y": _border(xs, ws, s, p, y.shape)})))
    return out


def conv2d_backward_data_cases():
    rng, out = _rng(9), []
    for xs, ws, s, p, g in GEOMETRIES:
        w = _normal(rng, ws)
        dy = _normal(rng, _out_shape(xs, ws, s, p))
        dx = np.empty(xs, np.float32)
        ref.conv2d_backward_data(dx, dy, w, s, p, g)
        k = ws[0] // g * ws[2] * ws[3]

        geo = (xs, ws, s, p, g)
        out.append(Case("conv2d_backward_data", _label("conv2d_backward_data", *geo),
                        lambda f, a, s=s, p=p, g=g: f(a["dx"], a["dy"], a["w"], s, p, g),
                        {"dy": dy, "w": w}, {"dx": dx}, tol={"dx": _tol(k)},
                        special=conv_hint(geo, dict, {"dx": 1})))
    return out


def conv2d_backward_weights_cases():
    rng, out = _rng(10), []
    for xs, ws, s, p, g in GEOMETRIES:
        x = _normal(rng, xs)
        dy = _normal(rng, _out_shape(xs, ws, s, p))
        dw, db = np.empty(ws, np.float32), np.empty(ws[0], np.float32)
        ref.conv2d_backward_weights(dw, db, dy, x, s, p, g)
        k = dy.shape[0] * dy.shape[2] * dy.shape[3]

        def candidates(x=x, dy=dy, s=s, p=p, g=g, ws=ws):
            if x.shape[0] == 1:
                return {}
            dw1, db1 = np.empty(ws, np.float32), np.empty(ws[0], np.float32)
            ref.conv2d_backward_weights(dw1, db1, dy[:1], x[:1], s, p, g)
            what = ("{} sums over the first image only: the reduction runs over every "
                    "(image, oh, ow), K = N*OH*OW")
            return {"dw": [(what.format("dw"), dw1)], "db": [(what.format("db"), db1)]}
        geo = (xs, ws, s, p, g)
        out.append(Case("conv2d_backward_weights", _label("conv2d_backward_weights", *geo),
                        lambda f, a, s=s, p=p, g=g: f(a["dw"], a["db"], a["dy"], a["x"], s, p, g),
                        {"dy": dy, "x": x}, {"dw": dw, "db": db},
                        tol={"dw": _tol(k), "db": _tol(k)},
                        special=conv_hint(geo, candidates, {"dw": 0, "db": 0})))
    return out
