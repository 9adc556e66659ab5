"""What ``nbalex train`` does differently as one of N ranks (synchronous data parallelism).

:class:`Ranks` wraps the process group (:mod:`nbalex.distributed.world`) with the training
loop's decisions, so that :mod:`nbalex.train` reads the same with one process or N:

* ``--batch-size`` is the global batch B; it must divide by N (:meth:`Ranks.local_batch`,
  one-line ValueError otherwise); each rank's network is sized for B/N.
* Rank 0 alone reports (:meth:`Ranks.report`), shows progress and writes the run folder.
* :meth:`Ranks.agree_step`: after each step one collective sums (loss x images, images, "my
  update was not finite", "a stop was requested here"), so the logged loss is the global
  batch's and a divergence or a stop request on any rank stops every rank at the same step.
* :meth:`Ranks.any` agrees on a single flag elsewhere (before validation, between epochs).
* :meth:`Ranks.check_params`: crc32 of the parameters compared across ranks at every
  checkpoint (DriftError, raised on every rank, ends the job).
* :meth:`Ranks.check_same_ranks`: a run resumed with another N warns (it continues, but not
  bit for bit: the gradient average is summed in another order).

In a world of one every method is a cheap local no-op, and nothing imports MPI.
"""

import numpy as np


class Ranks:
    """The training loop's view of ``world`` (see the module docstring)."""

    def __init__(self, world):
        self.world = world
        self.rank, self.size, self.is_root = world.rank, world.size, world.is_root
        self._sums = np.zeros(4, np.float64)

    def local_batch(self, batch_size):
        """B/N, or ValueError (one line) when the global batch does not divide by N."""
        if batch_size % self.size:
            raise ValueError(f"--batch-size {batch_size} does not divide over {self.size} ranks: "
                             f"each rank takes an equal share of the global batch; choose a "
                             f"multiple of {self.size}")
        return batch_size // self.size

    def gpus(self, gpus, backend, given):
        """This rank's GPUs: by default GPU ``local_rank``; with ``--gpus`` of T towers, those
        T numbers shifted by ``local_rank * T`` (so 2 ranks x ``--gpus 0,1`` use GPUs 0-3)."""
        if self.size == 1 or backend != "cuda":
            return tuple(gpus)
        shift = self.world.local_rank * len(gpus) if given else self.world.local_rank
        return tuple(g + shift for g in gpus)

    def report(self, report):
        """``report`` on rank 0; a function that drops the line elsewhere."""
        return report if self.is_root else (lambda line: None)

    def grad_sync(self, net):
        """A :class:`~nbalex.distributed.sync.GradSync` for ``net``, or None in a world of one."""
        if self.size == 1:
            return None
        from nbalex.distributed.sync import GradSync
        return GradSync(self.world, net)

    def shard(self):
        return (self.rank, self.size)

    def any(self, flag):
        """True on every rank when ``flag`` is true on any (a collective)."""
        return self.world.any_flag(flag) if self.size > 1 else bool(flag)

    def agree_step(self, loss, images, bad_update, stop):
        """(global mean loss, global images, any bad update, any stop request) of a step."""
        if self.size == 1:
            return float(loss), int(images), bool(bad_update), bool(stop)
        self._sums[:] = (float(loss) * images, images, bool(bad_update), bool(stop))
        total = self.world.sum(self._sums)
        count = int(total[1])
        return float(total[0] / max(count, 1)), count, total[2] > 0, total[3] > 0

    def check_params(self, net):
        """crc32 of every parameter's bytes, the same on every rank (else DriftError)."""
        from nbalex.distributed.world import checksum
        params = net.params()
        flat = np.concatenate([np.ravel(params[name]) for name in net.param_names()])
        return self.world.check_same(flat, "parameters") if self.size > 1 else checksum(flat)

    def check_same_ranks(self, stored, report):
        """On resume: warn when the run was saved with another number of ranks."""
        stored = 1 if stored is None else int(stored)
        if stored != self.size:
            report(f"warning: the run was saved with {stored} rank{'s' if stored > 1 else ''} "
                   f"and resumes with {self.size}: it continues, but not bit for bit (the "
                   f"gradient average is summed in another order)")
