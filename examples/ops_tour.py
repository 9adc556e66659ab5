"""A tour of nbalex.ops: every AlexNet op on three backends, compared with the NumPy oracle.

    python examples/ops_tour.py

For each op (convolution with groups, ReLU, LRN, max-pooling, fully connected, dropout,
softmax cross-entropy, the SGD update) at a small shape, it runs the ``reference`` (NumPy),
``cpu`` (Numba on the CPU) and ``cuda`` (Numba CUDA kernels) backends through the same
façade call, and prints the largest absolute difference of ``cpu`` and ``cuda`` from the
reference, forward and backward.  Then it checks one backward pass of the reference itself
by central finite differences, and says which file holds each op's kernels.

With no GPU the ``cuda`` backend runs under Numba's CUDA simulator (every thread is a Python
thread: correct, slow), switched on here before numba is imported.  The shapes are tiny for
that reason; the convolution and fully connected layers still launch whole 256-thread GEMM
blocks, and take most of the ~20 s the tour needs under the simulator.
"""

import importlib
import inspect
import os
import shutil
import sys
import time

# The simulator must be chosen before numba is first imported (nbalex.ops imports it).
if "NUMBA_ENABLE_CUDASIM" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)          # run from a checkout, installed or not

import numpy as np  # noqa: E402

from nbalex import ops  # noqa: E402

BACKENDS = ("cpu", "cuda")        # each compared with "reference"
TOLERANCE = 1e-4                  # float32 results of order 1-10, summed in another order
FD_TOLERANCE = 1e-6               # relative error of a correct float64 gradient: ~1e-10


def max_diff(a, b):
    """Largest |a - b| over one array or a tuple of arrays/floats (integer outputs such as
    pooling indices and dropout masks count too: any mismatch shows as >= 1)."""
    if isinstance(a, tuple):
        return max(max_diff(x, y) for x, y in zip(a, b))
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- the cases: one small shape per op ---------------------------------------------------
#
# Each case is (name, shape note, forward(backend) -> outputs, backward(backend) -> outputs).
# The backward calls of every backend get the same inputs (the reference forward's outputs),
# so that a backward difference is the backward kernel's alone.

def cases(rng):
    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    out = []

    # Convolution with 2 groups (AlexNet's two towers): 3x3, stride 1, pad 1.
    x, w, b = randn(1, 4, 5, 5), randn(4, 2, 3, 3), randn(4)
    dy = randn(1, 4, 5, 5)
    out.append(("conv2d", "x(1,4,5,5) w(4,2,3,3) g=2",
                lambda be: ops.conv2d_forward(x, w, b, stride=1, pad=1, groups=2, backend=be),
                lambda be: ops.conv2d_backward(dy, x, w, stride=1, pad=1, groups=2, backend=be)))

    xr, dyr = randn(2, 3, 5, 7), randn(2, 3, 5, 7)
    yr = ops.relu_forward(xr, backend="reference")
    out.append(("relu", "x(2,3,5,7)",
                lambda be: ops.relu_forward(xr, backend=be),
                lambda be: ops.relu_backward(dyr, yr, backend=be)))

    # LRN over 5 of 8 channels; inputs scaled up so that the denominator matters.
    xl, dyl = 20 * randn(2, 8, 3, 3), randn(2, 8, 3, 3)
    yl = ops.lrn_forward(xl, backend="reference")
    out.append(("lrn", "x(2,8,3,3) n=5",
                lambda be: ops.lrn_forward(xl, backend=be),
                lambda be: ops.lrn_backward(dyl, xl, yl, backend=be)))

    # Overlapping max-pooling, 3x3 windows, stride 2.
    xp = randn(2, 3, 7, 7)
    yp, idx = ops.maxpool_forward(xp, backend="reference")
    dyp = randn(*yp.shape)
    out.append(("maxpool", "x(2,3,7,7) 3/2",
                lambda be: ops.maxpool_forward(xp, backend=be),
                lambda be: ops.maxpool_backward(dyp, idx, xp.shape, backend=be)))

    xf, wf, bf, dyf = randn(3, 10), randn(5, 10), randn(5), randn(3, 5)
    out.append(("linear", "x(3,10) w(5,10)",
                lambda be: ops.linear_forward(xf, wf, bf, backend=be),
                lambda be: ops.linear_backward(dyf, xf, wf, backend=be)))

    # Dropout: the mask is a hash of (seed, index), so every backend draws the same one.
    xd, dyd = randn(4, 50), randn(4, 50)
    _, mask = ops.dropout_forward(xd, p=0.5, seed=7, backend="reference")
    out.append(("dropout", "x(4,50) p=0.5",
                lambda be: ops.dropout_forward(xd, p=0.5, seed=7, backend=be),
                lambda be: ops.dropout_backward(dyd, mask, p=0.5, backend=be)))

    logits, labels = 3 * randn(4, 10), np.array([0, 3, 9, 3], np.int32)
    _, probs = ops.softmax_xent_forward(logits, labels, backend="reference")
    out.append(("softmax_xent", "logits(4,10)",
                lambda be: ops.softmax_xent_forward(logits, labels, backend=be),
                lambda be: ops.softmax_xent_backward(probs, labels, backend=be)))

    # The SGD step updates w and v in place; "forward" compares both after one step.
    w0, g0, v0 = randn(5, 10), randn(5, 10), 0.1 * randn(5, 10)

    def sgd(be):
        w, v = w0.copy(), v0.copy()
        ops.sgd_update(w, g0, v, lr=0.1, momentum=0.9, weight_decay=5e-4, backend=be)
        return w, v
    out.append(("sgd_update", "w(5,10)", sgd, None))
    return out


