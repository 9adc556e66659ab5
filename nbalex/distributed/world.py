"""The process group: who this process is, how many threads it gets, and how ranks agree.

Call order at the top of an entry point, before anything imports numba::

    from nbalex.distributed import world
    w = world.init()          # a world of 1 outside a launcher (mpi4py is not imported)
    world.size_threads(w)     # this rank's share of the node's cores, for Numba, OpenMP, BLAS
    w.run(main)               # an error on any rank ends the whole job, one line naming it

``init`` reads the launcher from its variables (:mod:`nbalex.distributed.launcher`).  Outside
a launcher, or under one that started a single process, it returns a world of one: nothing is
imported and every helper below is a cheap local no-op.  Under a launcher of several processes
it needs mpi4py (``pip install 'nbalex[mpi]'``) and refuses with :class:`LauncherError`, one
line, when it is missing or when mpi4py's MPI does not see the launcher's world (an mpi4py
built for another MPI would give N single-process worlds racing on one checkpoint).

The agreement helpers are collectives: every rank calls them at the same step boundary.
"""

import os
import sys
import time
import traceback
import zlib

import numpy as np

from nbalex.distributed.launcher import LauncherError, detect

THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")
"""The variables :func:`size_threads` sets (each only where the user has not set it)."""


ALIKE_GRACE_S = 3.0
"""How long a rank other than 0 waits, on an error all ranks meet alike, for rank 0's abort."""


class DriftError(RuntimeError):
    """Ranks that should hold identical buffers do not (raised on every rank alike)."""


def thread_share(my_cpus, local_cpus, local_rank):
    """Threads for local rank ``local_rank`` given each local rank's CPU set (its affinity).

    Ranks whose CPU sets overlap this one's share its CPUs equally (the first ones get the
    remainder); a rank the launcher bound to its own cores keeps all of them.  At least 1.
    """
    mine = set(my_cpus)
    sharers = [r for r, cpus in enumerate(local_cpus) if mine & set(cpus)]
    if local_rank not in sharers:
        sharers = sorted(sharers + [local_rank])
    base, extra = divmod(len(mine), len(sharers))
    return max(1, base + (sharers.index(local_rank) < extra))


def checksum(buffer):
    """crc32 of a C-contiguous array's bytes (bit-exact: -0.0 and 0.0 differ, so do NaNs)."""
    array = np.ascontiguousarray(buffer)
    return zlib.crc32(memoryview(array.reshape(-1).view(np.uint8)))


def _one_line(text):
    return " ".join(str(text).split())


