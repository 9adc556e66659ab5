"""Which launcher started this process, read from its variables alone (no MPI is imported).

``detect(environ)`` returns a :class:`Launch` (launcher name, rank, size, local rank, local
size) or ``None`` when no launcher variables are set.  The variables, first match wins:

===========  ===========================  ==============================  =========================
launcher     rank / size                  local rank / local size         notes
===========  ===========================  ==============================  =========================
Open MPI     OMPI_COMM_WORLD_RANK / _SIZE OMPI_COMM_WORLD_LOCAL_RANK /     ``mpiexec``, ``mpirun``
                                          _LOCAL_SIZE
MPICH/Hydra  PMI_RANK / PMI_SIZE          MPI_LOCALRANKID /               also Intel MPI
                                          MPI_LOCALNRANKS
Slurm        SLURM_PROCID /               SLURM_LOCALID / this node's     ``srun`` only: a batch
             SLURM_STEP_NUM_TASKS         entry of SLURM_STEP_TASKS_      script (``sbatch``) sets
                                          PER_NODE                        no SLURM_STEP_NUM_TASKS
PMIx         PMIX_RANK / (unknown)        (unknown)                       size comes from MPI
===========  ===========================  ==============================  =========================

A value that is unknown from the environment is ``None``; MPI fills it in once initialised.
Malformed values raise :class:`LauncherError` (one line naming the variable).
"""

import os
from dataclasses import dataclass


class LauncherError(RuntimeError):
    """A launcher variable that cannot be read, or a launcher without the means to join it."""


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process. ``None`` where the environment does not say."""

    launcher: str
    rank: int
    size: int | None
    local_rank: int | None
    local_size: int | None


def _int(environ, name, minimum=0):
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise LauncherError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise LauncherError(f"{name}={raw!r} must be at least {minimum}")
    return value


def slurm_tasks_on_node(tasks_per_node, node_id):
    """Tasks on node ``node_id`` from Slurm's compressed list, e.g. ``"2(x3),1"`` -> 2,2,2,1."""
    counts = []
    for part in tasks_per_node.split(","):
        part = part.strip()
        try:
            if "(x" in part:
                n, rep = part.rstrip(")").split("(x")
                counts.extend([int(n)] * int(rep))
            else:
                counts.append(int(part))
        except ValueError:
            raise LauncherError(f"cannot read Slurm tasks per node {tasks_per_node!r}") from None
    if not 0 <= node_id < len(counts):
        raise LauncherError(f"Slurm node {node_id} is not in tasks per node {tasks_per_node!r}")
    return counts[node_id]


def detect(environ=None):
    """The :class:`Launch` described by ``environ`` (default ``os.environ``), or ``None``."""
    launch = _read(os.environ if environ is None else environ)
    if launch is not None:
        for index, count, what in ((launch.rank, launch.size, "rank"),
                                   (launch.local_rank, launch.local_size, "local rank")):
            if index is not None and count is not None and index >= count:
                raise LauncherError(f"{launch.launcher} gives {what} {index} of {count}")
    return launch


def _read(env):
    if "OMPI_COMM_WORLD_RANK" in env:
        return Launch("Open MPI", _int(env, "OMPI_COMM_WORLD_RANK"),
                      _int(env, "OMPI_COMM_WORLD_SIZE", 1),
                      _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
                      _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1))
    if "PMI_RANK" in env:
        return Launch("MPICH", _int(env, "PMI_RANK"), _int(env, "PMI_SIZE", 1),
                      _int(env, "MPI_LOCALRANKID"), _int(env, "MPI_LOCALNRANKS", 1))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        local_size = None
        per_node, node = env.get("SLURM_STEP_TASKS_PER_NODE"), _int(env, "SLURM_NODEID")
        if per_node and node is not None:
            local_size = slurm_tasks_on_node(per_node, node)
        return Launch("Slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS", 1),
                      _int(env, "SLURM_LOCALID"), local_size)
    if "PMIX_RANK" in env:
        return Launch("PMIx", _int(env, "PMIX_RANK"), None, None, None)
    return None
