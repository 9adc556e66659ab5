"""One small launch of each GEMM kernel, for ``compute-sanitizer`` to watch.

    compute-sanitizer --tool memcheck --error-exitcode 3 python bench/gpu_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python bench/gpu_sanitize.py

Runs the cuda backend's conv and linear launchers once each at small, awkward shapes (partial
tiles, stride 1 and 2, groups 2, a K long enough to split), compares every output with the
NumPy reference, and prints one JSON object: the cases run, the worst relative error, the
kernels launched (:func:`nbalex.cuda.launch.record_launches`) and the GEMM kernels of the
package's static list that no case reached. Exit status 1 when an output is wrong. Under the
simulator (``NUMBA_ENABLE_CUDASIM=1``) the same cases take minutes; ``--quick`` runs only the
small linear case (seconds).
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

TOLERANCE = 1e-4

# (name, x shape, w shape, stride, pad, groups): strided and unit-stride backward-data both run
CONV_CASES = [("conv-s2-g2", (2, 4, 9, 9), (6, 2, 3, 3), 2, 1, 2),
              ("conv-s1", (1, 3, 7, 7), (5, 3, 3, 3), 1, 1, 1)]
# (name, N, K, M): the second has a K long enough for the split-K kernels
LINEAR_CASES = [("fc-small", 3, 20, 7), ("fc-long-k", 2, 4096, 4)]


def rel_err(out, ref):
    ref = np.asarray(ref, np.float64)
    den = float(np.linalg.norm(ref)) or 1.0
    return float(np.linalg.norm(np.asarray(out, np.float64) - ref)) / den


def run_cases(rng, conv_cases=CONV_CASES, linear_cases=LINEAR_CASES):
    """[(case, pass, relative error)] for every pass of every case, cuda against reference."""
    from nbalex import ops

    rows = []
    for name, xs, ws, stride, pad, groups in conv_cases:
        x = rng.standard_normal(xs, dtype=np.float32)
        w = rng.standard_normal(ws, dtype=np.float32)
        b = rng.standard_normal(ws[0], dtype=np.float32)
        args = dict(stride=stride, pad=pad, groups=groups)
        y = {be: ops.conv2d_forward(x, w, b, backend=be, **args) for be in ("cuda", "reference")}
        rows.append((name, "forward", rel_err(y["cuda"], y["reference"])))
        dy = rng.standard_normal(y["reference"].shape, dtype=np.float32)
        grads = {be: ops.conv2d_backward(dy, x, w, backend=be, **args) for be in ("cuda", "reference")}
        for i, p in enumerate(("backward-data", "backward-weights", "backward-bias")):
            rows.append((name, p, rel_err(grads["cuda"][i], grads["reference"][i])))
    for name, n, k, m in linear_cases:
        x = rng.standard_normal((n, k), dtype=np.float32)
        w = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal(m, dtype=np.float32)
        y = {be: ops.linear_forward(x, w, b, backend=be) for be in ("cuda", "reference")}
        rows.append((name, "forward", rel_err(y["cuda"], y["reference"])))
        dy = rng.standard_normal((n, m), dtype=np.float32)
        grads = {be: ops.linear_backward(dy, x, w, backend=be) for be in ("cuda", "reference")}
        for i, p in enumerate(("backward-data", "backward-weights", "backward-bias")):
            rows.append((name, p, rel_err(grads["cuda"][i], grads["reference"][i])))
    return rows


def gemm_kernel_names():
    """Names of the kernels the package's static lists mark as GEMMs."""
    import importlib
    import pkgutil

    import nbalex.cuda as package
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "static":
            continue
        module = importlib.import_module(f"nbalex.cuda.{info.name}")
        for entry in getattr(module, "STATIC_SIGNATURES", ()):
            if entry[2]:
                names.add(getattr(entry[0], "__name__", str(entry[0])))
    return names


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from nbalex.cuda.launch import record_launches

    quick = "--quick" in argv          # one small linear case: the suite's dry run
    with record_launches() as log:
        rows = run_cases(np.random.default_rng(0), *(([], LINEAR_CASES[:1]) if quick else ()))
    launched = sorted(set(log.names()))
    worst = max(err for _, _, err in rows)
    bad = [f"{case} {p}: {err:.3g}" for case, p, err in rows if not err <= TOLERANCE]
    result = {"ok": not bad, "cases": len(rows), "launches": len(log), "worst_rel_err": worst,
              "kernels": launched, "gemm_not_reached": sorted(gemm_kernel_names() - set(launched)),
              "mismatches": bad}
    print(json.dumps(result, indent=1))
    if bad:
        print("gpu_sanitize: outputs differ from the reference: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
