"""The grader's test cases: small, awkward shapes per launcher, expected values from the
NumPy reference (``nbalex.reference``).

A :class:`Case` is one launcher call.  ``inputs`` are read-only arrays, ``outputs`` the
arrays the launcher must write (the grader fills them with a canary first, so an element
never written shows), ``inout`` arrays updated in place (they start from given values).
``call(launcher, arrays)`` makes the call with the arrays the grader prepared (device
arrays on the cuda backend, NumPy elsewhere) and ``expected`` holds what the reference
computed for every output and inout array.  Shapes are chosen to expose the usual bugs:
sizes of 1, sizes just past a block or a tile, odd sizes, windows that overlap or clip.
"""

import dataclasses

import numpy as np

from nbalex import reference as ref

EXACT = (0.0, 0.0)


@dataclasses.dataclass
class Case:
    """One launcher call to grade."""
    launcher: str                    # the student's function to call
    label: str                       # what it is, for the report: "relu_forward x(3, 5, 7)"
    call: object                     # call(launcher, arrays) -> None
    inputs: dict                     # name -> np.ndarray, read only
    outputs: dict                    # name -> np.ndarray of the expected values (canary first)
    inout: dict = dataclasses.field(default_factory=dict)   # name -> initial np.ndarray
    expected_inout: dict = dataclasses.field(default_factory=dict)
    tol: dict = dataclasses.field(default_factory=dict)      # name -> (rtol, atol)
    special: object = None           # special(name, got, expected, wrong) -> hint or None

    def tolerance(self, name):
        return self.tol.get(name, EXACT)

    def expected(self):
        return {**self.outputs, **self.expected_inout}


def _rng(seed):
    return np.random.default_rng(seed)


