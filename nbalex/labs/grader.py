"""``nbalex lab check``: grade a student's module in a child process with a time limit.

A kernel that never finishes (a loop that does not advance, a barrier some threads never
reach on a real GPU) would hang the grader, so every lab runs in a child process
(:mod:`nbalex.labs.child`) that streams one result per case; a case that takes longer than
``timeout`` seconds is reported as timed out, the child is killed and the cases after it are
reported as not run.  Without a GPU the child runs the kernels under Numba's simulator.

On a GPU the child then runs the GPU leg (:mod:`nbalex.labs.gpu_shapes`): the lab at
AlexNet's layer shapes, checked against the package's launcher and timed beside it and
PyTorch; ``gpu_shapes=False`` skips it, and ``scale`` forces it at AlexNet's shapes times
``scale``, under the simulator too (how the tests run it).

The report (:func:`check`) is a dict an autograder can read (``--json``)::

    {"lab", "file", "backend", "simulator", "passed", "score", "passed_cases",
     "total_cases", "cases": [{"label", "launcher", "leg", "passed", "failures", "error",
     "seconds"[, "layer", "timings"]}, ...],
     "alexnet": {"reason", "scale", "batch", "timer", "torch"}}

``leg`` is "small" or "alexnet"; the AlexNet cases count in the score like the others
(passed_cases / total_cases) and carry ``timings`` (see :mod:`nbalex.labs.gpu_shapes`).
``alexnet["reason"]`` is None when the leg ran, else why not (then it has no cases).  A
failure lists the array, its shape, how many elements are wrong, the first ones (index,
expected, got) and a hint.
"""

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from nbalex.labs.registry import get

DEFAULT_TIMEOUT = 60.0
"""Seconds one case may take (simulated kernels are slow; a hang is much slower)."""

STARTUP = 60.0
"""Extra seconds for the child to start (importing numba, compiling on a GPU)."""


def gpu_present():
    """True when an NVIDIA GPU answers ``nvidia-smi -L`` (numba is not imported here)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def simulated(backend):
    """Whether the cuda backend will run under the simulator here."""
    if backend != "cuda":
        return False
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return True
    return not gpu_present()


def gpu_leg(backend, sim, gpu_shapes=True, scale=None):
    """(scale the GPU leg runs at, None) or (None, why it does not run)."""
    if not gpu_shapes:
        return None, "skipped (--no-gpu-shapes)"
    if backend != "cuda":
        return None, f"not run on the {backend} backend (the leg times CUDA kernels)"
    if scale is not None:
        return scale, None
    if sim:
        return None, "not run: no GPU (the small shapes ran under Numba's simulator)"
    return 1.0, None


def check(lab_name, path, backend="cuda", timeout=DEFAULT_TIMEOUT, gpu_shapes=True,
          scale=None):
    """Grade the module at ``path`` on lab ``lab_name``; the report dict described above.

    ValueError for an unknown lab, a backend other than cuda/cpu/reference, a path that is
    not a Python file, or a ``scale`` outside (0, 1]."""
    lab = get(lab_name)
    if backend not in ("cuda", "cpu", "reference"):
        raise ValueError(f"unknown backend {backend!r}: choose cuda, cpu or reference")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if not path.endswith(".py"):
        raise ValueError(f"{path} is not a Python file (.py)")
    if scale is not None and not 0 < scale <= 1:
        raise ValueError(f"the GPU leg's scale must be in (0, 1], not {scale:g}")
    sim = simulated(backend)
    env = dict(os.environ)
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    leg_scale, reason = gpu_leg(backend, sim, gpu_shapes, scale)
    extra = [] if leg_scale is None else [repr(float(leg_scale))]
    results, info = _run_child(lab.name, os.path.abspath(path), backend, env, timeout, extra)
    if leg_scale is not None and info is None:
        reason = "not run: the grader's child process died before it started"
    passed = sum(1 for r in results if r["passed"])
    return {"lab": lab.name, "file": path, "backend": backend, "simulator": sim,
            "passed": passed == len(results) and bool(results),
            "score": round(passed / len(results), 4) if results else 0.0,
            "passed_cases": passed, "total_cases": len(results), "cases": results,
            "alexnet": {"reason": reason, **(info or {})}}


def _run_child(lab_name, path, backend, env, timeout, extra=()):
    """(results of every case, the leg's setting from the start record or None)."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "nbalex.labs.child", lab_name, path,
                                 backend, *extra], stdout=subprocess.PIPE, stderr=stderr,
                                env=env, start_new_session=True)
        labels, legs, info, results, timed_out = None, [], None, [], False
        try:
            for record in _lines(proc, timeout):
                if record is None:
                    timed_out = True
                    break
                if record.get("event") == "start":
                    labels, legs = record["cases"], record.get("legs", [])
                    info = record.get("alexnet")
                else:
                    results.append(record)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        stderr.seek(0)
        err = stderr.read().decode(errors="replace").strip()
    return _complete(labels, results, timed_out, timeout, proc.returncode, err, legs), info


