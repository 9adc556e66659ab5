"""Elementwise CUDA kernels with more loads in flight per thread, beside the package's own.

What is compared: the package's ReLU forward/backward, dropout backward and single-tensor SGD
kernels (a grid-stride loop, one element per thread per iteration) against "unroll4"
variants, where each thread loads the elements at i, i+S, i+2S and i+3S (S = threads in the
grid) into registers before it stores any result.  Each kernel runs at two grids: "package"
(launch.grid_1d: one thread per element, capped at 4096 blocks; "quarter" for unroll4, one
thread per 4 elements) and "resident" (one wave: the blocks the GPU holds at once).

Why: by Little's law, bytes in flight = bandwidth x latency, ~3.35 TB/s x ~0.6 us = ~2 MB on
an H100, ~15 KB per SM.  2048 resident threads holding one 4-byte load each hold 8 KB, so one
load per thread per iteration reaches only ~50-60% of HBM bandwidth; four independent loads
per array per thread hold four times as much.  (The package loops are unrolled by LLVM too,
but each load waits for the previous store, which may alias it.)

How to read it: every row is first checked bit for bit against the package kernel at its
own grid on the same inputs (exact elementwise rules), and that kernel against the NumPy
reference; a row that differs is reported and not timed.  "ms" is the median of single
launches between CUDA events (time_numba_cuda, the project's rule: Python's launch overhead
included); "queued ms" is the per-launch time of launches queued behind a spin kernel (the
GPU's time alone).  GB/s counts each array read once and each output written once.
"vs package" = the package row's time / this row's (> 1: faster).  A variant worth
promoting wins in queued ms at conv1's size (148 MB per array) without losing at fc6's
(2 MB, launch-bound in "ms").

No float4-style variant: Numba has no 128-bit load from a float32 array (vector types do
not form arrays; even a complex128 element is loaded as two ld.global.f64), and the NVPTX
vectoriser merges adjacent loads only when it can prove 16-byte alignment, which Numba's
array model does not state.

Usage (from the repository root)::

    python bench/elementwise_variants.py [--json] [--repeats N] [--check-only]

``--check-only`` validates at tiny sizes with tiny grids and times nothing; under the CUDA
simulator (NUMBA_ENABLE_CUDASIM=1) that is all there is: asking for timings is refused.
"""

import argparse
import functools
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--check-only" in sys.argv[1:] and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")   # no GPU: validate under the simulator

import numpy as np  # noqa: E402
from numba import cuda, float32  # noqa: E402

import nbalex.reference as reference  # noqa: E402
from nbalex.benchmarks.common import (TimingRefused, cycling, format_table,  # noqa: E402
                                      median_seconds, rate, ratio, refuse_under_simulator,
                                      rotation_count, time_numba_cuda, to_json)
from nbalex.cuda import dropout, launch, relu, sgd  # noqa: E402


# --------------------------------------------------------------------------------- kernels
# The per-element rules are written exactly as in the package kernels, so the results are
# the same bits (including NaN handling and the FMA contraction of the SGD rule).

@cuda.jit(device=True, inline="always")
def relu_value(v):
    """max(v, 0), a NaN stays NaN: nbalex.cuda.relu's rule."""
    return float32(0.0) if v < 0 else v


@cuda.jit(device=True, inline="always")
def relu_grad(g, y):
    """g where the forward output y is positive, else g * 0 (NaN stays): the package's rule."""
    return g if y > 0 else g * float32(0.0)


@cuda.jit(device=True, inline="always")
def dropout_grad(g, m, keep):
    """g / keep where the mask byte m is nonzero, else g * 0 (the package's rule)."""
    return g / keep if m != 0 else g * float32(0.0)


@cuda.jit(device=True, inline="always")
def sgd_step(w, dw, v, lr, momentum, weight_decay):
    """(new w, new v) for one element: v = momentum*v - lr*(weight_decay*w + dw); w += v."""
    v = momentum * v - lr * (weight_decay * w + dw)
    return w + v, v


@cuda.jit
def relu_forward_unroll4(y, x):
    """y[i] = max(x[i], 0) for every i (a NaN stays NaN).

    x, y: 1-D float32 of the same length n; y is written and may be x.  With S threads in
    the grid, thread t loads x[i], x[i+S], x[i+2S], x[i+3S] (i starts at t) before storing
    any y, then steps i by 4S while i+3S < n; a tail loop steps by S over what is left.
    """
    n = x.shape[0]
    s = cuda.gridsize(1)
    i = cuda.grid(1)
    while i + 3 * s < n:
        a, b, c, d = x[i], x[i + s], x[i + 2 * s], x[i + 3 * s]
        y[i] = relu_value(a)
        y[i + s] = relu_value(b)
        y[i + 2 * s] = relu_value(c)
        y[i + 3 * s] = relu_value(d)
        i += 4 * s
    while i < n:
        y[i] = relu_value(x[i])
        i += s


