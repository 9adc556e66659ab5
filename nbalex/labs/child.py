"""``python -m nbalex.labs.child LAB FILE BACKEND [SCALE]``: grade FILE, one JSON line per case.

The grader's child process (:mod:`nbalex.labs.grader` starts it with a time limit, with
``NUMBA_ENABLE_CUDASIM=1`` set when there is no GPU).  SCALE, when given, adds the GPU leg
at AlexNet's shapes times SCALE (:mod:`nbalex.labs.gpu_shapes`).  The first line is
``{"event": "start", "cases": [labels], "legs": [...], "alexnet": ...}``
(:func:`nbalex.labs.run.run_cases`); each case follows as soon as it is done, so a case that
hangs still leaves the earlier ones' results.
"""

import json
import sys


def main(argv=None):
    args = list(argv if argv is not None else sys.argv[1:])
    lab_name, path, backend = args[:3]
    scale = float(args[3]) if len(args) > 3 else None
    from nbalex.labs.registry import get
    from nbalex.labs.run import run_cases

    def emit(record):
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    run_cases(get(lab_name), path, backend, emit, scale=scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
