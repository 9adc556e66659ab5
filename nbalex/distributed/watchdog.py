"""A watchdog for work that can hang forever: a collective whose peer died.

NCCL has no timeout of its own: a kernel waiting for a dead peer spins until the job is killed.
:class:`Watchdog` keeps a list of armed items, each a label, a ``done()`` poll (e.g. a CUDA
event's ``query``) and a deadline; a daemon thread polls them, drops those done, and calls
``on_timeout(label, waited_seconds)`` once for the first that passes its deadline (typically:
abort the NCCL communicator, then abort the MPI job with one line naming the rank).  After a
timeout the watchdog stops; it never fires twice.

:meth:`Watchdog.check` is one poll, so a test drives it with a fake clock and no thread.
"""

import threading
import time


class Watchdog:
    """Calls ``on_timeout(label, waited)`` when an armed item is not done within ``timeout_s``.

    ``clock`` (default ``time.monotonic``) and ``poll_s`` are for tests; ``thread_setup`` runs
    first in the thread (e.g. making a CUDA context current there).  The thread starts
    on :meth:`start` (or the first :meth:`arm` when ``autostart``); :meth:`stop` ends it.
    """

    def __init__(self, timeout_s, on_timeout, clock=time.monotonic, poll_s=0.05, autostart=True,
                 thread_setup=None):
        if not timeout_s > 0:
            raise ValueError(f"watchdog timeout must be positive, got {timeout_s}")
        self.timeout_s, self.on_timeout = float(timeout_s), on_timeout
        self.clock, self.poll_s, self.autostart = clock, poll_s, autostart
        self.thread_setup = thread_setup
        self.fired = None
        self._items = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def arm(self, label, done):
        """Watch ``done()`` (a callable returning True when the work finished)."""
        with self._lock:
            self._items.append((label, done, self.clock() + self.timeout_s))
        if self.autostart and self._thread is None:
            self.start()

    def pending(self):
        """Labels armed and not yet seen done."""
        with self._lock:
            return [label for label, _, _ in self._items]

    def check(self):
        """One poll: drop items that are done; fire on the first past its deadline.

        Returns the label it fired for, or ``None``.
        """
        if self.fired is not None:
            return None
        now = self.clock()
        with self._lock:
            items = list(self._items)
        late = None
        still = []
        for item in items:
            label, done, deadline = item
            if done():
                continue
            still.append(item)
            if late is None and now >= deadline:
                late = (label, now - deadline + self.timeout_s)
        with self._lock:
            self._items = [i for i in self._items if i in still or i not in items]
        if late is None:
            return None
        self.fired = late[0]
        self._stop.set()
        self.on_timeout(*late)
        return late[0]

    def _loop(self):
        if self.thread_setup is not None:
            self.thread_setup()  # e.g. make the GPU's context current in this thread
        while not self._stop.wait(self.poll_s):
            self.check()

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nbalex-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