@cuda.jit
def relu_backward_unroll4(dx, dy, y):
    """dx[i] = dy[i] if y[i] > 0 else 0 for every i.

    dx, dy, y: 1-D float32 of the same length n; dx is written and may be dy.  Indexing as
    in relu_forward_unroll4: each iteration loads 4 elements of dy and 4 of y (8 loads)
    before storing any dx.
    """
    n = y.shape[0]
    s = cuda.gridsize(1)
    i = cuda.grid(1)
    while i + 3 * s < n:
        g0, g1, g2, g3 = dy[i], dy[i + s], dy[i + 2 * s], dy[i + 3 * s]
        y0, y1, y2, y3 = y[i], y[i + s], y[i + 2 * s], y[i + 3 * s]
        dx[i] = relu_grad(g0, y0)
        dx[i + s] = relu_grad(g1, y1)
        dx[i + 2 * s] = relu_grad(g2, y2)
        dx[i + 3 * s] = relu_grad(g3, y3)
        i += 4 * s
    while i < n:
        dx[i] = relu_grad(dy[i], y[i])
        i += s


@cuda.jit
def dropout_backward_unroll4(dx, dy, mask, keep):
    """dx[i] = dy[i] / keep where mask[i] is nonzero, else 0 (keep = 1-p), for every i.

    dx, dy: 1-D float32, mask: 1-D uint8, all of length n; dx is written and may be dy.
    Indexing as in relu_forward_unroll4: each iteration loads 4 elements of dy and 4 mask
    bytes before storing any dx.
    """
    n = dy.shape[0]
    s = cuda.gridsize(1)
    i = cuda.grid(1)
    while i + 3 * s < n:
        g0, g1, g2, g3 = dy[i], dy[i + s], dy[i + 2 * s], dy[i + 3 * s]
        m0, m1, m2, m3 = mask[i], mask[i + s], mask[i + 2 * s], mask[i + 3 * s]
        dx[i] = dropout_grad(g0, m0, keep)
        dx[i + s] = dropout_grad(g1, m1, keep)
        dx[i + 2 * s] = dropout_grad(g2, m2, keep)
        dx[i + 3 * s] = dropout_grad(g3, m3, keep)
        i += 4 * s
    while i < n:
        dx[i] = dropout_grad(dy[i], mask[i], keep)
        i += s


@cuda.jit
def sgd_update_single_unroll4(w, dw, v, lr, momentum, weight_decay, nonfinite):
    """For every i: v[i] = momentum*v[i] - lr*(weight_decay*w[i] + dw[i]); w[i] += v[i].

    w, dw, v: 1-D float32 of the same length n; w and v updated in place, dw read;
    nonfinite: int32 (1,) or None, set to 1 when an updated w is not finite (as the package's).
    Indexing as in relu_forward_unroll4: each iteration loads 4 elements of each of w, dw
    and v (12 loads) before storing any.
    """
    n = w.shape[0]
    s = cuda.gridsize(1)
    i = cuda.grid(1)
    while i + 3 * s < n:
        w0, w1, w2, w3 = w[i], w[i + s], w[i + 2 * s], w[i + 3 * s]
        g0, g1, g2, g3 = dw[i], dw[i + s], dw[i + 2 * s], dw[i + 3 * s]
        v0, v1, v2, v3 = v[i], v[i + s], v[i + 2 * s], v[i + 3 * s]
        w[i], v[i] = sgd_step(w0, g0, v0, lr, momentum, weight_decay)
        w[i + s], v[i + s] = sgd_step(w1, g1, v1, lr, momentum, weight_decay)
        w[i + 2 * s], v[i + 2 * s] = sgd_step(w2, g2, v2, lr, momentum, weight_decay)
        w[i + 3 * s], v[i + 3 * s] = sgd_step(w3, g3, v3, lr, momentum, weight_decay)
        for wi in (w[i], w[i + s], w[i + 2 * s], w[i + 3 * s]):
            sgd.flag_nonfinite(nonfinite, wi)
        i += 4 * s
    while i < n:
        w[i], v[i] = sgd_step(w[i], dw[i], v[i], lr, momentum, weight_decay)
        sgd.flag_nonfinite(nonfinite, w[i])
        i += s


