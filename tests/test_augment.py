"""Augmentation: the host draws, and augment_batch of the cpu and cuda backends vs the reference."""

import numpy as np
import pytest

from nbalex.cpu.augment import augment_batch as cpu_augment
from nbalex.io.augment import (epoch_order, eval_draws, pca_shift, ten_view_offsets,
                               train_draws)


def loop_augment(images, crop_y, crop_x, flip, rgb_shift, mean, crop):
    """The contract of nbalex.backends.augment_batch, written as plain loops."""
    out = np.zeros((images.shape[0], 3, crop, crop), np.float32)
    for b in range(images.shape[0]):
        for i in range(crop):
            for j in range(crop):
                jj = crop - 1 - j if flip[b] else j
                y, x = crop_y[b] + i, crop_x[b] + jj
                for c in range(3):
                    pixel = np.float32(images[b, y, x, c])
                    out[b, c, i, j] = pixel - mean[y, x, c] + rgb_shift[b, c]
    return out


def reference_augment():
    try:
        from nbalex.reference.augment import augment_batch
    except ImportError:
        return None
    return augment_batch


def random_batch(rng, batch=3, size=12, crop=8):
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    eigval = np.array([900.0, 100.0, 10.0])
    eigvec = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    draws = train_draws(batch, size, crop, eigval, eigvec, seed=3, epoch=1, batch=2)
    crop_y, crop_x, flip, shift = draws
    flip[:2] = (0, 1)        # both branches, whatever the draw
    return images, crop_y, crop_x, flip, shift, mean


def test_cpu_matches_loops_and_reference(rng):
    images, crop_y, crop_x, flip, shift, mean = random_batch(rng, batch=4, size=12, crop=8)
    expected = loop_augment(images, crop_y, crop_x, flip, shift, mean, 8)
    out = np.full((4, 3, 8, 8), np.nan, np.float32)
    cpu_augment(out, images, crop_y, crop_x, flip, shift, mean)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
    reference = reference_augment()
    if reference is not None:
        ref = np.full_like(out, np.nan)
        reference(ref, images, crop_y, crop_x, flip, shift, mean)
        np.testing.assert_allclose(ref, expected, rtol=0, atol=1e-4)


def test_cpu_writes_a_strided_view(rng):
    """Ten-crop batches are written one view at a time into (B,10,...)[:, k]."""
    images, crop_y, crop_x, flip, shift, mean = random_batch(rng, batch=2, size=10, crop=6)
    whole = np.zeros((2, 10, 3, 6, 6), np.float32)
    cpu_augment(whole[:, 7], images, crop_y, crop_x, flip, shift, mean)
    expected = loop_augment(images, crop_y, crop_x, flip, shift, mean, 6)
    np.testing.assert_allclose(whole[:, 7], expected, atol=1e-4)
    assert not whole[:, 6].any() and not whole[:, 8].any()


def test_cpu_rejects_crops_outside_the_image(rng):
    images, crop_y, crop_x, flip, shift, mean = random_batch(rng, batch=2, size=12, crop=8)
    crop_x[1] = 5
    with pytest.raises(ValueError, match="crop offsets"):
        cpu_augment(np.zeros((2, 3, 8, 8), np.float32), images, crop_y, crop_x, flip, shift, mean)


def test_cuda_kernel_matches_reference_under_the_simulator(rng):
    from numba import cuda
    from nbalex.cuda.augment import augment_batch as cuda_augment
    images, crop_y, crop_x, flip, shift, mean = random_batch(rng, batch=2, size=12, crop=8)
    expected = np.zeros((2, 3, 8, 8), np.float32)
    (reference_augment() or cpu_augment)(expected, images, crop_y, crop_x, flip, shift, mean)
    stream = cuda.stream()
    d_out = cuda.device_array((2, 3, 8, 8), np.float32)
    args = [cuda.to_device(a) for a in (images, crop_y, crop_x, flip, shift, mean)]
    cuda_augment(d_out, *args, stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(d_out.copy_to_host(), expected, rtol=0, atol=1e-4)


def test_train_draws_are_seeded_per_batch():
    eigval, eigvec = np.array([400.0, 40.0, 4.0]), np.eye(3)
    a = train_draws(64, 20, 16, eigval, eigvec, seed=1, epoch=2, batch=3)
    b = train_draws(64, 20, 16, eigval, eigvec, seed=1, epoch=2, batch=3)
    c = train_draws(64, 20, 16, eigval, eigvec, seed=1, epoch=2, batch=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[3], c[3])
    crop_y, crop_x, flip, shift = a
    assert crop_y.dtype == np.int32 and flip.dtype == np.uint8 and shift.dtype == np.float32
    assert crop_y.min() >= 0 and crop_y.max() <= 4 and crop_x.max() <= 4
    assert set(np.unique(flip)) == {0, 1} and len(np.unique(crop_x)) == 5
    # identity eigvec: shift[:, k] = alpha_k * sqrt(eigval_k) with alpha ~ N(0, 0.1)
    assert 0.5 < shift[:, 0].std() / (0.1 * 20.0) < 1.5


def test_pca_shift_formula(rng):
    alpha = rng.normal(0, 0.1, (5, 3))
    eigval = np.array([2500.0, 100.0, 9.0])
    eigvec = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    expected = np.stack([sum(alpha[b, k] * np.sqrt(eigval[k]) * eigvec[:, k] for k in range(3))
                         for b in range(5)])
    np.testing.assert_allclose(pca_shift(alpha, eigval, eigvec), expected, rtol=1e-5, atol=1e-5)


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, seed=0, epoch=0), epoch_order(50, seed=0, epoch=0)
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(50))
    assert not np.array_equal(a, epoch_order(50, seed=0, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=0))


def test_ten_views_are_corners_centre_and_mirrors():
    ys, xs, flips = ten_view_offsets(256, 227)
    assert list(zip(ys[:5], xs[:5])) == [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]
    np.testing.assert_array_equal(ys[5:], ys[:5])
    np.testing.assert_array_equal(xs[5:], xs[:5])
    assert list(flips) == [0] * 5 + [1] * 5
    crop_y, crop_x, flip, shift = eval_draws(3, 256, 227, "ten")
    assert crop_y.shape == (10, 3) and shift.shape == (10, 3, 3) and not shift.any()
    crop_y, crop_x, flip, shift = eval_draws(3, 20, 16, "center")
    assert list(crop_y) == [2, 2, 2] and list(crop_x) == [2, 2, 2] and not flip.any()
