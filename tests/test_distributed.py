"""nbalex.distributed: launcher detection, the process group, the bucketed allreduce, faults.

The MPI tests launch real ``mpiexec -n 2`` (and ``-n 3 --oversubscribe``) jobs of small
programs written here; they are skipped, saying why, when the venv has no mpiexec or mpi4py
(``pip install -e '.[mpi]'``, which ``make install`` does).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from nbalex.distributed.launcher import LauncherError, Launch, detect, slurm_tasks_on_node
from nbalex.distributed.watchdog import Watchdog
from nbalex.distributed.world import thread_share

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
HAVE_MPI = MPIEXEC.exists() and importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason=f"needs {MPIEXEC} and mpi4py "
                               "(pip install -e '.[mpi]')")
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_LOCAL", "PRTE_")


def clean_env(**extra):
    """This process's environment without launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def python(program, tmp_path, env=None, timeout=60):
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(program))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          env=env or clean_env(), timeout=timeout)


def mpirun(n, program, tmp_path, args=(), timeout=60):
    path = tmp_path / f"mpi_{n}.py"
    path.write_text(textwrap.dedent(program))
    cmd = [str(MPIEXEC), "-n", str(n)] + (["--oversubscribe"] if n > 2 else [])
    return subprocess.run(cmd + [sys.executable, str(path), *map(str, args)],
                          capture_output=True, text=True, env=clean_env(), timeout=timeout)


# -- launcher detection: environment fakes, no MPI -----------------------------------------

def test_detect_each_launcher_from_its_variables():
    assert detect({}) is None
    assert detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
                   "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                   "PMIX_RANK": "1"}) == Launch("Open MPI", 1, 4, 1, 2)
    assert detect({"PMI_RANK": "3", "PMI_SIZE": "8", "MPI_LOCALRANKID": "0",
                   "MPI_LOCALNRANKS": "4"}) == Launch("MPICH", 3, 8, 0, 4)
    assert detect({"PMI_RANK": "0", "PMI_SIZE": "2"}) == Launch("MPICH", 0, 2, None, None)
    srun = {"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "7", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "3", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NTASKS": "7"}
    assert detect(srun) == Launch("Slurm", 6, 7, 0, 1)
    assert detect({"PMIX_RANK": "2"}) == Launch("PMIx", 2, None, None, None)


def test_a_batch_script_is_not_a_launch():
    # sbatch gives its script SLURM_PROCID=0 and SLURM_NTASKS, but only srun starts ranks
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}) is None


