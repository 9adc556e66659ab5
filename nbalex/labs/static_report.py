"""``nbalex lab check --static``: the student's kernels compiled for sm_90, beside the package's.

:func:`static_report` runs ``python -m nbalex.labs.static_report LAB FILE`` in a child
process with the simulator off (the simulator compiles nothing; the grader's own child runs
with it on) and a time limit.  The child reads the module's list of ``(kernel, signature,
is_gemm[, threads])`` entries (the lab's ``static`` attribute, ``STATIC_SIGNATURES`` unless
the lab says otherwise; the starters define it), compiles each with
:func:`nbalex.cuda.static.analyze` (ptxas -v, cuobjdump -sass) and does the same for the
package's kernel (the lab's ``package``: a file and a kernel name, else the solution's list).

The result is ``{"rows": [{"who": "yours" | "nbalex", "name", "registers", "spill_bytes",
"shared_bytes", "local_bytes", "threads_per_block", "occupancy", "instructions"}, ...],
"error": None | one line}``; without the CUDA tools, or when a kernel fails to compile,
``error`` says so and the grade is unaffected.
"""

import json
import os
import subprocess
import sys

TIMEOUT = 300.0
"""Seconds the compiles may take (a GEMM kernel takes tens of seconds)."""

FIELDS = ("name", "registers", "spill_bytes", "shared_bytes", "local_bytes",
          "threads_per_block", "occupancy", "instructions")


def static_report(lab_name, path, timeout=TIMEOUT):
    """The report dict above for the module at ``path`` on lab ``lab_name``."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    try:
        run = subprocess.run([sys.executable, "-m", "nbalex.labs.static_report", lab_name,
                              os.path.abspath(path)], capture_output=True, text=True,
                             env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rows": [], "error": f"the static report took longer than {timeout:g} s"}
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
        return {"rows": [], "error": f"the static report failed: {tail}"}


def _entries(module, attr, kernel=None):
    entries = list(getattr(module, attr, None) or ())
    if kernel is not None:
        entries = [e for e in entries if getattr(e[0], "py_func", e[0]).__name__ == kernel]
    return entries


def _measure(lab, path):
    from nbalex.cuda import static
    from nbalex.labs.excerpts import source_path
    from nbalex.labs.run import load_module, student_traceback
    if not static.tools_present():
        return {"rows": [], "error": "no static report: the CUDA tools (ptxas, cuobjdump, "
                "nvdisasm) are not installed (pip install nbalex[static])"}
    rows = []
    try:
        module = load_module(path)
        mine = _entries(module, lab.static)
        if not mine:
            return {"rows": [], "error": f"no static report: {os.path.basename(path)} has "
                    f"no {lab.static} list of (kernel, signature, is_gemm, threads)"}
        for r in static.analyze(mine, module=module):
            rows.append({"who": "yours", **{k: r[k] for k in FIELDS}})
    except Exception as exc:
        return {"rows": rows, "error": student_traceback(exc, path).splitlines()[-1]}
    relpath, kernel = lab.package or (lab.solution, None)
    package = load_module(source_path(relpath))
    for r in static.analyze(_entries(package, lab.static if not lab.package else
                                     "STATIC_SIGNATURES", kernel), module=package):
        rows.append({"who": "nbalex", **{k: r[k] for k in FIELDS}})
    return {"rows": rows, "error": None}


def format_static(report):
    """The static report as a table (or its one-line error)."""
    if report["error"] and not report["rows"]:
        return report["error"]
    lines = ["sm_90 static report (ptxas -v, cuobjdump -sass):",
             f"  {'':<7} {'kernel':<36} {'registers':>9} {'shared B':>8} {'spills B':>8} "
             f"{'occupancy':>9} {'instructions':>12}"]
    for r in report["rows"]:
        lines.append(f"  {r['who']:<7} {r['name']:<36} {r['registers']:>9} "
                     f"{r['shared_bytes']:>8} {r['spill_bytes']:>8} {r['occupancy']:>9.2f} "
                     f"{r['instructions']:>12}")
    if report["error"]:
        lines.append(report["error"])
    return "\n".join(lines)


def main(argv=None):
    lab_name, path = (argv if argv is not None else sys.argv[1:])[:2]
    from nbalex.labs.registry import get
    sys.stdout.write(json.dumps(_measure(get(lab_name), path)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
