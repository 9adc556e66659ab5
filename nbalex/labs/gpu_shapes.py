"""The GPU leg of ``nbalex lab check``: the lab at AlexNet's shapes, checked and timed.

Runs in the grader's child process (:mod:`nbalex.labs.run`), after the small-shape cases
passed.  Each shape of :func:`nbalex.labs.alexnet_shapes.plan`:

1. the package's ``nbalex.cuda`` launcher runs on the shape's inputs; its outputs are the
   expected values (the package is tested against the reference at these shapes);
2. the student's launcher runs as in a small case (:func:`nbalex.labs.run.run_case`: outputs
   filled with the canary, the case's tolerances, the same failure records and hints);
3. when it matched, the student's launcher, the package's and PyTorch's equivalent
   (:mod:`nbalex.labs.torch_ops`, only when PyTorch sees a CUDA GPU) are timed on the same
   arrays: :data:`WARMUP` runs first, then the median of :data:`RUNS` runs (fewer when they
   pass :data:`BUDGET` seconds; at least :data:`MIN_RUNS`), each between two CUDA events.
   Under the simulator (the leg forced at a reduced scale, for tests) the events record
   nothing: the wall clock around a synchronize is used and the numbers mean nothing.

Each result is a small case's record plus ``"leg": "alexnet"``, ``"layer"`` and
``"timings"``: None when the output was wrong, else {"yours_ms", "nbalex_ms", "torch_ms"
(None when skipped), "ratio" (yours / nbalex), "runs", "torch_error" (one line or None)}.
Timing never changes the grade; a wrong result does.
"""

import importlib
import os
import statistics
import time

from nbalex.labs.alexnet_shapes import PACKAGE
from nbalex.labs.run import run_case, student_traceback
from nbalex.labs import torch_ops

WARMUP, RUNS, MIN_RUNS, BUDGET = 2, 10, 3, 2.0
"""Untimed runs first, then up to RUNS timed runs, stopping after BUDGET s (MIN_RUNS at least)."""

SIM_WARMUP, SIM_RUNS = 0, 1
"""Under the simulator: no warm-up and one timed run (each is slow, its time meaningless)."""

SMALL_FIRST = "not run: the small-shape cases must pass first"


def simulator():
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def leg_info(scale):
    """What the report says about the leg's setting: batch, timer, why PyTorch is skipped."""
    from nbalex.labs.alexnet_shapes import Scaled
    sim = simulator()
    torch_note = ("the kernels run under Numba's simulator" if sim
                  else torch_ops.unavailable())
    return {"scale": scale, "batch": Scaled(scale).batch,
            "timer": (f"wall clock of {SIM_RUNS} run under the simulator (meaningless)"
                      if sim else f"median of up to {RUNS} runs after {WARMUP} warm-up runs, "
                      "between CUDA events"),
            "torch": torch_note}


def not_run(planned, error):
    return {"label": planned.label, "launcher": planned.launcher, "passed": False,
            "failures": [], "error": error, "seconds": 0.0, "leg": "alexnet",
            "layer": None, "timings": None}


class Timer:
    """Median milliseconds of a callable on the GPU (CUDA events) or the simulator."""

    def __init__(self, sim, events):
        self.sim, self.events = sim, events
        self.warmup, self.runs = (SIM_WARMUP, SIM_RUNS) if sim else (WARMUP, RUNS)

    def __call__(self, fn, sync):
        for _ in range(self.warmup):
            fn()
        sync()
        times, spent = [], 0.0
        while len(times) < self.runs and (len(times) < MIN_RUNS or spent < BUDGET):
            if self.sim:
                t0 = time.perf_counter()
                fn()
                sync()
                ms = (time.perf_counter() - t0) * 1e3
            else:
                start, end = self.events()
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            times.append(ms)
            spent += ms / 1e3
        return round(statistics.median(times), 4), len(times)


def run_shapes(lab, planned, module, arrays, path, emit):
    """Check and time ``module``'s launchers at ``lab``'s shapes ``planned``
    (:func:`nbalex.labs.alexnet_shapes.plan`); each result is passed to ``emit`` as it comes
    and the list is returned."""
    from numba import cuda
    sim = simulator()
    package = importlib.import_module(f"nbalex.cuda.{PACKAGE[lab.op]}")
    timer = Timer(sim, lambda: (cuda.event(timing=True), cuda.event(timing=True)))
    use_torch = not sim and torch_ops.unavailable() is None
    results = []
    for p in planned:
        result = run_shape(p, getattr(module, p.launcher), package, arrays, path,
                           timer, use_torch)
        results.append(result)
        emit(result)
    return results