def _normal(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _shape(a):
    return str(tuple(a.shape))


# ------------------------------------------------------------------------------- relu
def relu_cases():
    rng, out = _rng(1), []
    for shape in [(1,), (3, 5, 7), (2, 300)]:
        x = _normal(rng, shape)
        y = np.empty_like(x)
        ref.relu_forward(y, x)
        out.append(Case("relu_forward", f"relu_forward x{shape}",
                        lambda f, a: f(a["y"], a["x"]), {"x": x}, {"y": y}))
        dy = _normal(rng, shape)
        dx = np.empty_like(x)
        ref.relu_backward(dx, dy, y)
        out.append(Case("relu_backward", f"relu_backward dy{shape}",
                        lambda f, a: f(a["dx"], a["dy"], a["y"]), {"dy": dy, "y": y},
                        {"dx": dx}))
    return out


# ---------------------------------------------------------------------------- dropout
def dropout_cases():
    rng, out = _rng(2), []
    for shape, p, seed, offset in [((7,), 0.5, 0, 0), ((3, 5, 11), 0.5, 3, 0),
                                   ((2, 300), 0.3, 12345, 1000)]:
        x = _normal(rng, shape)
        y, mask = np.empty_like(x), np.empty(shape, np.uint8)
        ref.dropout_forward(y, mask, x, p, seed, offset)
        out.append(Case("dropout_forward",
                        f"dropout_forward x{shape} p={p} seed={seed} offset={offset}",
                        lambda f, a, p=p, s=seed, o=offset: f(a["y"], a["mask"], a["x"], p, s, o),
                        {"x": x}, {"y": y, "mask": mask}))
        dy = _normal(rng, shape)
        dx = np.empty_like(x)
        ref.dropout_backward(dx, dy, mask, p)
        out.append(Case("dropout_backward", f"dropout_backward dy{shape} p={p}",
                        lambda f, a, p=p: f(a["dx"], a["dy"], a["mask"], p),
                        {"dy": dy, "mask": mask}, {"dx": dx}))
    return out


# ---------------------------------------------------------------------------- maxpool
def _tie_hint(x):
    """The maxpool idx hint: every wrong argmax points at an element equal to the right one."""
    planes = x.reshape(x.shape[0] * x.shape[1], -1)

    def special(name, got, expected, wrong):
        if name != "idx":
            return None
        p = np.nonzero(wrong.reshape(planes.shape[0], -1))[0]
        g, e = got[wrong].astype(np.int64), expected[wrong].astype(np.int64)
        if np.all((g >= 0) & (g < planes.shape[1])) and np.all(planes[p, g] == planes[p, e]):
            later = "later" if np.all(g > e) else "different"
            return (f"a tie went to a {later} element of the window: ties go to the first in "
                    "row-major window order (replace the best only when strictly greater)")
        return None
    return special


def maxpool_cases():
    rng, out = _rng(3), []
    for shape, size, stride in [((1, 1, 5, 5), 3, 2), ((2, 3, 7, 9), 3, 2),
                                ((1, 2, 6, 6), 2, 2), ((1, 1, 4, 7), 3, 1)]:
        x = np.round(_normal(rng, shape) * 2) / 2          # half-integers: ties happen
        n, c, h, w = shape
        oshape = (n, c, (h - size) // stride + 1, (w - size) // stride + 1)
        y, idx = np.empty(oshape, np.float32), np.empty(oshape, np.int32)
        ref.maxpool_forward(y, idx, x, size, stride)
        geo = f"x{shape} size={size} stride={stride}"
        out.append(Case("maxpool_forward", f"maxpool_forward {geo}",
                        lambda f, a, s=size, t=stride: f(a["y"], a["idx"], a["x"], s, t),
                        {"x": x}, {"y": y, "idx": idx}, special=_tie_hint(x)))
        dy = _normal(rng, oshape)
        dx = np.empty_like(x)
        ref.maxpool_backward(dx, dy, idx, size, stride)
        out.append(Case("maxpool_backward", f"maxpool_backward {geo}",
                        lambda f, a, s=size, t=stride: f(a["dx"], a["dy"], a["idx"], s, t),
                        {"dy": dy, "idx": idx}, {"dx": dx}, tol={"dx": (1e-6, 1e-6)}))
    return out


# -------------------------------------------------------------------------------- lrn
def _window_hint(x, size, alpha, k):
    """The LRN hint: scale matches a window one channel too short or long at an end."""
    x2 = x.astype(np.float64) ** 2
    channels, half = x.shape[1], size // 2

    def scale_for(lo, hi):
        out = np.empty_like(x2)
        for c in range(channels):
            window = x2[:, max(c - lo, 0):min(c + hi + 1, channels)]
            out[:, c] = k + alpha * window.sum(axis=1)
        return out

    def special(name, got, expected, wrong):
        if name != "scale":
            return None
        for lo, hi in [(half, half - 1), (half, half + 1), (half - 1, half), (half + 1, half)]:
            if lo >= 0 and hi >= 0 and np.allclose(got, scale_for(lo, hi), rtol=1e-5, atol=1e-6):
                return (f"scale sums the window [c-{lo}, c+{hi}], not [c-{half}, c+{half}]: the "
                        f"channel {'entering' if hi != half else 'leaving'} the running window "
                        "is off by one")
        return None
    return special


def lrn_cases():
    rng, out = _rng(4), []
    for shape, size, alpha, beta, k in [((2, 7, 3, 2), 5, 1e-2, 0.75, 2.0),
                                        ((1, 3, 4, 4), 5, 0.1, 0.75, 1.0),
                                        ((1, 8, 5), 3, 0.05, 0.5, 2.0),
                                        ((1, 6, 2, 2), 5, 1e-4, 0.75, 2.0)]:
        x = _normal(rng, shape, 3.0)
        y64, s64 = np.empty(shape), np.empty(shape)
        ref.lrn_forward(y64, s64, x.astype(np.float64), size, alpha, beta, k)
        geo = f"x{shape} size={size} alpha={alpha} beta={beta} k={k}"
        tol = (1e-5, 1e-6)
        out.append(Case("lrn_forward", f"lrn_forward {geo}",
                        lambda f, a, p=(size, alpha, beta, k): f(a["y"], a["scale"], a["x"], *p),
                        {"x": x}, {"y": y64.astype(np.float32), "scale": s64.astype(np.float32)},
                        tol={"y": tol, "scale": tol}, special=_window_hint(x, size, alpha, k)))
        dy = _normal(rng, shape)
        dx64 = np.empty(shape)
        y, scale = y64.astype(np.float32), s64.astype(np.float32)
        ref.lrn_backward(dx64, dy.astype(np.float64), x.astype(np.float64), y.astype(np.float64),
                         scale.astype(np.float64), size, alpha, beta, k)
        out.append(Case("lrn_backward", f"lrn_backward {geo}",
                        lambda f, a, p=(size, alpha, beta, k):
                        f(a["dx"], a["dy"], a["x"], a["y"], a["scale"], *p),
                        {"dy": dy, "x": x, "y": y, "scale": scale},
                        {"dx": dx64.astype(np.float32)}, tol={"dx": (1e-4, 1e-5)}))
    return out


# ----------------------------------------------------------------------- softmax_xent
def _row_sum_hint(name, got, expected, wrong):
    """The softmax hint: a row whose probabilities do not sum to 1 lost part of a reduction."""
    if name != "probs" or not np.all(np.isfinite(got)):
        return None
    sums = got.astype(np.float64).sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1) > 1e-4)
    if bad.size:
        return (f"the probabilities of row {int(bad[0])} sum to {sums[bad[0]]:.6g}, not 1: the "
                "block's reduction (the max, the sum of exponentials) left out some threads' "
                "partial results (the tree's widths, its barriers, the merge)")
    return None


