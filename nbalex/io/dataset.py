"""Read access to a packed HDF5 dataset (DESIGN.md §3), as written by :mod:`nbalex.io.pack`."""

import h5py
import numpy as np

from nbalex.io.errors import DataError

REQUIRED = ("images", "labels", "classes", "mean", "pca/eigval", "pca/eigvec")


def _strings(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class H5Dataset:
    """A packed dataset: ``images`` uint8 (N,S,S,3) read on demand, everything else in memory.

    Attributes: ``num_images``, ``image_size`` (S), ``classes`` (list[str]), ``labels`` (int32
    (N,)), ``mean`` float32 (S,S,3), ``eigval`` (3,), ``eigvec`` (3,3) (columns are the
    principal axes of the RGB pixel covariance), ``skipped`` (count).  Opening a file that is
    not HDF5 or not laid out as DESIGN.md §3 says raises :class:`DataError`.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{self.path} is not a readable HDF5 file ({reason})") from None
        try:
            self._load()
        except DataError:
            self._file.close()
            raise

    def _load(self):
        f = self._file
        missing = [name for name in REQUIRED if name not in f]
        if missing:
            raise DataError(f"{self.path} is not a packed dataset: missing {', '.join(missing)}")
        images = f["images"]
        if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2] \
                or images.dtype != np.uint8:
            raise DataError(f"{self.path}: 'images' must be uint8 (N,S,S,3), "
                            f"found {images.dtype} {images.shape}")
        n, s = images.shape[0], images.shape[1]
        labels = f["labels"][()]
        if labels.shape != (n,):
            raise DataError(f"{self.path}: 'labels' has shape {labels.shape}, expected ({n},)")
        self.classes = _strings(f["classes"][()])
        if n and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(f"{self.path}: labels outside 0..{len(self.classes) - 1}")
        mean = f["mean"][()]
        if mean.shape != (s, s, 3):
            raise DataError(f"{self.path}: 'mean' has shape {mean.shape}, expected ({s}, {s}, 3)")
        eigval, eigvec = f["pca/eigval"][()], f["pca/eigvec"][()]
        if eigval.shape != (3,) or eigvec.shape != (3, 3):
            raise DataError(f"{self.path}: 'pca' must hold eigval (3,) and eigvec (3,3)")
        self._images = images
        self.num_images, self.image_size = n, s
        self.labels = labels.astype(np.int32)
        self.mean = mean.astype(np.float32)
        self.eigval, self.eigvec = eigval.astype(np.float64), eigvec.astype(np.float64)
        self.skipped = int(f.attrs.get("skipped", 0))

    @property
    def files(self):
        """Source path of every image (list[str], read on first use)."""
        if not hasattr(self, "_files"):
            self._files = _strings(self._file["files"][()]) if "files" in self._file else []
        return self._files

    @property
    def skipped_files(self):
        """'path: reason' for every file the packer could not read (list[str])."""
        return _strings(self._file["skipped_files"][()]) if "skipped_files" in self._file else []

    def __len__(self):
        return self.num_images

    def read(self, indices):
        """Images ``indices`` (any order, repeats allowed) as a new uint8 (B,S,S,3) array."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
        self.read_into(out, indices)
        return out

    def read_into(self, out, indices):
        """Read images ``indices`` into ``out[:len(indices)]`` (uint8, C-contiguous)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_images):
            raise IndexError(f"image index out of range 0..{self.num_images - 1}")
        space = self._images.id.get_space()
        block = (1, self.image_size, self.image_size, 3)
        memory = h5py.h5s.create_simple(block)
        for k, i in enumerate(indices):
            space.select_hyperslab((int(i), 0, 0, 0), block)
            self._images.id.read(memory, space, out[k:k + 1])
        return out

    def close(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"H5Dataset({self.path!r}, images={self.num_images}, size={self.image_size}, "
                f"classes={len(self.classes)})")
