"""Pack an ImageNet-style folder (one sub-folder per class) into the HDF5 layout of DESIGN.md §3.

Every image is decoded (JPEG draft mode when it helps), converted to RGB, its shorter side
resized to ``size`` with a Lanczos filter and the centre square kept, all in one
``Image.resize(..., box=...)`` call: :func:`load_and_resize` is that per-image pipeline.
Decoding runs in worker processes, which also sum each chunk's pixels and pixel products
(exact integers); the main process writes the images in order, adds them to the per-pixel
mean (float64) and the sums, and at the end takes the PCA of the RGB covariance.  Files that
cannot be decoded are skipped, counted and listed.  The output is written to a temporary file
beside ``out`` and renamed at the end, so an interrupted pack leaves nothing behind.
"""

import multiprocessing
import signal
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from numba import njit
from PIL import Image
from tqdm import tqdm

from nbalex.io.errors import DataError

# fork: no re-import of the caller's main module; workers only use PIL and NumPy
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
CHUNK = 16                    # images per worker task
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0            # Pillow reduces by an integer factor first, then Lanczos
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(img):
    """``img`` as an RGB image: transparency composited over white, 16-bit grey scaled to 8-bit."""
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16"):
        grey = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def centre_square(width, height):
    """The centred square box (left, top, right, bottom) of side min(width, height)."""
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return (left, top, left + side, top + side)


def load_and_resize(path, size):
    """Decode ``path``; its centre square, shorter side resized to ``size``: uint8 (size, size, 3).

    JPEGs are decoded in draft mode (DCT scaling by 1/2, 1/4 or 1/8) when the scaled image
    keeps both sides >= ``size``; Pillow picks the largest such scale.  Raises whatever PIL
    raises for an unreadable file.
    """
    with Image.open(path) as img:
        width, height = img.size
        box = centre_square(width, height)
        if img.format == "JPEG" and min(width, height) >= 2 * size:
            drafted = img.draft("RGB", (size, size))
            if drafted is not None:           # the box maps the original onto the drafted image
                sx, sy = drafted[1][2] / width, drafted[1][3] / height
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        rgb = to_rgb(img)
        out = rgb.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
        return np.asarray(out, dtype=np.uint8)


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
    """Worker task: decode ``paths``; (images (k,S,S,3), ok bool (len(paths),), errors, stats)."""
    images, ok, errors = [], [], []
    for path in paths:
        try:
            image = load_and_resize(path, size)
        except MemoryError:
            raise
        except Exception as exc:  # corrupt, truncated, not an image: reported, never fatal
            ok.append(False)
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            continue
        ok.append(True)
        images.append(image)
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, np.array(ok, dtype=bool), errors, pixel_stats(stacked)


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


def _ignore_sigint():
    """Decoder processes leave Ctrl-C to the parent, which removes its temporary file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _executor(workers):
    context = multiprocessing.get_context(START_METHOD)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_ignore_sigint)


def _decoded_chunks(items, size, workers):
    """Yield decode_chunk results in file order, keeping at most 4 tasks per worker in flight."""
    chunks = [[p for p, _ in items[i:i + CHUNK]] for i in range(0, len(items), CHUNK)]
    with _executor(workers) as pool:
        in_flight = deque()
        try:
            for chunk in chunks:
                in_flight.append(pool.submit(decode_chunk, chunk, size))
                if len(in_flight) >= 4 * workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()


def pack(src, out, size=256, workers=None, classes_from=None, progress=True):
    """Pack the ImageNet-style folder ``src`` into the HDF5 file ``out``; returns a summary dict.

    ``classes_from`` names an already packed (training) file whose class list and label
    numbering are reused.  ``workers`` decoding processes (default: every core).
    """
    t0 = time.perf_counter()
    size = int(size)
    if size < 1:
        raise DataError(f"size must be a positive number of pixels, got {size}")
    classes, items = list_source(src, classes_from)
    workers = max(1, int(workers or os.cpu_count() or 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    pixel_stats(np.zeros((1, 1, 1, 3), np.uint8))   # compile once here; forked workers inherit it
    good_files, good_labels, skipped = [], [], []
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
            with bar:
                for batch, ok, errors, chunk_stats in _decoded_chunks(items, size, workers):
                    chunk = items[start:start + len(ok)]
                    n = len(good_files)
                    images[n:n + len(batch)] = batch
                    mean_sum += batch.sum(axis=0, dtype=np.float64)
                    stats = merge_stats(stats, chunk_stats)
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
    seconds = time.perf_counter() - t0
    return {"out": str(out), "images": count, "classes": len(classes), "skipped": len(skipped),
            "skipped_files": skipped, "size": size, "workers": workers, "seconds": seconds,
            "images_per_s": len(items) / seconds if seconds > 0 else float("inf")}