def _lines(proc, timeout):
    """The child's JSON records as they come; None (then stop) when one takes too long."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    buffer, deadline = b"", time.monotonic() + timeout + STARTUP
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not selector.select(left):
            yield None
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                yield json.loads(line)
            except ValueError:
                continue
            deadline = time.monotonic() + timeout


def _complete(labels, results, timed_out, timeout, returncode, err, legs=()):
    """Results for every case: those the child sent, then the hung one and the rest."""
    if labels is None:
        tail = "\n".join(err.splitlines()[-12:]) or f"exit status {returncode}"
        return [{"label": "(the grader's child process)", "launcher": None, "leg": "small",
                 "passed": False, "failures": [], "error": tail, "seconds": 0.0}]
    done = len(results)
    legs = list(legs) + ["small"] * (len(labels) - len(legs))
    for n, (label, leg) in enumerate(zip(labels[done:], legs[done:])):
        if n == 0 and timed_out:
            error = (f"timed out after {timeout:g} s: a loop that never ends (an index that "
                     "does not advance) or threads waiting at a cuda.syncthreads() that "
                     "others never reach" +
                     (", or a kernel too slow for AlexNet's shapes" if leg == "alexnet"
                      else ""))
        elif n == 0:
            tail = "\n".join(err.splitlines()[-12:])
            error = f"the grader's child process died (exit status {returncode})" + \
                (f":\n{tail}" if tail else "")
        else:
            error = "not run (an earlier case did not finish)"
        results.append({"label": label, "launcher": None, "leg": leg, "passed": False,
                        "failures": [], "error": error, "seconds": 0.0})
    return results


def format_report(report):
    """The report as text for a terminal: PASS, or each failure with its evidence; then the
    GPU leg's table (or why it did not run)."""
    from nbalex.labs.gpu_shapes import format_leg
    mode = "simulator" if report["simulator"] else report["backend"]
    lines = [f"lab {report['lab']}: {report['file']} ({mode})"]
    for case in report["cases"]:
        if case.get("leg", "small") != "small":
            continue
        lines.extend(case_lines(case))
    lines.extend(format_leg(report, case_lines))
    verdict = "PASS" if report["passed"] else "FAIL"
    lines.append(f"{verdict}: {report['passed_cases']}/{report['total_cases']} cases "
                 f"(score {report['score']:.2f})")
    return "\n".join(lines)


def case_lines(case):
    """A case's lines: PASS, or FAIL with its error and each array's evidence and hint."""
    if case["passed"]:
        return [f"  PASS  {case['label']}"]
    lines = [f"  FAIL  {case['label']}"]
    if case["error"]:
        lines.extend("        " + ln for ln in case["error"].splitlines())
    for f in case["failures"]:
        shape = "x".join(str(s) for s in f["shape"]) or "scalar"
        lines.append(f"        {f['array']} ({shape}): {f['wrong']} of {f['total']} "
                     "elements wrong")
        for e in f["first"]:
            lines.append(f"          at {tuple(e['index'])}: expected {_num(e['expected'])}"
                         f", got {_num(e['got'])}")
        lines.append(f"        hint: {f['hint']}")
    return lines


def _num(v):
    return f"{v:.7g}" if isinstance(v, float) else str(v)
