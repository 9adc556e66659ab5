"""The CPU backend's own thread team (nbalex.cpu.workers.for_ranges / run): ranges cover
the tasks once, errors in any share reach the caller, nested and concurrent calls do not
deadlock, and small passes stay on the calling thread."""

import threading

import numpy as np
import pytest

from nbalex.cpu import relu, sgd, workers

needs_threads = pytest.mark.skipif(workers.THREADS < 2, reason="one CPU thread")


def test_ranges_cover_every_task_once():
    seen = np.zeros(1000, np.int64)

    def kernel(lo, hi):
        seen[lo:hi] += 1
        return hi - lo

    counts = workers.for_ranges(kernel, 1000, work=1 << 30)
    assert seen.tolist() == [1] * 1000 and sum(counts) == 1000
    assert len(counts) == min(workers.THREADS, 1000)


@needs_threads
def test_big_passes_use_the_helpers_and_small_ones_the_caller():
    where = []
    kernel = lambda lo, hi: where.append(threading.get_ident())       # noqa: E731
    workers.for_ranges(kernel, 4, work=workers.SERIAL_WORK)
    assert len(set(where)) == workers.THREADS and threading.get_ident() in where
    where.clear()
    workers.for_ranges(kernel, 4, work=workers.SERIAL_WORK - 1)
    assert where == [threading.get_ident()]


@needs_threads
def test_an_error_in_a_helper_share_reaches_the_caller_and_the_team_recovers():
    def kernel(lo, hi):
        if lo > 0:
            raise ZeroDivisionError(f"share {lo}")
        return lo

    with pytest.raises(ZeroDivisionError, match="share"):
        workers.for_ranges(kernel, 10, work=1 << 30)
    assert workers.for_ranges(lambda lo, hi: hi - lo, 10, work=1 << 30)[0] == 5


@needs_threads
def test_nested_and_concurrent_calls_run_serially_instead_of_deadlocking():
    def inner(lo, hi):
        return sum(workers.for_ranges(lambda a, b: b - a, 100, work=1 << 30))

    assert workers.for_ranges(inner, 4, work=1 << 30) == [100] * workers.THREADS
    out = {}

    def caller(name):
        out[name] = sum(sum(workers.for_ranges(lambda a, b: b - a, 50, work=1 << 30))
                        for _ in range(200))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {0: 10000, 1: 10000, 2: 10000}


def test_split_passes_give_the_bits_of_one_range(monkeypatch, rng):
    """The tasks are independent: the same pass, split or not, writes the same bits."""
    x = rng.standard_normal(100_000).astype(np.float32)
    w, dw = rng.standard_normal((2, 300_000)).astype(np.float32)
    outs = []
    for serial in (False, True):
        monkeypatch.setattr(workers, "SERIAL_WORK", 1 << 40 if serial else 1)
        y = np.empty_like(x)
        relu.relu_forward(y, x)
        ww, v = w.copy(), np.full_like(w, 0.5)
        sgd.sgd_update(ww, dw, v, 0.01, 0.9, 5e-4, offsets=np.array([0, 1000, 300_000]),
                       lr_mults=np.array([1.0, 2.0]), decay_mults=np.array([1.0, 0.0]))
        outs.append((y, ww, v))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


@needs_threads
def test_a_stop_during_the_wait_is_raised_as_itself_once_every_share_ended():
    """A signal's exception (a KeyboardInterrupt subclass) that comes while the caller waits
    for a helper is raised after the helper's share ended, with its own type."""
    import _thread
    import time

    class Stop(KeyboardInterrupt):
        pass

    ended = []

    def kernel(lo, hi):
        if lo > 0:
            time.sleep(0.3)
            ended.append(lo)
        else:
            threading.Timer(0.05, _thread.interrupt_main).start()

    import signal
    previous = signal.signal(signal.SIGINT, lambda *a: (_ for _ in ()).throw(Stop()))
    try:
        with pytest.raises(Stop):
            workers.for_ranges(kernel, 10, work=1 << 30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ended == [5]
