"""Data pipeline throughput: packing and loading, beside a plain PIL loop run in the same process.

    python bench/bench_data.py [--images 2000] [--size 256] [--crop 227] [--batch 128] [--workers N]

Makes (once, in --data) a synthetic folder of JPEGs 300..500 px a side, so decoding costs what
it costs on photographs of that size, then times:

* PIL loop: open, convert to RGB, resize the shorter side to --size (Lanczos), centre crop,
  one image at a time in this process: the peer;
* pack: nbalex.io.pack.pack with 1 and --workers processes (draft-mode JPEG decoding,
  statistics, HDF5 writing included);
* H5 read: H5Dataset.read of shuffled batches, in this process;
* loader: Loader(backend="cpu") over one training epoch: reader processes plus the crop, flip,
  colour noise, mean and NCHW conversion of augment_batch.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nbalex.io.dataset import H5Dataset
from nbalex.io.loader import Loader
from nbalex.io.pack import pack
from nbalex.io.synth import synth


def plain_pil(path, size):
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        new_size = (max(size, round(w * scale)), max(size, round(h * scale)))
        img = img.resize(new_size, Image.Resampling.LANCZOS)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=227)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "nbalex-bench-data"))
    args = parser.parse_args(argv)

    data = Path(args.data)
    folder = data / f"synth{args.images}"
    if not (folder / "train").is_dir():
        t = time.perf_counter()
        synth(folder, classes=10, train_per_class=args.images // 10, val_per_class=0, seed=0,
              min_size=300, max_size=500)
        print(f"wrote {args.images} JPEGs (300..500 px) in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
    files = sorted(str(p) for p in (folder / "train").rglob("*.jpg"))
    rows = []

    t = time.perf_counter()
    for path in files:
        plain_pil(path, args.size)
    pil_rate = len(files) / (time.perf_counter() - t)
    rows.append(("PIL loop, decode+resize+crop", 1, pil_rate))

    out = data / f"synth{args.images}_{args.size}.h5"
    for workers in sorted({1, args.workers}):
        summary = pack(folder / "train", out, size=args.size, workers=workers, progress=False,
                       force=True)
        rows.append(("pack (decode, stats, HDF5 write)", workers, summary["images_per_s"]))

    with H5Dataset(out) as ds:
        order = np.random.default_rng(0).permutation(ds.num_images)
        t = time.perf_counter()
        for start in range(0, len(order) - args.batch + 1, args.batch):
            ds.read(order[start:start + args.batch])
        read_rate = (len(order) // args.batch * args.batch) / (time.perf_counter() - t)
    rows.append(("H5 read of shuffled batches", 1, read_rate))

    with Loader(out, args.batch, args.crop, backend="cpu", workers=args.loader_workers) as loader:
        for _ in loader.epoch(0):      # warm-up: Numba compilation, page cache
            break
        t = time.perf_counter()
        count = sum(len(labels) for _, labels in loader.epoch(1))
        loader_rate = count / (time.perf_counter() - t)
    rows.append((f"loader cpu, batch {args.batch}, crop {args.crop}", args.loader_workers,
                 loader_rate))

    print(f"data pipeline: {len(files)} JPEGs 300..500 px -> {args.size} px, "
          f"{os.cpu_count()} cores")
    print(f"{'stage':44s} {'procs':>5s} {'images/s':>10s} {'x PIL loop':>10s}")
    for name, procs, rate in rows:
        print(f"{name:44s} {procs:5d} {rate:10.0f} {rate / pil_rate:10.2f}")


if __name__ == "__main__":
    main()
