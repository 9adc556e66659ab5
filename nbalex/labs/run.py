"""Run a lab's cases against a student module, in this process (the child's side).

:func:`run_cases` imports nothing heavy itself; the arrays live where the backend wants them
(device arrays on ``cuda``, NumPy on ``cpu`` and ``reference``), outputs are filled with the
canary before each launch, and every exception the student's code raises becomes the
student's own traceback lines in the case's ``error`` (the grader never crashes with it).
"""

import hashlib
import importlib.util
import inspect
import os
import sys
import time
import traceback

import numpy as np

from nbalex.labs.compare import canary, compare


def load_module(path):
    """Import the Python file at ``path`` as a fresh module (its own name, per path)."""
    path = os.path.realpath(path)
    name = "nbalex_lab_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def student_traceback(exc, path):
    """The traceback of ``exc`` trimmed to the frames in the student's file ``path`` (all
    frames when none is), then the exception line."""
    path = os.path.realpath(path)
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if os.path.realpath(f.filename) == path]
    if isinstance(exc, SyntaxError) and exc.filename and os.path.realpath(exc.filename) == path:
        mine = []
    lines = traceback.format_list(mine or frames[-3:])
    text = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    return ("".join(lines) + text).rstrip()


def expected_signature(lab, name):
    """``name(args)`` as the package's solution declares it, for messages."""
    from nbalex.labs.excerpts import source_path
    try:
        solution = load_module(source_path(lab.solution))
        return f"{name}{inspect.signature(getattr(solution, name))}"
    except Exception:
        return name


class Arrays:
    """Moves a case's arrays to the backend and back."""

    def __init__(self, backend):
        self.device = backend == "cuda"
        if self.device:
            from numba import cuda
            self.cuda = cuda

    def put(self, a):
        return self.cuda.to_device(a) if self.device else a.copy()

    def get(self, a):
        if self.device:
            self.cuda.synchronize()
            return a.copy_to_host()
        return a


def run_case(case, launcher, arrays, path):
    """One case: {"label", "launcher", "passed", "failures", "error", "seconds"}."""
    result = {"label": case.label, "launcher": case.launcher, "passed": False,
              "failures": [], "error": None, "seconds": 0.0}
    a = {n: arrays.put(v) for n, v in case.inputs.items()}
    a.update({n: arrays.put(v) for n, v in case.inout.items()})
    a.update({n: arrays.put(np.full(v.shape, canary(v.dtype), v.dtype))
              for n, v in case.outputs.items()})
    t0 = time.perf_counter()
    try:
        case.call(launcher, a)
        got = {n: arrays.get(a[n]) for n in case.expected()}
    except Exception as exc:
        result["error"] = student_traceback(exc, path)
        return result
    finally:
        result["seconds"] = round(time.perf_counter() - t0, 4)
    for name, want in case.expected().items():
        rtol, atol = case.tolerance(name)
        failure = compare(name, got[name], want, rtol, atol, case.special)
        if failure:
            result["failures"].append(failure)
    result["passed"] = not result["failures"]
    return result


def run_cases(lab, path, backend="cuda", emit=None, scale=None):
    """Grade the module at ``path`` on every case of ``lab``; each result dict is passed to
    ``emit`` as it comes (the child streams them) and the list is returned.

    With ``scale`` (cuda only) the GPU leg follows (:mod:`nbalex.labs.gpu_shapes`: AlexNet's
    shapes times ``scale``) once every small case passed; otherwise its cases are reported
    as not run.  The first record, ``{"event": "start", "cases", "legs", "alexnet"}``, lists
    every label, its leg ("small" or "alexnet") and the leg's setting (None without it)."""
    emit = emit or (lambda r: None)
    cases = lab.case_list()
    planned, info = [], None
    if scale is not None:
        from nbalex.labs import gpu_shapes
        from nbalex.labs.alexnet_shapes import plan
        planned, info = plan(lab, scale), gpu_shapes.leg_info(scale)
    emit({"event": "start", "cases": [c.label for c in cases] + [p.label for p in planned],
          "legs": ["small"] * len(cases) + ["alexnet"] * len(planned), "alexnet": info})
    results = []
    try:
        module = load_module(path)
        missing = [n for n in lab.launchers if not callable(getattr(module, n, None))]
        if missing:
            raise AttributeError(f"{os.path.basename(path)} defines no "
                                 + ", ".join(expected_signature(lab, n) for n in missing))
    except Exception as exc:
        error = student_traceback(exc, path)
        for label, launcher, leg in [(c.label, c.launcher, "small") for c in cases] + \
                [(p.label, p.launcher, "alexnet") for p in planned]:
            result = {"label": label, "launcher": launcher, "passed": False,
                      "failures": [], "error": error, "seconds": 0.0, "leg": leg}
            results.append(result)
            emit(result)
        return results
    arrays = Arrays(backend)
    for case in cases:
        result = run_case(case, getattr(module, case.launcher), arrays, path)
        result["leg"] = "small"
        results.append(result)
        emit(result)
    if not planned:
        return results
    if all(r["passed"] for r in results):
        return results + gpu_shapes.run_shapes(lab, planned, module, arrays, path, emit)
    for p in planned:
        result = gpu_shapes.not_run(p, gpu_shapes.SMALL_FIRST)
        results.append(result)
        emit(result)
    return results