@cuda.jit
def spin_kernel(microseconds):
    """Keep the GPU busy for about ``microseconds`` (the timer's head start): launch [1, 1];
    the one thread sleeps 1 us at a time."""
    for _ in range(microseconds):
        cuda.nanosleep(1000)


_F1 = "float32[::1]"
_T = launch.THREADS_PER_BLOCK
STATIC_SIGNATURES = [
    (relu_forward_unroll4, f"void({_F1}, {_F1})", False, _T),
    (relu_backward_unroll4, f"void({_F1}, {_F1}, {_F1})", False, _T),
    (dropout_backward_unroll4, f"void({_F1}, {_F1}, uint8[::1], float32)", False, _T),
    (sgd_update_single_unroll4, f"void({_F1}, {_F1}, {_F1}, float32, float32, float32, int32[::1])",
     False, _T),
]
"""For nbalex.cuda.static.analyze(STATIC_SIGNATURES), run with the simulator off (sm_90,
numba-cuda 0.30: 32, 32, 38 and 38 registers, no spills; the package kernels 28-31)."""


# --------------------------------------------------------------------------------- the ops

class Op:
    """One elementwise op: its package kernel, its variants and how to make its inputs.

    ``make(rng, n)`` returns the kernel's array arguments (host, in order), outputs that are
    only written filled with a sentinel; ``written`` are the indices of the arrays the kernel
    writes; ``scalars`` follow the arrays; ``bytes_per_element`` counts each array read once and
    each output written once; ``reference(arrays)`` applies nbalex.reference in place.
    """

    def __init__(self, name, package, variants, make, written, scalars, bytes_per_element,
                 reference, sizes):
        self.name, self.package, self.variants = name, package, variants
        self.make, self.written, self.scalars = make, written, scalars
        self.bytes_per_element, self.reference, self.sizes = bytes_per_element, reference, sizes


SENTINEL = np.float32(12345.0)
"""Initial content of output buffers, so that an element a kernel skips shows up."""
P_DROP = 0.5
KEEP = np.float32(1.0 - P_DROP)
SGD_SCALARS = (np.float32(0.01), np.float32(0.9), np.float32(5e-4))
CONV1 = ("conv1", 128 * 96 * 55 * 55)
FC6 = ("fc6", 128 * 4096)
PARAMS = ("params", 60_965_224)


def _activations(rng, n):
    """float32 values of both signs with exact zeros, -0.0 and a NaN among them."""
    x = rng.standard_normal(n, dtype=np.float32)
    x[::97] = 0.0
    x[1::89] = -0.0
    x[n // 2] = np.nan
    return x


def _gradient(rng, n):
    """Finite float32 values of both signs (the package kernels send a NaN gradient to 0
    where the reference's multiply keeps it, so NaN is left out here)."""
    return rng.standard_normal(n, dtype=np.float32)


def _sentinel(n):
    return np.full(n, SENTINEL, np.float32)


OPS = [
    Op("relu_forward", relu.relu_forward_kernel, {"unroll4": relu_forward_unroll4},
       lambda rng, n: [_sentinel(n), _activations(rng, n)], (0,), (), 8,
       lambda a: reference.relu_forward(a[0], a[1]), [CONV1, FC6]),
    Op("relu_backward", relu.relu_backward_kernel, {"unroll4": relu_backward_unroll4},
       lambda rng, n: [_sentinel(n), _gradient(rng, n), _activations(rng, n)], (0,), (), 12,
       lambda a: reference.relu_backward(a[0], a[1], a[2]), [CONV1, FC6]),
    Op("dropout_backward", dropout.dropout_backward_kernel, {"unroll4": dropout_backward_unroll4},
       lambda rng, n: [_sentinel(n), _gradient(rng, n),
                       (rng.random(n) >= P_DROP).astype(np.uint8)], (0,), (KEEP,), 9,
       lambda a: reference.dropout_backward(a[0], a[1], a[2], P_DROP), [CONV1, FC6]),
    Op("sgd_update_single", sgd.sgd_update_single_kernel, {"unroll4": sgd_update_single_unroll4},
       lambda rng, n: [rng.standard_normal(n, dtype=np.float32) * np.float32(0.01),
                       rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3),
                       rng.standard_normal(n, dtype=np.float32) * np.float32(1e-4)],
       (0, 2), (*SGD_SCALARS, None), 20,
       lambda a: reference.sgd_update(a[0], a[1], a[2], *SGD_SCALARS), [PARAMS]),
]


# ---------------------------------------------------------------------------------- grids