def run_shape(planned, launcher, package, arrays, path, timer, use_torch):
    """One shape: the package's outputs, the student's compared with them, then the times."""
    shape = planned.build()
    case = shape.case
    expected = _package_outputs(shape, package, arrays)
    if isinstance(expected, str):
        return not_run(planned, expected)
    case.outputs = {n: expected[n] for n in case.outputs}
    case.expected_inout = {n: expected[n] for n in case.inout}
    result = run_case(case, launcher, arrays, path)
    result.update(leg="alexnet", layer=shape.layer, timings=None)
    if not result["passed"]:
        return result
    try:
        result["timings"] = _timings(shape, launcher, package, arrays, timer, use_torch)
    except Exception as exc:            # a correct result that fails on a rerun
        result["passed"] = False
        result["error"] = "failed when run again for timing:\n" + student_traceback(exc, path)
    return result


def _device(shape, arrays):
    case = shape.case
    host = {**case.inputs, **case.inout, **case.outputs, **shape.extra}
    return {n: arrays.put(v) for n, v in host.items()}


def _package_outputs(shape, package, arrays):
    """{name: host array} the package's launcher computes, or a one-line error."""
    a = _device(shape, arrays)
    try:
        shape.package(package, a)
        return {n: arrays.get(a[n]) for n in shape.case.expected()}
    except Exception as exc:
        return (f"the package's {package.__name__} failed at this shape (a grader problem, not "
                f"your kernel's): {type(exc).__name__}: {exc}")


def _timings(shape, launcher, package, arrays, timer, use_torch):
    from numba import cuda
    a = _device(shape, arrays)
    yours, runs = timer(lambda: shape.case.call(launcher, a), cuda.synchronize)
    nbalex, _ = timer(lambda: shape.package(package, a), cuda.synchronize)
    torch_ms, torch_error = None, None
    if use_torch:
        try:
            torch_ms = _torch_time(shape, timer)
        except Exception as exc:
            torch_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return {"yours_ms": yours, "nbalex_ms": nbalex, "torch_ms": torch_ms,
            "ratio": round(yours / nbalex, 3) if nbalex > 0 else None, "runs": runs,
            "torch_error": torch_error}


def _torch_time(shape, timer):
    import torch
    case = shape.case
    host = {**case.inputs, **case.inout, **case.outputs, **shape.extra}
    t = {n: torch.from_numpy(v).to("cuda") for n, v in host.items()}
    fn = torch_ops.prepare(case.launcher, t, shape.params)
    events = lambda: (torch.cuda.Event(enable_timing=True),    # noqa: E731
                      torch.cuda.Event(enable_timing=True))
    ms, _ = Timer(False, events)(fn, torch.cuda.synchronize)
    del t, fn
    torch.cuda.empty_cache()
    return ms


def format_leg(report, case_lines):
    """The leg's lines for the terminal: a table of the timed shapes, each failure's
    evidence (``case_lines(case)``), why PyTorch's column is empty."""
    leg = report.get("alexnet")
    if not leg:
        return []
    if leg.get("reason"):
        return [f"AlexNet's shapes: {leg['reason']}"]
    cases = [c for c in report["cases"] if c.get("leg") == "alexnet"]
    scaled = "" if leg["scale"] == 1 else f", scaled by {leg['scale']:g}"
    lines = [f"AlexNet's shapes (batch {leg['batch']}{scaled}; {leg['timer']}):",
             f"  {'':<5} {'yours ms':>9} {'nbalex ms':>9} {'torch ms':>9} {'yours/nbalex':>12}"
             "  case"]
    for c in cases:
        t = c.get("timings")
        if c["passed"] and t:
            torch_ms = "-" if t["torch_ms"] is None else f"{t['torch_ms']:.4g}"
            ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
            lines.append(f"  PASS  {t['yours_ms']:>9.4g} {t['nbalex_ms']:>9.4g} "
                         f"{torch_ms:>9} {ratio:>12}  {c['label']}")
            if t.get("torch_error"):
                lines.append(f"        torch: {t['torch_error']}")
        else:
            lines.extend(case_lines(c))
    if leg.get("torch"):
        lines.append(f"  torch ms: not timed ({leg['torch']})")
    return lines
