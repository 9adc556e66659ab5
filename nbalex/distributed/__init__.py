"""Data parallelism across processes: the process group and the gradient allreduce.

nbalex runs as N ranks under ``mpiexec -n N`` or ``srun`` (synchronous data-parallel SGD), or
as one process when started alone, in which case nothing here imports MPI and nothing changes.

* :mod:`~nbalex.distributed.launcher` reads the launcher's variables (Open MPI, MPICH/Hydra,
  Slurm, PMIx): rank, size, local rank and local size, with no MPI imported.
* :mod:`~nbalex.distributed.world` is the process group: :func:`~.world.init`,
  :func:`~.world.size_threads` (first, before numba is imported), failure handling (an error on
  any rank ends the job with one line naming the rank) and the agreements a step boundary
  needs (:meth:`~.world.World.any_flag`, :meth:`~.world.World.check_same`,
  :meth:`~.world.World.sum`).
* :mod:`~nbalex.distributed.reduce` averages the flat host gradient buffer (CPU backend) with
  MPI's non-blocking collectives, bucketed in backward order, in a fixed summation order.
* :mod:`~nbalex.distributed.nccl` does the same for device buffers (CUDA backend) with NCCL on
  its own stream, guarded by :mod:`~nbalex.distributed.watchdog`; imported only when used.

How ``nbalex train`` uses it
----------------------------
1. ``world.init()`` then ``world.size_threads(w)`` at the top of the command, before numba is
   imported: each rank gets its share of the node's cores.  Under ``--backend cuda`` a rank
   takes GPU ``local_rank`` (or ``local_rank * towers + t`` with ``--gpus`` towers).
2. ``--batch-size`` is the global batch B and must divide by N (refused with one line).  The
   loader walks the epoch in the order one process would use; rank r takes rows
   ``[r*B/N, (r+1)*B/N)`` of every global batch, with the augmentation draws of the global
   batch sliced the same way and dropout masks hashed on each element's global index, so the
   same images and draws meet the same step whatever N is.
3. Backward runs layer by layer from the last; after a layer's backward-weights its bucket is
   started (:meth:`HostAllreduce.start` / ``NcclAllreduce.start``), ``progress()`` runs between
   layers, ``wait()`` before the update.  Each rank's gradient is the mean over its B/N rows,
   so the average over ranks is the mean over the global batch.
4. Every rank applies the same SGD update to identical parameters; they stay identical, and
   ``check_same`` on the flat parameter buffer at every checkpoint stops the job if not.
5. Rank 0 alone writes checkpoints (atomically), ``log.jsonl``, figures and progress; every
   rank resumes from the checkpoint, whose loader position is the global one.
6. At each step boundary the ranks agree: ``any_flag`` on a stop request (Ctrl-C, SIGTERM) or
   a NaN loss, ``sum`` of loss and correct counts for the log and for validation (which is
   split across ranks like training).  A decision taken on one rank is taken on all.
7. ``w.run(main)`` wraps the command: an exception or an error exit on any rank aborts the
   whole job within seconds (``MPI_Abort``), never leaving the others in a collective.
"""