class World:
    """This process's place in the job: ``rank`` of ``size``, ``local_rank`` of ``local_size``
    on its node, ``threads`` (its share of the node's cores), ``comm`` (mpi4py's
    ``COMM_WORLD``, or ``None`` in a world of one), ``launcher`` (its name, or ``None``)."""

    def __init__(self, comm=None, launcher=None, local_rank=0, local_size=1, threads=None):
        self.comm = comm
        self.launcher = launcher
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_rank, self.local_size = local_rank, local_size
        self.threads = threads
        self._flag = np.zeros(1, np.int32)

    @property
    def is_root(self):
        """True on rank 0, the rank that writes checkpoints, logs and figures."""
        return self.rank == 0

    def __repr__(self):
        return (f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"local_size={self.local_size}, launcher={self.launcher!r})")

    # -- agreement at a step boundary (collectives: every rank calls them) -----------------

    def any_flag(self, flag):
        """True on every rank if ``flag`` is true on any rank (a stop request, a NaN loss)."""
        self._flag[0] = 1 if flag else 0
        if self.comm is not None:
            from mpi4py import MPI
            self.comm.Allreduce(MPI.IN_PLACE, self._flag, op=MPI.MAX)
        return bool(self._flag[0])

    def sum(self, values):
        """Sum of ``values`` (numbers or an array: losses, correct counts) over ranks, float64.

        Summed in rank order 0..N-1 after an allgather, so the result has the same bits on
        every rank and in every run with the same N (MPI's own reductions promise no order).
        """
        local = np.asarray(values, dtype=np.float64)
        if self.comm is None:
            return local.copy()
        flat = np.ascontiguousarray(local.reshape(-1))
        gathered = np.empty((self.size, flat.size), np.float64)
        self.comm.Allgather(flat, gathered)
        total = gathered[0].copy()
        for r in range(1, self.size):
            total += gathered[r]
        return total.reshape(local.shape)

    def check_same(self, buffer, what="parameters"):
        """Raise :class:`DriftError` on every rank unless ``buffer`` has the same bits on all.

        Compares :func:`checksum` (crc32) across ranks; the error names the ranks whose
        buffer differs from rank 0's.  Returns the checksum.
        """
        mine = checksum(buffer)
        if self.comm is None:
            return mine
        sums = self.comm.allgather(mine)
        drifted = [r for r, s in enumerate(sums) if s != sums[0]]
        if drifted:
            ranks = ", ".join(str(r) for r in drifted)
            raise DriftError(f"{what} differ across ranks: rank{'s' if len(drifted) > 1 else ''} "
                             f"{ranks} disagree{'' if len(drifted) > 1 else 's'} with rank 0 "
                             f"(crc32 {' '.join(f'{s:08x}' for s in sums)})")
        return mine

    def broadcast_bytes(self, data, nbytes, root=0):
        """``data`` (``nbytes`` bytes, given on ``root`` only) on every rank, as bytes."""
        buf = np.zeros(nbytes, np.uint8)
        if self.rank == root:
            raw = bytes(data)
            if len(raw) != nbytes:
                raise ValueError(f"broadcast_bytes: {len(raw)} bytes given, {nbytes} expected")
            buf[:] = np.frombuffer(raw, np.uint8)
        if self.comm is not None:
            self.comm.Bcast(buf, root=root)
        return buf.tobytes()

    def barrier(self):
        if self.comm is not None:
            self.comm.Barrier()

    # -- failure: one rank's error ends the job -------------------------------------------

    def abort(self, message, code=1, alike=False):
        """Print ``Error: rank R of N: message`` (one line) and end the whole job now.

        Under MPI this is ``MPI_Abort``: every rank is killed by the launcher, none is left
        waiting in a collective or in finalize.  In a world of one it exits the process.
        ``alike``: an error every rank probably meets alike (a bad option, a batch that does
        not divide): ranks other than 0 wait :data:`ALIKE_GRACE_S` for rank 0's abort to end
        them, so the job says it once; a rank whose error was its own still speaks then.
        """
        if alike and self.comm is not None and self.rank != 0:
            time.sleep(ALIKE_GRACE_S)
        if os.environ.get("NBALEX_TRACEBACK") and sys.exc_info()[0] is not None:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.write(f"Error: rank {self.rank} of {self.size}: {_one_line(message)}\n")
        sys.stderr.flush()
        code = code if isinstance(code, int) and 0 < code < 256 else 1
        if self.comm is not None:
            self.comm.Abort(code)
        os._exit(code)

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; in a world of several ranks, any exception or non-zero
        ``SystemExit`` aborts the job (:meth:`abort`).  In a world of one it changes nothing."""
        if self.comm is None:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except SystemExit as exit_:
            if exit_.code in (None, 0):
                raise
            if isinstance(exit_.code, int):
                self.abort(f"exited with status {exit_.code}", exit_.code)
            self.abort(exit_.code)
        except KeyboardInterrupt:
            self.abort("interrupted", 130)
        except BaseException as error:  # noqa: BLE001 - every error must end the job
            self.abort(f"{type(error).__name__}: {error}")

    def install_excepthook(self):
        """Make an exception that escapes to the interpreter abort the job (a safety net
        for code outside :meth:`run`)."""
        if self.comm is None:
            return

        def hook(kind, error, tb):
            self.abort(f"{kind.__name__}: {error}", 130 if kind is KeyboardInterrupt else 1)

        sys.excepthook = hook


_WORLD = None


def init(environ=None):
    """The process group, created on the first call (later calls return the same World).

    Raises :class:`LauncherError` under a launcher of several processes when mpi4py is
    missing or its MPI sees another world than the launcher's.
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    launch = detect(environ)
    if launch is None or launch.size == 1:
        _WORLD = World()
        return _WORLD
    where = f"started by {launch.launcher} as rank {launch.rank}" + (
        f" of {launch.size}" if launch.size else "")
    try:
        from mpi4py import MPI
    except ImportError:
        raise LauncherError(f"{where}, but mpi4py is not installed: pip install 'nbalex[mpi]' "
                            f"(or run without {launch.launcher})") from None
    comm = MPI.COMM_WORLD
    if launch.size is not None and (comm.Get_size(), comm.Get_rank()) != (launch.size,
                                                                          launch.rank):
        raise LauncherError(f"{where}, but MPI sees rank {comm.Get_rank()} of "
                            f"{comm.Get_size()}: mpi4py was built for another MPI than the "
                            f"launcher's ({MPI.Get_library_version().splitlines()[0].strip()})")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    my_cpus = sorted(os.sched_getaffinity(0))
    threads = thread_share(my_cpus, local.allgather(my_cpus), local.Get_rank())
    _WORLD = World(comm, launch.launcher, local.Get_rank(), local.Get_size(), threads)
    local.Free()
    _WORLD.install_excepthook()
    return _WORLD


def init_or_exit(environ=None):
    """:func:`init`, or ``Error: ...`` (one line, printed by rank 0 alone) and exit status 2."""
    try:
        return init(environ)
    except LauncherError as error:
        try:
            launch = detect(environ)
        except LauncherError:
            launch = None
        if launch is None or launch.rank == 0:
            sys.stderr.write(f"Error: {_one_line(error)}\n")
        sys.exit(2)


def size_threads(world, environ=None):
    """Set the thread variables to ``world.threads`` unless the user set them; return it.

    Must run before numba (or a BLAS) is loaded: they read these variables once, when
    loaded.  Raises RuntimeError if numba is already imported.  A world of one is left as is
    (returns ``None``).
    """
    if world.size == 1 or world.threads is None:
        return None
    if "numba" in sys.modules:
        raise RuntimeError("size_threads() must be called before numba is imported")
    env = os.environ if environ is None else environ
    for name in THREAD_VARIABLES:
        env.setdefault(name, str(world.threads))
    return world.threads
