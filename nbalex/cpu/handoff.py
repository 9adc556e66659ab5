"""A helper thread that runs the jobs handed to it one at a time, asleep between them.

Both of the CPU backend's thread pools are made of these: the thread team that runs the
kernels' shares (:mod:`nbalex.cpu.workers`) and the pool that runs OpenBLAS's parallel jobs
(:mod:`nbalex.cpu.openblas`).  The handoff is a pair of plain locks used as binary
semaphores (held = "not yet"): a C-level wake-up, several times cheaper than
``threading.Semaphore``'s Condition.  Waiting for a job rides out KeyboardInterrupt and its
subclasses (the stop signals' exceptions): the job writes the caller's memory, so the wait
is never cut short, and the interrupt is handed back once the job has ended.
"""

import _thread
import threading


def _held_lock():
    lock = _thread.allocate_lock()
    lock.acquire()
    return lock


class Helper:
    """One daemon thread; :meth:`start` hands it a job (a callable), :meth:`wait` waits for
    the job's end.  The job's own exception is kept in ``error`` (None when it returned)."""

    def __init__(self, name):
        self._go, self._done = _held_lock(), _held_lock()
        self._job, self._finished, self.error = None, True, None
        threading.Thread(target=self._serve, daemon=True, name=name).start()

    def _serve(self):
        while True:
            self._go.acquire()
            job, self._job = self._job, None
            try:
                job()
            except BaseException as error:     # handed to whoever waits
                self.error = error
            finally:
                self._finished = True
                self._done.release()

    def start(self, job):
        """Hand ``job`` to the thread (the previous one must have been waited for)."""
        self._finished, self.error, self._job = False, None, job
        self._go.release()

    def wait(self):
        """Wait until the job has ended; returns the KeyboardInterrupt (or subclass) that came
        meanwhile, or None.  The done lock is left held: a release still pending is taken,
        and a stale one (left by a wait an interrupt cut short) only costs one more pass
        round the loop; re-acquiring after an interrupt that came just after the acquire
        succeeded would wait forever."""
        interrupted = None
        while not self._finished:
            try:
                self._done.acquire()
            except KeyboardInterrupt as error:
                interrupted = error
        self._done.acquire(blocking=False)
        return interrupted
