"""Which Python the GPU suite runs: the machine's own ``python3`` when it has the packages.

    python3 bench/gpu_env.py [--no-install]

Checks that a Python imports what the suite needs (numpy, numba, numba.cuda, click, h5py,
pytest, and nbalex from this source tree) and notes the optional ones (torch, cupy, xdist,
tqdm, matplotlib). It tries this interpreter first; only when something needed is missing does
it run ``make install`` (150 s at most; with a package index that would replace the image's
CUDA torch, so it is the last resort) and try ``.venv/bin/python``. Prints one JSON object,
``python`` being the interpreter to use; exit status 1 when none has what is needed.
Standard library only, so it runs before anything is known about the machine.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = ["numpy", "numba", "numba.cuda", "click", "h5py", "pytest", "nbalex"]
OPTIONAL = ["torch", "cupy", "xdist", "tqdm", "matplotlib"]
PROBE = """
import importlib, importlib.util, json, sys
from importlib import metadata
needed, optional = sys.argv[1].split(","), sys.argv[2].split(",")
found, missing = {}, []
for name in needed + optional:
    try:   # the needed ones are imported; the optional ones only looked up (torch takes seconds)
        if name in needed:
            importlib.import_module(name)
        elif importlib.util.find_spec(name) is None:
            raise ImportError(name)
        dist = {"numba.cuda": "numba-cuda", "xdist": "pytest-xdist"}.get(name, name)
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = "?"
    except Exception:
        missing.append(name)
print(json.dumps({"found": found, "missing": missing}))
"""


def probe(python):
    """{"found": {name: version}, "missing": [names]} for ``python``, or None if it cannot run."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        run = subprocess.run([python, "-c", PROBE, ",".join(NEEDED), ",".join(OPTIONAL)], capture_output=True,
                             text=True, timeout=90, env=env, cwd=REPO)
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    tried = []
    candidates = [sys.executable, os.path.join(REPO, ".venv", "bin", "python")]
    for i, python in enumerate(candidates):
        if i == 1 and not os.path.exists(python):
            if "--no-install" in argv:
                break
            try:
                subprocess.run(["make", "install"], cwd=REPO, timeout=150, capture_output=True)
            except (OSError, subprocess.SubprocessError) as exc:
                tried.append({"python": "make install", "error": f"{type(exc).__name__}: {exc}"})
        if not os.path.exists(python):
            continue
        seen = probe(python)
        tried.append({"python": python, **(seen or {"error": "does not run"})})
        if seen is not None and not [m for m in seen["missing"] if m in NEEDED]:
            print(json.dumps({"python": python, **seen, "tried": tried}))
            return 0
    print(json.dumps({"python": None, "tried": tried}))
    missing = sorted({m for t in tried for m in t.get("missing", ()) if m in NEEDED})
    print(f"gpu_env: no Python with {', '.join(missing) or 'the needed packages'}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
