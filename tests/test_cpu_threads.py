"""OpenBLAS's parallel jobs on nbalex's pool (nbalex.cpu.openblas): same bits, no spinning after
a call, a forked child still runs BLAS, and the opt-out.

Each case runs in a fresh process: the pool is installed at import, process-wide.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from nbalex.cpu import openblas

needs_pool = pytest.mark.skipif(openblas.SET_CALLBACK is None or openblas.CONTROLS is None,
                                reason="this OpenBLAS has no threads callback")

# A product big enough for OpenBLAS to split over two jobs.
SETUP = """
import time
import numpy as np
from nbalex.cpu import openblas, workers
openblas.CONTROLS[1](2)
r = np.random.default_rng(0)
a = r.standard_normal((384, 1536)).astype(np.float32)
b = r.standard_normal((1536, 384)).astype(np.float32)
"""


def python(code, env=None, timeout=120):
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(SETUP) + textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, **(env or {})))
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split()


@needs_pool
def test_blas_jobs_run_on_the_pool_and_give_openblas_bits():
    out = python("""
        pool = openblas.blas_pool()
        ours = a @ b
        served = pool.calls
        openblas.uninstall_blas_pool()
        theirs = a @ b
        openblas.install_blas_pool()
        print(openblas.BLAS_POOL.startswith("nbalex"), served, np.array_equal(ours, theirs))
    """)
    assert out[0] == "True" and int(out[1]) >= 1 and out[2] == "True"


@needs_pool
def test_no_thread_left_running_after_a_call():
    # OpenBLAS's own threads keep spinning (state R) for ~0.1 s after a call; the pool's sleep (S).
    out = python("""
        import os, threading
        me = threading.get_native_id()
        def states():
            found = []
            for tid in os.listdir("/proc/self/task"):
                if int(tid) != me:
                    with open(f"/proc/self/task/{tid}/stat") as f:
                        found.append(f.read().rsplit(")", 1)[1].split()[0])
            return found
        seen = []
        for _ in range(3):
            a @ b
            time.sleep(0.02)
            seen += states()
        print(len(seen), seen.count("R"))
    """)
    assert int(out[0]) >= 3 and out[1] == "0"


@needs_pool
def test_a_forked_child_runs_blas_and_batch_parallel_work():
    out = python("""
        import os
        a @ b
        workers.run(lambda t, lo, hi: None, 4)
        pid = os.fork()
        if pid == 0:
            ok = np.array_equal(a @ b, a @ b) and openblas.blas_pool() is None
            workers.run(lambda t, lo, hi: None, 4)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), openblas.blas_pool() is not None)
    """, timeout=60)
    assert out == ["0", "True"]


def test_openblas_opt_out_and_bad_value():
    out = python("print(openblas.blas_pool() is None, openblas.BLAS_POOL)",
                 env={"NBALEX_BLAS_THREADS": "openblas"})
    assert out[0] == "True" and "OpenBLAS" in " ".join(out[1:])
    res = subprocess.run([sys.executable, "-c", "import nbalex.cpu.workers"], capture_output=True,
                         text=True, env=dict(os.environ, NBALEX_BLAS_THREADS="spin"))
    assert res.returncode != 0 and "NBALEX_BLAS_THREADS must be 'pool' or 'openblas'" in res.stderr
