"""Pack an ImageNet-style folder (one sub-folder per class) into the HDF5 layout of DESIGN.md §3.

Every image goes through :func:`nbalex.io.image.load_and_resize` (upright, RGB, shorter side
resized, centre square), the path ``predict`` uses too.  Decoding runs in worker processes
(:mod:`nbalex.io.children`: they die with the packer), which also sum each chunk's pixels
and pixel products (exact integers); the main process writes the images in order, adds them
to the per-pixel mean (float64) and the sums, and at the end takes the PCA of the RGB
covariance.  Files that cannot be decoded are skipped, counted and listed.

The output is written to a temporary file ``.OUT.tmp-PID`` beside ``out`` and renamed at the
end.  For its whole run a packer holds a lock (``flock`` on ``.OUT.lock``), so a second pack
to the same OUT is refused while one runs, and a pack that gets the lock knows every
``.OUT.tmp-*`` left there belongs to a dead packer and removes it.  An existing OUT is
replaced only with ``force``; OUT that is the ``classes_from`` file never.
"""

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from numba import njit
from tqdm import tqdm

from nbalex.io import children
from nbalex.io.errors import DataError
from nbalex.io.image import (ALPHA_BACKGROUND, RESAMPLE, REDUCING_GAP,  # noqa: F401 (re-exported)
                             centre_square, load_and_resize, to_rgb)

START_METHOD = children.START_METHOD
CHUNK = 16                    # images per worker task


@njit(cache=True)
def _add_pixel_sums(image, sums, gram):
    """sums[c] += sum of channel c; gram[c, d] += sum of channel c * channel d, over an
    (H, W, 3) uint8 image.  Integer arithmetic: exact for any number of images."""
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            r, g, b = np.int64(image[y, x, 0]), np.int64(image[y, x, 1]), np.int64(image[y, x, 2])
            sums[0] += r
            sums[1] += g
            sums[2] += b
            gram[0, 0] += r * r
            gram[0, 1] += r * g
            gram[0, 2] += r * b
            gram[1, 1] += g * g
            gram[1, 2] += g * b
            gram[2, 2] += b * b


def pixel_stats(images):
    """(pixel count, channel sums int64 (3,), gram matrix int64 (3,3)) of uint8 (..., H, W, 3)."""
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape((-1,) + images.shape[-3:])
    sums, gram = np.zeros(3, np.int64), np.zeros((3, 3), np.int64)
    for image in images:
        _add_pixel_sums(image, sums, gram)
    gram = np.triu(gram) + np.triu(gram, 1).T
    return images.shape[0] * images.shape[1] * images.shape[2], sums, gram


def merge_stats(a, b):
    """Sum two pixel_stats triples."""
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def covariance(stats):
    """The 3x3 covariance (float64, population) of the pixels summarised by ``stats``.

    n*gram - sums*sums^T is formed exactly in Python integers, then divided by n^2 once.
    """
    n, sums, gram = stats
    s = [int(v) for v in sums]
    exact = [[n * int(gram[i][j]) - s[i] * s[j] for j in range(3)] for i in range(3)]
    return np.array(exact, dtype=np.float64) / (float(n) * float(n))


def decode_chunk(paths, size):
    """Worker task: decode ``paths``; (images (k,S,S,3), ok bool (len(paths),), errors, stats,
    notes): ``errors`` one line per unreadable file, ``notes`` one line per remark on a kept one."""
    images, ok, errors, notes = [], [], [], []
    for path in paths:
        try:
            image = load_and_resize(path, size, notes)
        except MemoryError:
            raise
        except Exception as exc:  # corrupt, truncated, not an image: reported, never fatal
            ok.append(False)
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            continue
        ok.append(True)
        images.append(image)
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, np.array(ok, dtype=bool), errors, pixel_stats(stacked), notes


def read_classes(h5_path):
    """The class names (list[str]) stored in a packed HDF5 file."""
    try:
        with h5py.File(h5_path, "r") as f:
            return [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
    except (OSError, KeyError) as exc:
        raise DataError(f"cannot read class names from {h5_path}: {exc}") from None


def list_source(src, classes_from=None):
    """(classes, [(path, label), ...]) of an ImageNet-style folder; DataError when unusable."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"source folder {src} does not exist or is not a folder")
    folders = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"source folder {src} has no class sub-folders")
    classes = read_classes(classes_from) if classes_from is not None else folders
    label_of = {name: k for k, name in enumerate(classes)}
    unknown = [name for name in folders if name not in label_of]
    if unknown:
        raise DataError(f"{len(unknown)} class folder(s) of {src} are not in {classes_from}: "
                        f"{unknown[:5]}")
    items = []
    for name in folders:
        for path in sorted((src / name).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                items.append((str(path), label_of[name]))
    if not items:
        raise DataError(f"source folder {src} has class folders but no files in them")
    return classes, items


def _pca(cov):
    """Eigenvalues (descending) and eigenvectors (columns) of a 3x3 covariance; each column's
    largest-magnitude component is made positive so the result is deterministic."""
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    signs = np.sign(eigvec[np.argmax(np.abs(eigvec), axis=0), np.arange(3)])
    return np.clip(eigval, 0.0, None), eigvec * np.where(signs == 0, 1.0, signs)


def _executor(workers):
    """Decoder processes that die with the packer and leave Ctrl-C and SIGTERM to it."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=children.context(START_METHOD),
                               initializer=children.worker_init, initargs=(os.getpid(),))


def _decoded_chunks(items, size, workers):
    """Yield decode_chunk results in file order, keeping at most 4 tasks per worker in flight.

    Closed early (Ctrl-C, SIGTERM, a failed chunk, the consumer's error), it kills the decoders
    at once instead of waiting for their chunks; the caller closes it (contextlib.closing)."""
    chunks = [[p for p, _ in items[i:i + CHUNK]] for i in range(0, len(items), CHUNK)]
    pool = _executor(workers)
    in_flight, finished = deque(), False
    try:
        for chunk in chunks:
            in_flight.append(pool.submit(decode_chunk, chunk, size))
            if len(in_flight) >= 4 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
        finished = True
    finally:
        for future in in_flight:
            future.cancel()
        if not finished:      # their remaining work is not wanted: stop them now
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                with contextlib.suppress(Exception):
                    process.kill()
        pool.shutdown(wait=True, cancel_futures=True)


def check_out(out, classes_from=None, force=False):
    """Refuse to write ``out`` when it is the ``classes_from`` file (also through a link),
    always, or when it exists and ``force`` is false: DataError, before any work starts."""
    out = Path(out)
    if classes_from is not None and out.exists() and os.path.samefile(out, classes_from):
        raise DataError(f"{out} is the --classes-from file {classes_from}: packing into it "
                        f"would replace the class list it is read for; choose another OUT")
    if out.is_dir():
        raise DataError(f"{out} is a folder; OUT must be a file name")
    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to replace it")


@contextlib.contextmanager
def out_lock(out):
    """Hold ``.OUT.lock`` beside ``out`` (fcntl.flock) for the block; DataError when another
    live packer holds it.  Inside the block, temporary files ``.OUT.tmp-*`` are a dead
    packer's: they are removed on entry.  The lock file is removed on exit."""
    out = Path(out)
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(f"{out} is being written by another `nbalex pack` "
                            f"(it holds {lock_path})") from None
        try:       # the file we locked may have been removed by a packer that just finished
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    children.close_in_workers(fd)     # the lock ends with this process, not with its workers
    try:
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        yield
    finally:
        children.keep_in_workers(fd)
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(fd)


class Stopped(KeyboardInterrupt):
    """pack was stopped by SIGTERM or SIGHUP (``signum``); like Ctrl-C, its temporary file
    is removed."""

    def __init__(self, signum):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _stop_signals_interrupt():
    """SIGTERM and SIGHUP (``timeout``, ``docker stop``, a closed terminal) stop the pack as
    Ctrl-C does, so the temporary file and the lock are removed (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), stop) for n in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), signal.SIG_DFL if handler is None else handler)


def pack(src, out, size=256, workers=None, classes_from=None, progress=True, force=False):
    """Pack the ImageNet-style folder ``src`` into the HDF5 file ``out``; returns a summary dict.

    ``classes_from`` names an already packed (training) file whose class list and label
    numbering are reused.  ``workers`` decoding processes (default: every core).  An
    existing ``out`` is replaced only with ``force`` (see :func:`check_out`).  The summary
    holds counts, ``skipped_files`` ("path: reason" lines), ``notes`` (remarks on kept
    files, such as a decompression-bomb size) and ``empty_classes`` (classes left with no
    image).
    """
    t0 = time.perf_counter()
    size = int(size)
    if size < 1:
        raise DataError(f"size must be a positive number of pixels, got {size}")
    check_out(out, classes_from, force)
    classes, items = list_source(src, classes_from)
    workers = max(1, int(workers or os.cpu_count() or 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _stop_signals_interrupt(), out_lock(out):
        check_out(out, classes_from, force)          # another packer may have just written it
        result = _write(src, out, size, workers, classes, items, progress)
    seconds = time.perf_counter() - t0
    counts = np.bincount(np.asarray(result.pop("labels"), np.int64), minlength=len(classes))
    result.update(out=str(out), classes=len(classes), size=size, workers=workers,
                  seconds=seconds, images_per_s=len(items) / seconds if seconds > 0 else float("inf"),
                  empty_classes=[c for c, n in zip(classes, counts) if n == 0])
    return result


def _write(src, out, size, workers, classes, items, progress):
    """Decode ``items`` into a temporary file beside ``out``, renamed to ``out`` when complete."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    pixel_stats(np.zeros((1, 1, 1, 3), np.uint8))   # compile once here; forked workers inherit it
    good_files, good_labels, skipped, notes = [], [], [], []
    stats = (0, np.zeros(3, np.int64), np.zeros((3, 3), np.int64))
    mean_sum = np.zeros((size, size, 3), np.float64)
    try:
        with h5py.File(tmp, "w") as f:
            shape = (len(items), size, size, 3)
            images = f.create_dataset("images", shape=shape, maxshape=shape, dtype=np.uint8,
                                      chunks=(1, size, size, 3))
            bar = tqdm(total=len(items), desc=f"pack {Path(src).name}", unit="img",
                       file=sys.stderr, disable=not progress)
            start = 0
            decoded = contextlib.closing(_decoded_chunks(items, size, workers))
            with bar, decoded as results:
                for batch, ok, errors, chunk_stats, chunk_notes in results:
                    chunk = items[start:start + len(ok)]
                    n = len(good_files)
                    images[n:n + len(batch)] = batch
                    mean_sum += batch.sum(axis=0, dtype=np.float64)
                    stats = merge_stats(stats, chunk_stats)
                    notes.extend(chunk_notes)
                    errs = iter(errors)
                    for (path, label), good in zip(chunk, ok):
                        if good:
                            good_files.append(path)
                            good_labels.append(label)
                        else:
                            skipped.append(f"{path}: {next(errs)}")
                    start += len(ok)
                    bar.update(len(ok))
            count = len(good_files)
            if count == 0:
                raise DataError(f"none of the {len(items)} files in {src} could be read")
            images.resize((count, size, size, 3))
            eigval, eigvec = _pca(covariance(stats))
            strings = h5py.string_dtype()
            f.create_dataset("labels", data=np.array(good_labels, dtype=np.int32))
            f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=strings)
            f.create_dataset("files", data=np.array(good_files, dtype=object), dtype=strings)
            f.create_dataset("skipped_files", data=np.array(skipped, dtype=object), dtype=strings,
                             shape=(len(skipped),))
            f.create_dataset("mean", data=(mean_sum / count).astype(np.float32))
            f.create_dataset("pca/eigval", data=eigval)
            f.create_dataset("pca/eigvec", data=eigvec)
            f.attrs["size"] = size
            f.attrs["skipped"] = len(skipped)
            f.attrs["num_images"] = count
            f.attrs["source"] = str(Path(src).resolve())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"images": count, "skipped": len(skipped), "skipped_files": skipped,
            "notes": notes, "labels": good_labels}
