"""What training, evaluation and prediction share: a network that fits on its GPUs, a
dataset checked against it (and its fingerprint), where the loader puts its batches,
progress bars, and the stop request their loops poll between steps.
"""

import contextlib
import hashlib
import json
import os
import signal
import sys

import numpy as np


def to_host(array):
    """A NumPy view of ``array`` (copied from the GPU when it is a device array)."""
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    return np.asarray(array)


def progress_bar(enabled, total, desc, initial=0, unit="batch"):
    """A tqdm progress bar on stderr, or a do-nothing stand-in."""
    if not enabled:
        return contextlib.nullcontext(NoBar())
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                leave=False, dynamic_ncols=True)


class NoBar:
    """What the loops call on a progress bar, doing nothing (no progress shown)."""

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass


def build_net(config, backend="auto", batch_size=128, gpus=(0,), seed=0):
    """A :class:`nbalex.model.Net`, after checking that its buffers fit on the GPU.

    ``config`` is a model name, a TOML path, or TOML text from a checkpoint.
    """
    from nbalex import model
    from nbalex.backends import resolve
    backend = resolve(backend)
    if backend == "cuda":
        _check_fits_on_gpu(config, batch_size, gpus)
    return model.Net(config, backend=backend, batch_size=batch_size, gpus=tuple(gpus), seed=seed)


def _check_fits_on_gpu(config, batch_size, gpus):
    """Raise ValueError when a tower's arena for ``batch_size`` exceeds its GPU's free memory."""
    from numba import config as numba_config
    if numba_config.ENABLE_CUDASIM:
        return
    from numba import cuda
    from nbalex import buffers
    from nbalex.config import load_config
    specs = load_config(config)[2]
    need = buffers.arena_bytes(specs, batch_size, "cuda", towers=len(gpus))[0]
    for gpu in sorted(set(gpus)):
        with cuda.gpus[gpu]:
            free, _total = cuda.current_context().get_memory_info()
        towers_here = list(gpus).count(gpu)
        if need * towers_here > free:
            raise ValueError(f"batch size {batch_size} needs {need * towers_here / 2**30:.2f} GiB "
                             f"on GPU {gpu}, which has {free / 2**30:.2f} GiB free; try a "
                             f"smaller --batch-size")


def check_data(net, dataset, path, classes=None):
    """Raise ValueError when a packed dataset does not fit the network (or the class list)."""
    if len(dataset.classes) != net.num_classes:
        raise ValueError(f"{path} has {len(dataset.classes)} classes but the model "
                         f"{net.name} has {net.num_classes} outputs (its last layer states "
                         f"them; write outputs = \"classes\" there to follow the data)")
    if dataset.image_size < net.input_size:
        raise ValueError(f"{path} holds {dataset.image_size}px images, smaller than the "
                         f"model's {net.input_size}px input; pack it with a larger --size")
    if classes is not None and list(dataset.classes) != list(classes):
        raise ValueError(f"{path} has different classes from the training data "
                         f"(pack it with --classes-from TRAIN.h5)")


def data_fingerprint(dataset, path):
    """What identifies a packed dataset, cheaply (no image is read): its path (for messages),
    image count and shape, class count, and a digest of the class names, labels and file
    names.  Stored in a checkpoint so that ``--resume`` refuses other data."""
    digest = hashlib.sha256()
    for name in dataset.classes:
        digest.update(str(name).encode() + b"\0")
    digest.update(np.ascontiguousarray(dataset.labels, dtype="<i4").tobytes())
    for name in dataset.files:
        digest.update(str(name).encode() + b"\0")
    size = int(dataset.image_size)
    return {"path": str(path), "images": int(dataset.num_images), "shape": [size, size, 3],
            "classes": len(dataset.classes), "digest": digest.hexdigest()}


def same_data(stored, current, option):
    """Raise ValueError (one line naming both files) unless two fingerprints match."""
    keys = ("images", "shape", "classes", "digest")
    if all(stored.get(k) == current.get(k) for k in keys):
        return

    def said(fp):
        return (f"{fp.get('path')}: {fp.get('images')} images of {fp.get('classes')} classes, "
                f"digest {str(fp.get('digest'))[:12]}")
    raise ValueError(f"{option} {current['path']} is not the data of the run being resumed "
                     f"(saved with {said(stored)}; given {said(current)}); pass the same "
                     f"file or start a new --out folder")


def host_signature(backend):
    """What decides the bits of a step besides the run's settings: the backend and, on the
    cpu backend, the size of its thread team (the convolution's partial weight gradients are
    one per worker; None elsewhere)."""
    threads = None
    if backend == "cpu":
        from nbalex.cpu import workers
        threads = int(workers.THREADS)
    return {"backend": backend, "threads": threads}


def check_same_data(stored, found, report):
    """On resume: refuse other training or validation data than the run's (one line naming
    both); ``stored`` and ``found`` hold "train" and "val" fingerprints (stored None: a run
    saved before fingerprints, which gets a warning)."""
    if not stored:
        report("warning: the checkpoint records no data fingerprint (an older run); the "
               "data cannot be checked against it")
        return
    same_data(stored["train"], found["train"], "--data")
    same_data(stored["val"], found["val"], "--val")


def check_same_host(stored, backend, report):
    """On resume: warn when the run was saved on another backend or thread count (it
    continues, but not bit for bit)."""
    now = host_signature(backend)
    if stored and stored != now:
        def said(h):
            return h["backend"] + (f" with {h['threads']} threads" if h.get("threads") else "")
        report(f"warning: the run was saved on backend {said(stored)} and resumes on "
               f"{said(now)}: it continues, but not bit for bit as it would have there")


def loader_tower(net):
    """Where the loader puts batches for ``net``: None on the host backends; on CUDA the
    first tower's streams (so augmentation is ordered before the network's kernels) with
    buffers of the loader's own, since the network's arena is sized for the network alone."""
    towers = getattr(net, "towers", None)
    return LoaderTower(towers[0]) if towers else None


class LoaderTower:
    """A tower's compute and copy streams plus an ``arena.alloc`` that allocates on its GPU.

    The loader allocates its few device buffers once, when it is built, never per batch.
    """

    def __init__(self, tower):
        self.tower = tower
        self.compute_stream, self.copy_stream = tower.compute_stream, tower.copy_stream
        self.arena = self

    def alloc(self, shape, dtype=np.float32, name=None):
        from numba import cuda
        with self.tower.activate():
            return cuda.device_array(shape, dtype)


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")
                     if hasattr(signal, name))
"""Signals that ask a run to stop at the next step boundary and save its position."""


def _signal_name(signum):
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class StopRequest:
    """Turns the first stop signal (:data:`STOP_SIGNALS`) into a request to stop at the next
    step boundary.

    A half-done SGD update would leave parameters and momentum out of step, so the loop
    polls :meth:`__call__` between steps instead of being interrupted inside one.  A second
    signal raises KeyboardInterrupt at once (``forced``).  ``signum`` is the first signal's
    number (SIGINT when the request came from ``after_steps``, which makes it after that
    many steps: tests use it to stand in for a Ctrl-C at a known point).  One small object
    polled between steps, so a request can later be agreed among processes there.
    """

    def __init__(self, after_steps=None):
        self.requested = False
        self.forced = False
        self.signum = signal.SIGINT
        self.after_steps = after_steps
        self.steps = 0
        self._previous = {}

    def __enter__(self):
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: KeyboardInterrupt is caught by the loop
                break
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        name = _signal_name(signum)
        again = "Ctrl-C again" if signum == signal.SIGINT else f"{name} again"
        print(f"\n{name}: stopping after this step to save the position ({again} quits "
              f"without saving)", file=sys.stderr)

    def adopt(self):
        """Take a stop request agreed among ranks (made on another rank) as this one's."""
        self.requested = True

    def count_step(self):
        self.steps += 1
        if self.after_steps is not None and self.steps >= self.after_steps:
            self.requested = True

    def __call__(self):
        return self.requested


# ------------------------------------------------------------ run folder helpers
def write_log(path, history):
    """(Re)write the JSON-lines log from the epochs the checkpoint knows about (atomically)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_log(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def first_conv_weight(net):
    """The first 4-D parameter (the first convolution's filters), or None."""
    params = net.params()
    for name in net.param_names():
        if np.ndim(params[name]) == 4:
            return params[name]
    return None


def extra_text(value):
    """A string stored in a checkpoint's ``extra`` (h5py may hand back bytes)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return extra_text(value[()] if value.ndim == 0 else value.item())
    return str(value)


def check_same_model(model, config_text, path, classes=None):
    """Raise ValueError when ``--model`` (name or path; None = not given) is not the config in
    the checkpoint at ``path``.  The stored config is sized to the run's ``classes``; the
    given one is sized the same way before they are compared."""
    if model is None:
        return
    from nbalex.config import resolve_source, sized_to
    given = resolve_source(model)[0] if classes is None else sized_to(model, classes)
    if given.strip() != str(config_text).strip():
        raise ValueError(f"--model {model} is not the model of the run in {path}; leave "
                         f"--model out to resume it, or start a new --out folder")


def epoch_line(row, epochs):
    return (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.3g}  loss {row['train_loss']:.4f}  "
            f"val loss {row['val_loss']:.4f}  top-1 {100 * row['top1_error']:.1f}%  "
            f"top-5 {100 * row['top5_error']:.1f}%  {row['images_per_s']:.0f} img/s  "
            f"{row['seconds']:.1f} s")
