"""What every benchmark shares: timers, the median-of-repeats rule, checks, tables and JSON.

The timing rule (the same for ours and for the peer, measured in the same process):
call the function ``warmup`` times untimed (compilation, handle creation, caches), then
``repeats`` timed samples, and report the median. On the CPU a sample is a ``perf_counter``
interval around a call; on a GPU it is the interval between two CUDA events recorded on the
default stream around the call, read after the end event has completed.
"""

import json
import math
import os
import statistics
import time

import numpy as np


class TimingRefused(RuntimeError):
    """Raised when timings would be meaningless (the CUDA simulator) or cannot be taken."""


class CheckFailed(RuntimeError):
    """Raised when a kernel's output does not match the reference backend's."""


def simulator_enabled():
    """True when Numba's CUDA simulator is switched on for this process."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "") == "1"


def refuse_under_simulator(what):
    """Raise :class:`TimingRefused` when the CUDA simulator is on: its times mean nothing."""
    if simulator_enabled():
        raise TimingRefused(
            f"{what}: NUMBA_ENABLE_CUDASIM=1 (the CUDA simulator) is set; simulated kernels run "
            "as Python threads, so no timings are printed. Run on a real GPU with the variable unset.")


# ---------------------------------------------------------------------------------------------
# Timers.  Each returns a list of per-call seconds; median_seconds() reduces it.

def time_host(fn, warmup=2, repeats=5, sync=None):
    """Seconds per call of ``fn()``, measured with ``perf_counter``.

    ``sync`` (optional) is called after each call and inside the interval, so work that runs
    asynchronously is finished before the clock is read.
    """
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - t0)
    return samples


def time_numba_cuda(fn, warmup=2, repeats=5):
    """Seconds per call of ``fn()`` between two Numba CUDA events on the default stream."""
    from numba import cuda

    for _ in range(warmup):
        fn()
    cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = cuda.event(), cuda.event()     # timing events (the default)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)     # milliseconds -> seconds
    return samples


def time_torch_cuda(fn, warmup=2, repeats=5):
    """Seconds per call of ``fn()`` between two PyTorch CUDA events on the current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return samples


ROTATE_BYTES = 256 * 2**20
"""Inputs smaller than this are copied several times and the timed calls cycle through the
copies, so a repeated call does not find its inputs in the last-level cache (50 MB on an
H100) when a real step would not."""


def rotation_count(nbytes, limit=8):
    """How many copies of a working set of ``nbytes`` to cycle through (1 .. limit)."""
    return max(1, min(limit, math.ceil(ROTATE_BYTES / max(int(nbytes), 1))))


def cycling(fns):
    """One callable that calls ``fns[0]``, ``fns[1]``, ... in turn, round and round."""
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()
    return call


def median_seconds(samples):
    """The median of a list of per-call times."""
    return statistics.median(samples)


# ---------------------------------------------------------------------------------------------
# Correctness.

def relative_error(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (inf when out has a NaN, 0/0 counts as exact)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise CheckFailed(f"shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        return math.inf
    num = float(np.linalg.norm((out - ref).ravel()))
    den = float(np.linalg.norm(ref.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def compare_outputs(ours, reference, tolerance):
    """Raise :class:`CheckFailed` naming the first output that differs; return max error.

    Float outputs are compared by relative error; integer outputs (argmax indices, dropout
    masks) must match exactly.
    """
    worst = 0.0
    for name, ref in reference.items():
        out = np.asarray(ours[name])
        ref = np.asarray(ref)
        if ref.dtype.kind in "iub":
            if out.shape != ref.shape or not np.array_equal(out, ref):
                bad = int(np.sum(out != ref)) if out.shape == ref.shape else out.size
                raise CheckFailed(f"output {name!r}: {bad} of {ref.size} elements differ")
            continue
        err = relative_error(out, ref)
        if not err <= tolerance:
            raise CheckFailed(f"output {name!r}: relative error {err:.3g} > {tolerance:g}")
        worst = max(worst, err)
    return worst


# ---------------------------------------------------------------------------------------------
# Output.

def format_value(value, digits=3):
    """A table cell: '-' for missing, floats with ``digits`` decimals (or a format spec such
    as ``".1e"`` when ``digits`` is a string), str() for the rest."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if isinstance(digits, str):
            return format(value, digits)
        if value != 0.0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows, columns):
    """A plain, aligned text table.

    ``columns`` is a list of (key, header) or (key, header, digits); rows are dicts.
    ``digits`` is a number of decimals or a format spec (see :func:`format_value`).
    """
    cols = [(c[0], c[1], c[2] if len(c) > 2 else 3) for c in columns]
    cells = [[format_value(row.get(key), digits) for key, _, digits in cols] for row in rows]
    widths = [max([len(header)] + [len(r[i]) for r in cells]) for i, (_, header, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, ((_, h, _), w) in enumerate(zip(cols, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def to_json(obj):
    """JSON text for benchmark results (NumPy scalars, inf and NaN become plain JSON)."""
    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        return value
    return json.dumps(clean(obj), indent=2)


def rate(amount, seconds):
    """amount / seconds in billions (GFLOP/s, GB/s); None when either is missing."""
    if amount is None or not seconds:
        return None
    return amount / seconds / 1e9


def ratio(numerator, denominator):
    """numerator / denominator, None when either is missing."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator
