"""Batches from a packed HDF5 file: epoch-shuffled, seeded, resumable, read off the training thread.

Pipeline of one batch::

    reader process:  HDF5 -> host slot (shared memory; page-locked for cuda)
    cpu/reference:   augment_batch(host slot) -> new float32 array
    cuda:            copy_stream: wait "augment done with device buffer i", async H2D copy of
                     the uint8 slot and the draws into buffer i, record "copy done i";
                     compute_stream: wait "copy done i", augment_batch kernel into out[i]

The cuda path is double-buffered: batch b+1 is copied while the caller computes on batch b,
so the array yielded for batch b stays valid until the next iteration.  Reader processes
(h5py serialises threads) take (slot, indices) tasks and fill the slots in shared memory.
The order of an epoch and every random draw depend only on (seed, epoch, batch), see
:mod:`nbalex.io.augment`, so ``epoch(e, start_batch=k)`` continues an interrupted epoch
with exactly the batches it would have produced.

Data parallelism (``shard=(rank, ranks)``): ``batch_size`` stays the global batch and the
epoch order is the one a single process uses; each rank reads and augments only its rows of
every global batch, a contiguous share (:meth:`Loader.share`; equal shares when the batch
divides by the ranks, as training requires), with the global batch's crop, flip and colour
draws sliced to those rows.  So N ranks see, at each step, exactly the images and draws one
process would.  A rank whose share of a short last batch is empty skips that batch.
"""

import contextlib
import ctypes
import importlib
import os
import queue
from collections import deque

import numpy as np

from nbalex.backends import resolve
from nbalex.distributed.reduce import split_counts
from nbalex.io import children
from nbalex.io.augment import TEN_VIEWS, epoch_order, eval_draws, train_draws
from nbalex.io.dataset import H5Dataset
from nbalex.io.errors import DataError

# fork: no re-import of the caller's main module; readers only use h5py and NumPy, never CUDA
START_METHOD = children.START_METHOD
EXTRA_SLOTS = 3               # host slots beyond one per reader: consumed, staged, ready


def _reader_main(parent_pid, path, buffer, slot_shape, tasks, results):
    """Reader process: for each (ticket, slot, indices) task read the images into that slot.
    It dies with ``parent_pid`` and leaves Ctrl-C and SIGTERM to the training loop."""
    children.worker_init(parent_pid)
    slots = np.frombuffer(buffer, np.uint8).reshape((-1,) + tuple(slot_shape))
    try:
        dataset = H5Dataset(path)
    except Exception as exc:  # reported on the first task, the process stays to answer
        dataset, failure = None, f"{type(exc).__name__}: {exc}"
    while True:
        task = tasks.get()
        if task is None:
            break
        ticket, slot, indices = task
        if dataset is None:
            results.put((ticket, failure))
            continue
        try:
            dataset.read_into(slots[slot], indices)
            results.put((ticket, None))
        except Exception as exc:
            results.put((ticket, f"{type(exc).__name__}: {exc}"))
    if dataset is not None:
        dataset.close()


def _views(x, count, views):
    """The per-view (count,3,C,C) slices of a (count*views,3,C,C) batch (row i*views+k: view k)."""
    if views == 1:
        return [x]
    shape = (count, views) + tuple(x.shape[1:])
    return [x.reshape(shape)[:, k] for k in range(views)]