def softmax_xent_cases():
    rng, out = _rng(5), []
    for n, k, shift in [(1, 1, 0.0), (3, 10, 0.0), (2, 300, 50.0), (4, 129, -20.0)]:
        logits = _normal(rng, (n, k), 3.0) + np.float32(shift)
        labels = rng.integers(0, k, n).astype(np.int32)
        losses, probs = np.empty(n), np.empty((n, k))
        ref.softmax_xent_forward(losses, probs, logits.astype(np.float64), labels)
        tol = (1e-5, 1e-6)
        out.append(Case("softmax_xent_forward", f"softmax_xent_forward logits({n}, {k})"
                        + (f" shifted by {shift:g}" if shift else ""),
                        lambda f, a: f(a["losses"], a["probs"], a["logits"], a["labels"]),
                        {"logits": logits, "labels": labels},
                        {"losses": losses.astype(np.float32), "probs": probs.astype(np.float32)},
                        tol={"losses": tol, "probs": tol}, special=_row_sum_hint))
        p32 = probs.astype(np.float32)
        dl = np.empty((n, k))
        ref.softmax_xent_backward(dl, p32.astype(np.float64), labels)
        out.append(Case("softmax_xent_backward", f"softmax_xent_backward probs({n}, {k})",
                        lambda f, a: f(a["dlogits"], a["probs"], a["labels"]),
                        {"probs": p32, "labels": labels}, {"dlogits": dl.astype(np.float32)},
                        tol={"dlogits": (1e-6, 1e-7)}))
    return out


# -------------------------------------------------------------------------------- sgd
def _boundary_hint(offsets):
    """The sgd hint: every wrong element is the first or last of a tensor."""
    if offsets is None:
        return None
    edges = set(offsets[1:-1]) | {o - 1 for o in offsets[1:-1]}

    def special(name, got, expected, wrong):
        at = set(int(i) for i in np.flatnonzero(wrong))
        if at and at <= edges:
            return (f"wrong only at tensor boundaries (elements {sorted(at)}): element i "
                    "belongs to tensor t when offsets[t] <= i < offsets[t+1], and a tensor "
                    "may be empty")
        return None
    return special


def sgd_cases():
    rng, out = _rng(6), []
    plans = [(777, None, None, None),
             (1000, [0, 10, 300, 301, 1000], [1.0, 2.0, 0.5, 1.0], [1.0, 0.0, 1.0, 3.0]),
             (5, [0, 0, 2, 5], [1.0, 2.0, 1.0], [1.0, 0.0, 2.0])]
    for size, offsets, lr_mults, decay_mults in plans:
        w, dw, v = (_normal(rng, (size,)) for _ in range(3))
        lr, momentum, decay = 0.1, 0.9, 0.05
        extra = {}
        if offsets is not None:
            extra = {"offsets": np.array(offsets, np.int64),
                     "lr_mults": np.array(lr_mults, np.float32),
                     "decay_mults": np.array(decay_mults, np.float32)}
        w1, v1 = w.copy(), v.copy()
        ref.sgd_update(w1, dw, v1, lr, momentum, decay, *(extra[n] for n in extra))
        tensors = "one tensor" if offsets is None else f"offsets {offsets}"

        def call(f, a, extra=tuple(extra), s=(lr, momentum, decay)):
            f(a["w"], a["dw"], a["v"], *s, *(a[n] for n in extra))
        tol = (1e-6, 1e-6)
        out.append(Case("sgd_update", f"sgd_update len {size}, {tensors}", call,
                        {"dw": dw, **extra}, {}, inout={"w": w, "v": v},
                        expected_inout={"w": w1, "v": v1}, tol={"w": tol, "v": tol},
                        special=_boundary_hint(offsets)))
    # the divergence flag: an infinite gradient in the last element
    w, v = _normal(rng, (300,)), np.zeros(300, np.float32)
    dw = _normal(rng, (300,))
    dw[-1] = np.inf
    w1, v1, flag = w.copy(), v.copy(), np.zeros(1, np.int32)
    ref.sgd_update(w1, dw, v1, 0.1, 0.9, 0.0, nonfinite=flag)
    out.append(Case("sgd_update", "sgd_update len 300 with an infinite gradient (nonfinite flag)",
                    lambda f, a: f(a["w"], a["dw"], a["v"], 0.1, 0.9, 0.0,
                                   nonfinite=a["nonfinite"]),
                    {"dw": dw}, {}, inout={"w": w, "v": v, "nonfinite": np.zeros(1, np.int32)},
                    expected_inout={"w": w1, "v": v1, "nonfinite": flag},
                    tol={"w": (1e-6, 1e-6), "v": (1e-6, 1e-6)}))
    return out


# ------------------------------------------------------------------------------- gemm
def sgemm_cases():
    """c (M,N) = a (M,K) @ b (K,N), float32, overwritten."""
    rng, out = _rng(7), []
    for m, k, n in [(1, 1, 1), (5, 7, 3), (33, 17, 20), (16, 40, 16)]:
        a, b = _normal(rng, (m, k)), _normal(rng, (k, n))
        c = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
        out.append(Case("sgemm", f"sgemm M={m} K={k} N={n}", lambda f, arr: f(arr["c"], arr["a"], arr["b"]),
                        {"a": a, "b": b}, {"c": c}, tol={"c": (1e-4, 1e-5 * k)}))
    return out
