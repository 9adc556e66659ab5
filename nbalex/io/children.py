"""Worker processes that never outlive their parent and leave signals to it.

Every worker process nbalex starts (pack's decoders, the loader's readers) runs
:func:`worker_init` first, with the parent's pid, and is created from :func:`context`:

* On Linux the kernel sends the worker SIGKILL when its parent dies, even by ``kill -9``
  (``prctl(PR_SET_PDEATHSIG)``).  The kernel ties this to the parent *thread* that started
  the worker, so start workers from a thread that lives as long as they are used (the main
  thread, in nbalex).  Elsewhere a daemon thread polls the parent's pid once a second.
  A worker whose parent died before the prctl took effect exits at once.
* SIGINT, SIGTERM, SIGHUP and SIGUSR1 are ignored: Ctrl-C and a scheduler's signals, often
  sent to the whole process group, are the main process's to handle (save, clean up, stop
  its workers).
* Because workers ignore SIGTERM, ``terminate()`` on a process of :func:`context` sends
  SIGKILL, so a pool that stops its workers forcibly still can.
* File descriptors registered with :func:`close_in_workers` (a lock held for the parent's
  lifetime) are closed in each worker, so the lock ends with the parent alone.
"""

import ctypes
import multiprocessing
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1
PARENT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")
                       if hasattr(signal, name))
# fork: no re-import of the caller's main module; workers only use PIL, h5py and NumPy
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
_fds_to_close = set()


def close_in_workers(fd):
    """Have workers started after this call close ``fd`` (inherited by fork) on start-up."""
    _fds_to_close.add(fd)


def keep_in_workers(fd):
    """Undo :func:`close_in_workers` (the parent is about to close ``fd``)."""
    _fds_to_close.discard(fd)


def _die_with_parent_linux():
    """prctl(PR_SET_PDEATHSIG, SIGKILL); False when the call is unavailable or fails."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid, interval=1.0):
    """Daemon thread: end this process as soon as ``parent_pid`` is no longer its parent."""
    def watch():
        while os.getppid() == parent_pid:
            threading.Event().wait(interval)
        os._exit(1)
    threading.Thread(target=watch, name="nbalex-parent-watch", daemon=True).start()


def worker_init(parent_pid, fds=()):
    """Start-up of every worker process: die with ``parent_pid``, ignore the parent's signals.

    Call it first in the worker (a pool's ``initializer``, a Process target's first line).
    ``parent_pid`` is ``os.getpid()`` of the process that started the worker, read before
    the start; ``fds`` are extra inherited descriptors to close (see :func:`close_in_workers`).
    """
    for sig in PARENT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for fd in set(fds) | _fds_to_close:
        try:
            os.close(fd)
        except OSError:
            pass
    if not (sys.platform.startswith("linux") and _die_with_parent_linux()):
        _watch_parent(parent_pid)
    if os.getppid() != parent_pid:        # the parent died before the prctl could act
        os._exit(1)


def _terminate_kills(self):
    """terminate() of a worker process: SIGKILL, since the worker ignores SIGTERM."""
    self.kill()


def _killing_context(method):
    """A context of ``method`` whose Process class (module-level, so spawn can pickle it)
    sends SIGKILL on terminate()."""
    base = multiprocessing.get_context(method)
    name = f"Killing{base.Process.__name__}"
    process = type(name, (base.Process,), {"terminate": _terminate_kills, "__module__": __name__})
    globals()[name] = process
    return type(f"Killing{type(base).__name__}", (type(base),), {"Process": process})()


# fork and spawn only: a forkserver's workers are children of the server, not of the caller
_CONTEXTS = {method: _killing_context(method) for method in ("fork", "spawn")
             if method in multiprocessing.get_all_start_methods()}


def context(method=None):
    """The multiprocessing context (``method``: "fork" or "spawn", default START_METHOD) for
    nbalex's workers: its processes' terminate() kills (SIGKILL), since workers ignore SIGTERM."""
    method = method or START_METHOD
    if method not in _CONTEXTS:
        raise ValueError(f"worker processes start by fork or spawn here, not {method!r}")
    return _CONTEXTS[method]