class _Readers:
    """``workers`` reader processes filling slots of a shared host buffer (0: read in-process)."""

    def __init__(self, path, dataset, slot_shape, num_slots, workers):
        self.path, self.dataset, self.workers = path, dataset, workers
        nbytes = int(np.prod(slot_shape)) * num_slots
        self.procs, self.done, self.next_ticket = [], {}, 0
        if workers == 0:
            self.buffer = np.empty(nbytes, np.uint8)
            self.slots = self.buffer.reshape((num_slots,) + tuple(slot_shape))
            return
        ctx = children.context(START_METHOD)
        self._shared = ctx.RawArray(ctypes.c_uint8, nbytes)
        self.buffer = np.frombuffer(self._shared, np.uint8)
        self.slots = self.buffer.reshape((num_slots,) + tuple(slot_shape))
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        for _ in range(workers):
            args = (os.getpid(), path, self._shared, tuple(slot_shape), self.tasks, self.results)
            proc = ctx.Process(target=_reader_main, args=args, daemon=True)
            proc.start()
            self.procs.append(proc)

    def submit(self, slot, indices):
        """Start reading ``indices`` into ``slot``; returns a ticket for :meth:`wait`."""
        ticket = self.next_ticket
        self.next_ticket += 1
        if self.workers == 0:
            self.dataset.read_into(self.slots[slot], indices)
            self.done[ticket] = None
        else:
            self.tasks.put((ticket, slot, np.asarray(indices, np.int64)))
        return ticket

    def wait(self, ticket):
        """Block until ``ticket``'s slot is filled; raise DataError if its read failed."""
        while ticket not in self.done:
            try:
                got, error = self.results.get(timeout=1.0)
            except queue.Empty:
                if not all(p.is_alive() for p in self.procs):
                    raise RuntimeError(f"a reader process of {self.path} died") from None
                continue
            self.done[got] = error
        error = self.done.pop(ticket)
        if error is not None:
            raise DataError(f"reading {self.path} failed: {error}")

    def close(self):
        for _ in self.procs:
            self.tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()                # readers ignore SIGTERM
                proc.join()
        if self.procs:
            self.tasks.close()
            self.results.close()
        self.procs = []


