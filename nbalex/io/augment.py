"""Host side of augmentation: the random draws, and the crop offsets of evaluation views.

Every draw comes from ``numpy.random.default_rng((seed, epoch, batch, DRAW_TAG))`` so the
``reference``, ``cpu`` and ``cuda`` backends, which only apply the draws (``augment_batch``),
produce the same numbers, and a resumed epoch sees the same draws as an uninterrupted one.

PCA colour noise (Krizhevsky et al. 2012, §4.1): per image, alpha ~ N(0, 0.1) per principal
axis and ``rgb_shift = eigvec @ (alpha * sqrt(eigval))``.  ``eigval`` are the eigenvalues of
the covariance of RGB values on the stored 0..255 scale, i.e. variances; the paper's
"eigenvalue" is read as the standard deviation along each axis (as common reimplementations
do), since multiplying by the variance itself would shift pixels by hundreds of levels.
"""

import numpy as np

PCA_SIGMA = 0.1
PERM_TAG = 0x5045524D   # "PERM"
DRAW_TAG = 0x44524157   # "DRAW"
TEN_VIEWS = 10


def epoch_order(num_images, seed, epoch):
    """The shuffled image order (int64 (N,)) of ``epoch``: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng((seed, epoch, 0, PERM_TAG)).permutation(num_images)


def pca_shift(alpha, eigval, eigvec):
    """rgb_shift (B,3) float32 = eigvec @ (alpha * sqrt(eigval)) for each row of alpha (B,3)."""
    sigma = np.sqrt(np.clip(np.asarray(eigval, np.float64), 0, None))
    scaled = np.asarray(alpha, np.float64) * sigma
    return (scaled @ np.asarray(eigvec, np.float64).T).astype(np.float32)


def train_draws(count, image_size, crop_size, eigval, eigvec, seed, epoch, batch,
                pca_sigma=PCA_SIGMA):
    """Random crop, flip and colour shift for ``count`` images of one training batch.

    Returns (crop_y int32 (B,), crop_x int32 (B,), flip uint8 (B,), rgb_shift float32 (B,3)),
    offsets uniform in 0..image_size-crop_size, flips with probability 1/2.
    """
    if not 0 < crop_size <= image_size:
        raise ValueError(f"crop size {crop_size} must be in 1..{image_size}")
    rng = np.random.default_rng((seed, epoch, batch, DRAW_TAG))
    span = image_size - crop_size + 1
    crop_y = rng.integers(0, span, count).astype(np.int32)
    crop_x = rng.integers(0, span, count).astype(np.int32)
    flip = rng.integers(0, 2, count).astype(np.uint8)
    alpha = rng.normal(0.0, pca_sigma, (count, 3))
    return crop_y, crop_x, flip, pca_shift(alpha, eigval, eigvec)


def centre_offset(image_size, crop_size):
    """Offset of the centred crop along one axis."""
    return (image_size - crop_size) // 2


def ten_view_offsets(image_size, crop_size):
    """(crop_y, crop_x, flip) of the paper's 10 views, each (10,): top-left, top-right,
    bottom-left, bottom-right, centre, then the same five mirrored."""
    far, mid = image_size - crop_size, centre_offset(image_size, crop_size)
    ys = np.array([0, 0, far, far, mid] * 2, np.int32)
    xs = np.array([0, far, 0, far, mid] * 2, np.int32)
    flips = np.array([0] * 5 + [1] * 5, np.uint8)
    return ys, xs, flips


def eval_draws(count, image_size, crop_size, view):
    """Crop offsets, flips and a zero colour shift for an evaluation batch of ``count`` images.

    view "center": one centred view per image (arrays of length B).  view "ten": arrays of
    shape (10, B), row v being view v of every image (see :func:`ten_view_offsets`).
    """
    if not 0 < crop_size <= image_size:
        raise ValueError(f"crop size {crop_size} must be in 1..{image_size}")
    if view == "center":
        mid = centre_offset(image_size, crop_size)
        full = np.full(count, mid, np.int32)
        return full, full.copy(), np.zeros(count, np.uint8), np.zeros((count, 3), np.float32)
    if view == "ten":
        ys, xs, flips = ten_view_offsets(image_size, crop_size)
        rep = lambda a: np.ascontiguousarray(np.repeat(a[:, None], count, axis=1))  # noqa: E731
        return rep(ys), rep(xs), rep(flips), np.zeros((TEN_VIEWS, count, 3), np.float32)
    raise ValueError(f"unknown view {view!r}: choose 'center' or 'ten'")