def compare(rng):
    print(f"{'op':<13} {'shapes':<27} {'max |backend - reference|':>27}")
    print(f"{'':<13} {'':<27} {'cpu fwd':>9} {'cuda fwd':>9} {'cpu bwd':>9} {'cuda bwd':>9}  "
          f"{'cuda s':>6}")
    worst = 0.0
    for name, shapes, forward, backward in cases(rng):
        cells = []
        cuda_seconds = 0.0
        for step in (forward, backward):
            if step is None:
                cells += ["-", "-"]
                continue
            expected = step("reference")
            for be in BACKENDS:
                t = time.perf_counter()
                d = max_diff(step(be), expected)
                if be == "cuda":
                    cuda_seconds += time.perf_counter() - t
                worst = max(worst, d)
                cells.append(f"{d:.1e}")
        print(f"{name:<13} {shapes:<27} " + " ".join(f"{c:>9}" for c in cells)
              + f"  {cuda_seconds:>6.1f}", flush=True)
    print(f"largest difference: {worst:.1e} (float32 arithmetic in a different order; "
          f"pooling indices and dropout masks must match exactly)")
    return worst


# --- checking the oracle itself: central finite differences -----------------------------
#
# The reference is what the kernels are tested against, so it is checked from first
# principles: for L = sum(dy * conv(x, w)), dL/dw[i] ~ (L(w + eps e_i) - L(w - eps e_i)) / 2eps.
# In float64 the truncation error is O(eps^2) and the rounding error O(1e-16 / eps), so
# eps = 1e-6 gives about 1e-10 relative error when the backward pass is right.

def finite_differences(rng):
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    conv = dict(stride=2, pad=1, groups=2, backend="reference")
    dy = rng.standard_normal(ops.conv2d_forward(x, w, b, **conv).shape)
    _, dw, _ = ops.conv2d_backward(dy, x, w, **conv)

    eps = 1e-6
    numeric = np.empty_like(w)
    for i in np.ndindex(w.shape):
        saved = w[i]
        w[i] = saved + eps
        up = np.sum(dy * ops.conv2d_forward(x, w, b, **conv))
        w[i] = saved - eps
        down = np.sum(dy * ops.conv2d_forward(x, w, b, **conv))
        w[i] = saved
        numeric[i] = (up - down) / (2 * eps)
    rel = np.max(np.abs(numeric - dw)) / max(np.max(np.abs(dw)), 1e-30)
    print(f"finite differences, reference conv2d dw (float64, x(2,4,6,6) w(6,2,3,3), stride 2, "
          f"pad 1, groups 2, eps {eps:g}, {w.size} entries): relative error {rel:.1e}")
    return rel


# --- where to read each op ------------------------------------------------------------

OPS = {  # op -> (its forward launcher, the module of nbalex.cuda that holds its kernels)
    "conv2d": ("conv2d_forward", "conv2d"), "relu": ("relu_forward", "relu"),
    "lrn": ("lrn_forward", "lrn"), "maxpool": ("maxpool_forward", "maxpool"),
    "linear": ("linear_forward", "linear"), "dropout": ("dropout_forward", "dropout"),
    "softmax_xent": ("softmax_xent_forward", "softmax_xent"), "sgd_update": ("sgd_update", "sgd"),
}


def source_path(backend, launcher):
    """The file, relative to the repository, that defines ``launcher`` in ``backend``."""
    fn = inspect.unwrap(getattr(importlib.import_module(f"nbalex.{backend}"), launcher))
    return os.path.relpath(inspect.getsourcefile(fn), REPO)


def where_to_read():
    print("where each op lives (reference = the NumPy oracle; the cuda file lists its kernels "
          "first, then the launchers):")
    for op, (launcher, module) in OPS.items():
        kernels = importlib.import_module(f"nbalex.cuda.{module}").STATIC_SIGNATURES
        names = [getattr(k[0], "py_func", k[0]).__name__ for k in kernels]
        print(f"  {op:<13} cuda {source_path('cuda', launcher):<28} "
              f"reference {source_path('reference', launcher):<33} "
              f"cpu {source_path('cpu', launcher)}")
        print(f"  {'':<13} kernels: {', '.join(names)}")
    print("  conv2d and linear are implicit GEMMs on one tiled core: nbalex/cuda/gemm.py "
          "(operand loaders for convolution: nbalex/cuda/conv2d_loaders.py)")


def main():
    if SIMULATOR:
        where = "Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): correct, slow"
    else:
        from numba import cuda
        name = cuda.get_current_device().name
        where = f"GPU {name.decode() if isinstance(name, bytes) else name}"
    print(f"cuda backend: {where}\n")
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    worst = compare(rng)
    print()
    rel = finite_differences(rng)
    print()
    where_to_read()
    ok = worst < TOLERANCE and rel < FD_TOLERANCE
    verdict = "OK" if ok else "FAILED"
    print(f"\n{verdict}: backends agree within {TOLERANCE:g}, finite differences within "
          f"{FD_TOLERANCE:g}; tour done in {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