class Loader:
    """Augmented batches of a packed dataset for one backend ("cpu", "reference" or "cuda").

    ``train=True``: every epoch visits each image once in an order fixed by (seed, epoch),
    random crops, flips and PCA colour noise; ``drop_last`` drops the last partial batch.
    ``train=False``: file order, every image, the last batch may be smaller; ``view="center"``
    gives centred crops, ``view="ten"`` the paper's 10 views, x rows i*10..i*10+9 for image i.
    ``epoch(e, start_batch)`` yields (x, labels): x float32 (B[*10],3,crop,crop), a NumPy
    array for cpu/reference and a device array for cuda, either valid until the next
    iteration (the loader writes batches into two buffers in turn);
    labels int32 NumPy (B,).  ``mean`` (S,S,3) replaces the file's own mean image: evaluation
    subtracts the training set's mean, as the paper does.  For cuda, ``tower`` supplies ``compute_stream``,
    ``copy_stream`` and ``arena.alloc(shape, dtype)``; without one the loader makes its own.
    ``shard=(rank, ranks)``: this rank's rows of every global batch of ``batch_size`` (module
    docstring); ``batches_per_epoch`` counts global batches.
    """

    def __init__(self, path, batch_size, crop_size, backend="cpu", train=True, seed=0,
                 workers=2, tower=None, view="center", drop_last=True, mean=None, shard=(0, 1)):
        self.path, self.batch_size, self.crop_size = str(path), int(batch_size), int(crop_size)
        self.backend, self.train, self.seed = resolve(backend), bool(train), int(seed)
        if view not in ("center", "ten"):
            raise ValueError(f"unknown view {view!r}: choose 'center' or 'ten'")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.rank, self.ranks = int(shard[0]), int(shard[1])
        if not 0 <= self.rank < self.ranks:
            raise ValueError(f"shard {tuple(shard)}: rank must lie in 0..ranks-1")
        self.local_batch = -(-self.batch_size // self.ranks)    # the most rows a rank takes
        self.view = "center" if self.train else view
        self.views = TEN_VIEWS if self.view == "ten" else 1
        self.drop_last = bool(drop_last) and self.train
        self._readers, self._active, self._pins = None, None, contextlib.ExitStack()
        self.dataset = H5Dataset(path)
        ds = self.dataset
        if not 0 < self.crop_size <= ds.image_size:
            self.close()
            raise ValueError(f"crop size {crop_size} must be in 1..{ds.image_size} (packed size)")
        n, b = ds.num_images, self.local_batch
        whole = self.batch_size
        self.batches_per_epoch = n // whole if self.drop_last else -(-n // whole)
        if self.batches_per_epoch == 0:
            self.close()
            raise DataError(f"{self.path} has {n} images, fewer than one batch of {whole}")
        self.num_images, self.image_size = n, ds.image_size
        # the mean subtracted: the file's own, or (evaluation) the training set's
        self.mean = ds.mean if mean is None else np.ascontiguousarray(mean, np.float32)
        if self.mean.shape != ds.mean.shape:
            self.close()
            raise DataError(f"mean image of shape {self.mean.shape} does not fit {self.path} "
                            f"(images {ds.mean.shape})")
        self._augment = importlib.import_module(f"nbalex.{self.backend}.augment").augment_batch
        workers = max(0, int(workers))
        self._num_slots = max(workers, 1) + EXTRA_SLOTS
        self._free = deque(range(self._num_slots))
        self._slot_ready = [None] * self._num_slots   # cuda: event "slot's copy done"
        slot_shape = (b, ds.image_size, ds.image_size, 3)
        self._readers = _Readers(self.path, ds, slot_shape, self._num_slots, workers)
        if self.backend == "cuda":
            self._setup_device(tower)
        else:   # two output batches, used in turn: nothing is allocated per batch
            out_shape = (b * self.views, 3, self.crop_size, self.crop_size)
            self._host_out = [np.empty(out_shape, np.float32) for _ in range(2)]

    # ---------------------------------------------------------------- cuda buffers, streams
    def _setup_device(self, tower):
        from numba import cuda
        b, s, c, v = self.local_batch, self.image_size, self.crop_size, self.views
        if tower is None:
            self.compute_stream, self.copy_stream = cuda.stream(), cuda.stream()
            alloc = lambda shape, dtype: cuda.device_array(shape, dtype)  # noqa: E731
        else:
            self.compute_stream, self.copy_stream = tower.compute_stream, tower.copy_stream
            alloc = tower.arena.alloc
        try:   # page-lock the shared slots so the H2D copies are truly asynchronous
            self._pins.enter_context(cuda.pinned(self._readers.buffer))
        except Exception:  # pinning refused: copies from pageable memory still work, synchronously
            pass
        self._dev_images = [alloc((b, s, s, 3), np.uint8) for _ in range(2)]
        self._dev_out = [alloc((b * v, 3, c, c), np.float32) for _ in range(2)]
        specs = (((v, b), np.int32), ((v, b), np.int32), ((v, b), np.uint8),
                 ((v, b, 3), np.float32))           # crop_y, crop_x, flip, rgb_shift
        self._dev_draws = [tuple(alloc(*spec) for spec in specs) for _ in range(2)]
        self._host_draws = [tuple(cuda.pinned_array(*spec) for spec in specs) for _ in range(2)]
        self._dev_mean = alloc((s, s, 3), np.float32)
        self._dev_mean.copy_to_device(self.mean, stream=self.copy_stream)
        self.copy_stream.synchronize()
        self._copy_done = [cuda.event() for _ in range(2)]
        self._augment_done = [cuda.event() for _ in range(2)]
        for event in self._augment_done + self._copy_done:
            event.record(self.compute_stream)
        self._slot_ready = [cuda.event() for _ in range(self._num_slots)]

    # ---------------------------------------------------------------- epochs
    def epoch(self, epoch, start_batch=0):
        """The batches of ``epoch`` from ``start_batch`` on, as (x, labels) pairs (class doc)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        if self._readers is None:
            raise RuntimeError("the loader is closed")
        if self._active is not None:     # only one epoch may own the slots at a time
            self._active.close()
        if self.train:
            order = epoch_order(self.num_images, self.seed, epoch)
        else:
            order = np.arange(self.num_images)
        run = self._device_batches if self.backend == "cuda" else self._host_batches
        self._active = run(order, int(epoch), int(start_batch))
        return self._active

    def __iter__(self):
        return self.epoch(0)

    def __len__(self):
        return self.batches_per_epoch

    def share(self, batch):
        """(first, count, whole): this rank's rows of global batch ``batch`` are rows
        ``first .. first+count-1`` of its ``whole`` rows (contiguous, in rank order)."""
        start = batch * self.batch_size
        whole = min(start + self.batch_size, self.num_images) - start
        counts = split_counts(whole, self.ranks)
        return sum(counts[:self.rank]), counts[self.rank], whole

    def _indices(self, order, batch):
        first, count, _ = self.share(batch)
        start = batch * self.batch_size + first
        return order[start:start + count]

    def _draws(self, count, epoch, batch):
        """(crop_y, crop_x, flip, rgb_shift), each with a leading views axis (1 or 10);
        for training, the global batch's draws, sliced to this rank's rows."""
        ds = self.dataset
        if self.train:
            first, mine, whole = self.share(batch)
            draws = train_draws(whole, ds.image_size, self.crop_size, ds.eigval, ds.eigvec,
                                self.seed, epoch, batch)
            return tuple(a[first:first + count][None] for a in draws)
        draws = eval_draws(count, ds.image_size, self.crop_size, self.view)
        return draws if self.view == "ten" else tuple(a[None] for a in draws)

    def _filled_slots(self, order, start):
        """Yield (batch, slot, indices) once the slot holds the batch; the consumer frees slots
        with :meth:`_release`.  Keeps every free slot busy reading ahead."""
        pending = deque()
        batches = [b for b in range(start, self.batches_per_epoch) if self.share(b)[1] > 0]
        upcoming = 0
        try:
            for _ in batches:
                while self._free and upcoming < len(batches):
                    slot = self._free.popleft()
                    if self._slot_ready[slot] is not None:
                        self._slot_ready[slot].synchronize()   # its last H2D copy has finished
                    indices = self._indices(order, batches[upcoming])
                    pending.append((batches[upcoming], self._readers.submit(slot, indices), slot,
                                    indices))
                    upcoming += 1
                batch, ticket, slot, indices = pending.popleft()
                self._readers.wait(ticket)
                yield batch, slot, indices
        finally:
            while pending:               # abandoned mid-epoch: let the readers finish first
                _, ticket, slot, _ = pending.popleft()
                with contextlib.suppress(Exception):
                    self._readers.wait(ticket)
                self._free.append(slot)

    def _release(self, slot):
        self._free.append(slot)

    def _host_batches(self, order, epoch, start):
        filled = self._filled_slots(order, start)
        ds, v = self.dataset, self.views
        try:
            for batch, slot, indices in filled:
                n = len(indices)
                images = self._readers.slots[slot][:n]
                x = self._host_out[batch % 2][:n * v]   # valid until the next batch
                crop_y, crop_x, flip, shift = self._draws(n, epoch, batch)
                for k, view in enumerate(_views(x, n, v)):
                    self._augment(view, images, crop_y[k], crop_x[k], flip[k], shift[k], self.mean)
                self._release(slot)
                yield x, ds.labels[indices].astype(np.int32)
        finally:
            filled.close()

    def _stage(self, batch, slot, indices, epoch):
        """Enqueue on the copy stream: slot -> device buffer batch%2, and the batch's draws."""
        buf, n = batch % 2, len(indices)
        self._copy_done[buf].synchronize()          # host draw buffers of buf are free again
        for host, draw in zip(self._host_draws[buf], self._draws(n, epoch, batch)):
            host[:, :n] = draw
        self._augment_done[buf].wait(self.copy_stream)   # the kernel that last read buf is done
        host_images = self._readers.slots[slot][:n]
        self._dev_images[buf][:n].copy_to_device(host_images, stream=self.copy_stream)
        for dev, host in zip(self._dev_draws[buf], self._host_draws[buf]):
            dev.copy_to_device(host, stream=self.copy_stream)
        self._copy_done[buf].record(self.copy_stream)
        self._slot_ready[slot].record(self.copy_stream)
        self._release(slot)

    def _device_batches(self, order, epoch, start):
        filled = self._filled_slots(order, start)
        v = self.views
        try:
            staged = next(filled, None)
            if staged is not None:
                self._stage(staged[0], staged[1], staged[2], epoch)
            while staged is not None:
                batch, _, indices = staged
                buf, n = batch % 2, len(indices)
                self._copy_done[buf].wait(self.compute_stream)
                out = self._dev_out[buf][:n * v]
                crop_y, crop_x, flip, shift = self._dev_draws[buf]
                images = self._dev_images[buf][:n]
                for k, view in enumerate(_views(out, n, v)):
                    self._augment(view, images, crop_y[k, :n], crop_x[k, :n], flip[k, :n],
                                  shift[k, :n], self._dev_mean, stream=self.compute_stream)
                self._augment_done[buf].record(self.compute_stream)
                staged = next(filled, None)     # copy batch+1 while the caller computes on this one
                if staged is not None:
                    self._stage(staged[0], staged[1], staged[2], epoch)
                yield out, self.dataset.labels[indices].astype(np.int32)
        finally:
            filled.close()

    # ---------------------------------------------------------------- lifetime
    def close(self):
        """Stop the reader processes, unpin and free the host buffers, close the file."""
        if self._active is not None:
            self._active.close()
            self._active = None
        self._pins.close()                # unpin before the shared buffer can go away
        if self._readers is not None:
            self._readers.close()
            self._readers = None
        if getattr(self, "dataset", None) is not None:
            self.dataset.close()
            self.dataset = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