class Geometry:
    """Threads per block, the block cap of the package's grid_1d, and the resident grid."""

    def __init__(self, threads, max_blocks, resident):
        self.threads, self.max_blocks, self.resident = threads, max_blocks, resident

    def blocks(self, grid, n, kernel):
        """Blocks of the named grid for n elements: "package" is launch.grid_1d's rule (one
        thread per element, capped), "quarter" the same rule for ceil(n/4) threads, and
        "resident" ``self.resident(kernel)``: one wave, as many blocks as the GPU holds at
        once (SMs x 8 for a kernel of at most 32 registers at 256 threads)."""
        if grid == "resident":
            return self.resident(kernel)
        items = n if grid == "package" else -(-n // 4)
        return max(1, min(-(-items // self.threads), self.max_blocks))


def resident_blocks(threads):
    """kernel -> blocks resident at once on the current GPU, from the driver's occupancy
    calculator; the kernel must have been launched (compiled) once."""
    def blocks(kernel):
        if not kernel.overloads:
            raise RuntimeError(f"{kernel.py_func.__name__}: launch it once before sizing a grid")
        try:
            return next(iter(kernel.overloads.values())).max_cooperative_grid_blocks(threads)
        except Exception as err:  # noqa: BLE001 - an occupancy query this driver lacks
            sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
            print(f"note: occupancy query failed ({err}); resident grid = {sms} SMs x "
                  f"{2048 // threads} blocks", file=sys.stderr)
            return sms * (2048 // threads)
    return blocks


CHECK_GEOMETRY = Geometry(threads=32, max_blocks=4, resident=lambda kernel: 16)
CHECK_SIZES = (1, 100, 3001)
"""Tiny lengths: one element, fewer than the grid's threads, and one not divisible by 4 x
threads in the grid (3001), so the unrolled loop, the tail loop and idle threads all run."""


def rows_for(op):
    """(variant name, kernel, grid name) for each line of the table; the first is the baseline."""
    rows = [("package", op.package, "package"), ("package", op.package, "resident")]
    for name, kernel in op.variants.items():
        rows += [(name, kernel, "quarter"), (name, kernel, "resident")]
    return rows


# ----------------------------------------------------------------------------- validation

def run_once(op, kernel, blocks, threads, host):
    """Launch ``kernel`` on fresh device copies of ``host``; return the written arrays."""
    arrays = [cuda.to_device(a) for a in host]
    kernel[blocks, threads](*arrays, *op.scalars)
    cuda.synchronize()
    return [arrays[i].copy_to_host() for i in op.written]


def same_bits(a, b):
    """Number of elements whose bit patterns differ (NaN == NaN when the bits agree)."""
    view = np.uint32 if a.dtype == np.float32 else a.dtype
    return int(np.count_nonzero(a.view(view) != b.view(view)))


def validate(op, host, geometry):
    """{(variant, grid): number of differing elements} vs the package kernel at its own
    grid, on the inputs ``host``, after checking that kernel against nbalex.reference (equal
    values, a NaN equal to a NaN and -0.0 to 0.0; SGD to 1e-6, as the device contracts the
    rule into FMAs and NumPy does not)."""
    n, threads = host[0].size, geometry.threads
    base = run_once(op, op.package, geometry.blocks("package", n, op.package), threads, host)
    expected = [a.copy() for a in host]
    op.reference(expected)
    for got, want in zip(base, [expected[i] for i in op.written]):
        if op.name.startswith("sgd"):
            ok = np.allclose(got, want, rtol=1e-6, atol=1e-9)
        else:
            ok = np.array_equal(got, want, equal_nan=True)
        if not ok:
            raise SystemExit(f"{op.name}: package kernel differs from nbalex.reference at n={n}")
    result = {}
    for variant, kernel, grid in rows_for(op):
        out = run_once(op, kernel, geometry.blocks(grid, n, kernel), threads, host)
        result[(variant, grid)] = sum(same_bits(a, b) for a, b in zip(out, base))
    return result


def check(op, inputs, geometry, emit):
    """Validate every row of ``op`` on each (label, host arrays) of ``inputs``; emit one
    line per row, "ok" or "MISMATCH"; return the set of (op, variant, grid) that differed."""
    found = {}
    for label, host in inputs:
        for key, d in validate(op, host, geometry).items():
            found.setdefault(key, []).append((host[0].size, d))
    bad = set()
    labels = ",".join(dict.fromkeys(label for label, _ in inputs))
    for (variant, grid), results in found.items():
        wrong = [f"{d} of {n} elements differ" for n, d in results if d]
        sizes = ", ".join(str(n) for n, _ in results)
        status = "MISMATCH (" + "; ".join(wrong) + ")" if wrong else "ok"
        emit(f"{op.name:<18} {variant:<8} grid={grid:<9} {labels} n={sizes}: {status}")
        if wrong:
            bad.add((op.name, variant, grid))
    return bad


# --------------------------------------------------------------------------------- timing

SPIN_MICROSECONDS = 2000
QUEUED_LAUNCHES = 10


def time_queued(call, launches=QUEUED_LAUNCHES, repeats=5):
    """Seconds per launch of the kernel alone: ``spin_kernel`` holds the GPU while the host
    queues ``launches`` calls of ``call`` between two events, so Python's launch overhead
    (tens of microseconds, longer than a 2 MB elementwise kernel runs) falls outside the
    interval, which time_numba_cuda's single launch cannot avoid."""
    spin_kernel[1, 1](1)
    call()
    cuda.synchronize()
    samples = []
    for _ in range(repeats):
        spin_kernel[1, 1](SPIN_MICROSECONDS)
        start, end = cuda.event(), cuda.event()
        start.record()
        for _ in range(launches):
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / launches)
    return samples


def time_op(op, label, host, geometry, repeats, skip):
    """One table row per row of ``rows_for(op)`` at size n (rows in ``skip`` are left out).

    ``ms``: median of ``repeats`` single launches timed by time_numba_cuda (the project's
    rule, launch overhead included); ``queued_ms``: median per-launch time of queued
    launches (time_queued).  Inputs are copied rotation_count() times and cycled through,
    so small working sets are not timed out of L2 when a training step would not be.
    """
    n = host[0].size
    copies = rotation_count(sum(a.nbytes for a in host))
    sets = [[cuda.to_device(a) for a in host] for _ in range(copies)]
    bytes_moved = op.bytes_per_element * n
    threads = geometry.threads
    rows, base, base_queued = [], None, None
    for variant, kernel, grid in rows_for(op):
        if (op.name, variant, grid) in skip:
            continue
        blocks = geometry.blocks(grid, n, kernel)
        call = cycling([functools.partial(kernel[blocks, threads], *arrays, *op.scalars)
                        for arrays in sets])
        seconds = median_seconds(time_numba_cuda(call, warmup=3, repeats=repeats))
        queued = median_seconds(time_queued(call, repeats=max(3, repeats // 4)))
        if variant == "package" and grid == "package":
            base, base_queued = seconds, queued
        rows.append({"op": op.name, "size": label, "variant": variant, "grid": grid,
                     "blocks": blocks, "threads": threads, "elements": n,
                     "ms": seconds * 1e3, "gbps": rate(bytes_moved, seconds),
                     "vs_package": ratio(base, seconds),
                     "queued_ms": queued * 1e3, "queued_gbps": rate(bytes_moved, queued),
                     "queued_vs_package": ratio(base_queued, queued)})
    return rows


COLUMNS = [("op", "op"), ("size", "size"), ("variant", "variant"), ("grid", "grid"),
           ("blocks", "blocks"), ("elements", "elements"), ("ms", "ms", 4),
           ("gbps", "GB/s", 1), ("vs_package", "vs package", 2),
           ("queued_ms", "queued ms", 4), ("queued_gbps", "queued GB/s", 1),
           ("queued_vs_package", "queued vs package", 2)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per row (median)")
    parser.add_argument("--check-only", action="store_true",
                        help="validate at tiny sizes with tiny grids; time nothing")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    if args.check_only:
        bad = set()
        for op in OPS:
            tiny = [("tiny", op.make(rng, n)) for n in CHECK_SIZES]
            bad |= check(op, tiny, CHECK_GEOMETRY, print)
        return 1 if bad else 0
    try:
        refuse_under_simulator("bench/elementwise_variants.py")
    except TimingRefused as err:
        print(f"error: {err} (--check-only validates without timing)", file=sys.stderr)
        return 2
    if not cuda.is_available():
        print("error: bench/elementwise_variants.py times kernels on an NVIDIA GPU and none is "
              "usable here (--check-only validates without one)", file=sys.stderr)
        return 2
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    threads = launch.THREADS_PER_BLOCK
    geometry = Geometry(threads, launch.MAX_BLOCKS, resident_blocks(threads))
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    log(f"device: {name} ({device.MULTIPROCESSOR_COUNT} SMs)")
    rows, bad = [], set()
    for op in OPS:
        for label, n in op.sizes:
            host = op.make(rng, n)
            failed = check(op, [(label, host)], geometry, log)
            rows += time_op(op, label, host, geometry, args.repeats, failed)
            bad |= failed
    if args.json:
        print(to_json([dict(row, device=name) for row in rows]))
    else:
        print(format_table(rows, COLUMNS))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