def test_slurm_tasks_per_node_list():
    assert [slurm_tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert slurm_tasks_on_node("8", 0) == 8
    with pytest.raises(LauncherError, match="node 4"):
        slurm_tasks_on_node("2(x3),1", 4)


@pytest.mark.parametrize("env, message", [
    ({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK='x'"),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"}, "rank 2 of 2"),
    ({"PMI_RANK": "0", "PMI_SIZE": "0"}, "PMI_SIZE='0' must be at least 1"),
])
def test_malformed_launcher_variables_are_one_line_errors(env, message):
    with pytest.raises(LauncherError, match=message):
        detect(env)


def test_thread_share():
    # bound by the launcher to one core each: keep it
    assert [thread_share([r], [[0], [1]], r) for r in (0, 1)] == [1, 1]
    # two ranks sharing 3 cores: 2 and 1; three ranks on 2 cores: never 0
    assert [thread_share([0, 1, 2], [[0, 1, 2]] * 2, r) for r in (0, 1)] == [2, 1]
    assert [thread_share([0, 1], [[0, 1]] * 3, r) for r in (0, 1, 2)] == [1, 1, 1]
    # 16 cores, 4 ranks unbound
    assert thread_share(range(16), [range(16)] * 4, 3) == 4


# -- a world of one, and a launcher without mpi4py ------------------------------------------

def test_outside_a_launcher_a_world_of_one_imports_no_mpi(tmp_path):
    out = python("""
        import sys, numpy as np
        from nbalex.distributed import world
        from nbalex.distributed.reduce import HostAllreduce
        w = world.init()
        g = np.arange(10, dtype=np.float32); before = g.copy()
        r = HostAllreduce(w, g, [(5, 10), (0, 5)])
        r.start(1); r.start(0); r.progress(); r.wait()
        assert np.array_equal(g, before)
        assert (w.rank, w.size, w.local_rank, w.local_size) == (0, 1, 0, 1)
        assert world.size_threads(w) is None and w.any_flag(True) and not w.any_flag(False)
        assert w.sum([1.5, 2]).tolist() == [1.5, 2.0]
        w.check_same(g)
        assert "mpi4py" not in sys.modules, "mpi4py imported outside a launcher"
        print("ok")
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("rank", [0, 1])
def test_under_a_launcher_without_mpi4py_refuses_in_one_line(tmp_path, rank):
    env = clean_env(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2")
    out = python("""
        import sys
        sys.modules["mpi4py"] = None          # as if it were not installed
        from nbalex.distributed import world
        world.init_or_exit()
        print("ran anyway")
    """, tmp_path, env=env)
    assert out.returncode == 2
    assert "ran anyway" not in out.stdout
    lines = out.stderr.strip().splitlines()
    if rank == 0:
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith("Error: started by Open MPI as rank 0 of 2")
        assert "mpi4py is not installed" in lines[0] and "nbalex[mpi]" in lines[0]
    else:
        assert lines == []  # rank 0 says it once for the job


# -- the allreduce under mpiexec ------------------------------------------------------------

ALLREDUCE = """
    import hashlib, sys, time
    import numpy as np
    from nbalex.distributed import world
    from nbalex.distributed.reduce import HostAllreduce
    from nbalex.distributed.nccl import exchange_id

    w = world.init()
    world.size_threads(w)
    n, N = 100003, w.size
    rng = np.random.default_rng(7)
    # every rank's gradients, of mixed magnitudes so that the summation order shows in the bits
    every = (rng.standard_normal((N, n)) * 10.0 ** rng.uniform(-4, 4, (N, n))).astype(np.float32)
    grads = every[w.rank].copy()
    expected = every[0].copy()
    for r in range(1, N):
        expected = expected + every[r]
    expected = expected / np.float32(N)
    if N == 3:  # the check is sharp: another order gives other bits
        assert not np.array_equal(expected, (every[2] + every[1] + every[0]) / np.float32(3))

    buckets = [(70001, n), (3, 70001), (1, 3), (0, 1)]     # backward order, last layer first
    reducer = HostAllreduce(w, grads, buckets)
    for step in range(2):
        grads[:] = every[w.rank]
        # progress alone completes a bucket, before wait
        reducer.start(0)
        deadline = time.monotonic() + 20
        while not reducer.done(0) and time.monotonic() < deadline:
            reducer.progress()
        assert reducer.done(0), "progress() did not complete a started bucket"
        assert np.array_equal(grads[70001:], expected[70001:])
        # the others started in an order that differs between ranks
        order = [1, 2, 3][w.rank % 3:] + [1, 2, 3][:w.rank % 3]
        for b in order:
            reducer.start(b)
            reducer.progress()
        reducer.wait()
        assert np.array_equal(grads, expected), "allreduce differs from the rank-order sum"
    w.check_same(grads, "gradients")

    # agreement helpers
    assert w.any_flag(w.rank == N - 1) and not w.any_flag(False)
    assert w.sum([1.0, w.rank]).tolist() == [float(N), float(N * (N - 1) // 2)]
    drifted = grads.copy()
    drifted[5] += np.float32(w.rank)                     # rank 0 keeps its value
    try:
        w.check_same(drifted, "parameters")
        raise SystemExit("drift not caught")
    except world.DriftError as error:
        who = ", ".join(str(r) for r in range(1, N))
        assert f"parameters differ across ranks: rank{'s' if N > 2 else ''} {who} " in str(error)

    # the NCCL id exchange, with a stand-in id made on rank 0
    ident = exchange_id(w, lambda: bytes(np.random.default_rng().integers(0, 256, 128, np.uint8)))
    assert len(ident) == 128
    assert len(set(w.comm.allgather(ident))) == 1
    reducer.close()
    if w.rank == 0:
        print("digest", hashlib.sha256(grads.tobytes()).hexdigest())
"""


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_allreduce_is_the_rank_order_average_and_repeats_bit_for_bit(tmp_path, n):
    digests = []
    for _ in range(2):
        out = mpirun(n, ALLREDUCE, tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        digests += [line.split()[1] for line in out.stdout.splitlines()
                    if line.startswith("digest")]
    assert len(digests) == 2 and digests[0] == digests[1]


FAILING = """
    import sys, time
    from nbalex.distributed import world
    w = world.init()
    def main(how):
        if w.rank == 1:
            time.sleep(0.3)
            if how == "raise":
                raise ValueError("boom on purpose")
            if how == "exit":
                sys.exit(3)
        w.barrier()         # rank 0 waits for rank 1 in a collective: it would hang forever
        print("rank 0 passed the barrier")
    if sys.argv[1] == "escape":     # outside run(): the excepthook that init() installs
        if w.rank == 1:
            time.sleep(0.3)
            raise KeyError("escaped")
        w.barrier()
    w.run(main, sys.argv[1])
"""


@needs_mpi
@pytest.mark.parametrize("how, line", [("raise", "Error: rank 1 of 2: ValueError: boom on purpose"),
                                       ("exit", "Error: rank 1 of 2: exited with status 3"),
                                       ("escape", "Error: rank 1 of 2: KeyError: 'escaped'")])
def test_a_failing_rank_ends_the_whole_job_with_one_line(tmp_path, how, line):
    t0 = time.monotonic()
    out = mpirun(2, FAILING, tmp_path, args=[how], timeout=60)
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert "passed the barrier" not in out.stdout
    # the launcher's own notice may share a line with ours (its output is not line-atomic)
    text = out.stdout + out.stderr
    assert text.count("Error: rank") == 1 and text.count(line + "\n") == 1, text
    assert elapsed < 30, f"the job took {elapsed:.1f} s to end"


# -- the watchdog -------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_watchdog_fires_once_for_late_work_and_never_for_finished_work():
    clock, fired, state = FakeClock(), [], {"a": False, "b": False}
    dog = Watchdog(10.0, lambda label, waited: fired.append((label, waited)), clock=clock,
                   autostart=False)
    dog.arm("a", lambda: state["a"])
    clock.now += 5
    dog.arm("b", lambda: state["b"])
    assert dog.check() is None and fired == []
    state["a"] = True                     # a finishes in time: dropped
    clock.now += 6                        # 11 s after a, 6 s after b
    assert dog.check() is None and dog.pending() == ["b"]
    clock.now += 4.5                      # b is 10.5 s old
    assert dog.check() == "b"
    assert fired == [("b", pytest.approx(10.5))]
    clock.now += 100
    assert dog.check() is None and len(fired) == 1


def test_watchdog_thread_aborts_within_its_timeout():
    fired = []
    dog = Watchdog(0.2, lambda label, waited: fired.append(label), poll_s=0.01)
    t0 = time.monotonic()
    dog.arm("stuck collective", lambda: False)
    while not fired and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    dog.stop()
    assert fired == ["stuck collective"] and time.monotonic() - t0 < 5


def test_watchdog_refuses_a_non_positive_timeout():
    with pytest.raises(ValueError, match="positive"):
        Watchdog(0, lambda *a: None)


# -- the NCCL path's order of calls (simulator, stand-in communicator) ------------------------

def test_nccl_allreduce_orders_calls_on_its_own_stream(tmp_path):
    out = python("""
        import numpy as np
        from numba import cuda
        from nbalex.distributed.world import World
        from nbalex.distributed.nccl import NcclAllreduce

        calls = []
        class Comm:
            def allreduce(self, send, recv, op, stream):
                calls.append(("allreduce", send.shape[0], send is recv, op, stream))
            def abort(self):
                calls.append(("abort",))
        class FakeWorld(World):
            def abort(self, message, code=1):
                calls.append(("world.abort", message))

        grads = cuda.to_device(np.zeros(10, np.float32))
        compute = cuda.stream()
        r = NcclAllreduce(FakeWorld(), grads, [(6, 10), (0, 6)], communicator=Comm(),
                          average="avg")
        assert r.stream is not compute
        r.start(0, compute); r.start(1, compute); r.progress(); r.wait(compute)
        assert calls == [("allreduce", 4, True, "avg", r.stream),
                         ("allreduce", 6, True, "avg", r.stream)], calls
        for bad in (lambda: r.wait(compute), lambda: (r.start(0, compute), r.start(0, compute))):
            try:
                bad(); raise SystemExit("not refused")
            except RuntimeError as e:
                assert "never started" in str(e) or "twice" in str(e)
        calls.clear()
        r._timed_out("allreduce of bucket 1", 300.0)
        assert calls[0] == ("abort",) and "bucket 1 has not finished after 300 s" in calls[1][1]
        r.close()
        print("ok")
    """, tmp_path, env=clean_env(NUMBA_ENABLE_CUDASIM="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
