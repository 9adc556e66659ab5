"""The loader: seeded epoch order, resumption, augmentation as the reference, evaluation views."""

import h5py
import numpy as np
import pytest

from nbalex.cpu.augment import augment_batch as cpu_augment
from nbalex.io.augment import epoch_order, train_draws
from nbalex.io.dataset import H5Dataset
from nbalex.io.errors import DataError
from nbalex.io.loader import Loader


def write_dataset(path, images, labels, classes, eigval=(0.0, 0.0, 0.0), mean=None):
    """A file in the packed layout (DESIGN.md §3), written directly."""
    n, s = images.shape[:2]
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(1, s, s, 3))
        f["labels"] = np.asarray(labels, np.int32)
        f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("files", data=np.array([f"img{i}" for i in range(n)], dtype=object),
                         dtype=h5py.string_dtype())
        f["mean"] = np.zeros((s, s, 3), np.float32) if mean is None else mean
        f["pca/eigval"] = np.asarray(eigval, np.float64)
        f["pca/eigvec"] = np.eye(3)
        f.attrs["size"], f.attrs["skipped"] = s, 0
    return path


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """24 flat images 6x6; image i has every pixel equal to i; no mean, no colour noise."""
    images = np.repeat(np.arange(24, dtype=np.uint8), 6 * 6 * 3).reshape(24, 6, 6, 3)
    labels = np.arange(24) % 3
    path = tmp_path_factory.mktemp("num") / "numbered.h5"
    return write_dataset(path, images, labels, ["a", "b", "c"])


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """10 random 12x12 images with a non-zero mean and colour noise."""
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    mean = images.mean(axis=0).astype(np.float32)
    return write_dataset(tmp_path_factory.mktemp("tex") / "textured.h5", images, np.arange(10) % 2,
                         ["x", "y"], eigval=(900.0, 90.0, 9.0), mean=mean)


def ids(x):
    """Image number of each row of a batch of the numbered dataset."""
    return [int(round(v)) for v in x[:, 0, 0, 0]]


def run_epoch(loader, epoch, start=0):
    return [(np.array(x), labels) for x, labels in loader.epoch(epoch, start_batch=start)]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_image_once_per_epoch_in_a_seeded_order(numbered, workers):
    with Loader(numbered, 4, 4, backend="cpu", seed=1, workers=workers) as loader:
        assert loader.batches_per_epoch == 6
        orders = []
        for epoch in (0, 1, 0):
            batches = run_epoch(loader, epoch)
            assert all(x.shape == (4, 3, 4, 4) and x.dtype == np.float32 for x, _ in batches)
            order = [i for x, _ in batches for i in ids(x)]
            assert sorted(order) == list(range(24))
            assert order == list(epoch_order(24, 1, epoch))
            for x, labels in batches:
                assert labels.dtype == np.int32 and list(labels) == [i % 3 for i in ids(x)]
            orders.append(order)
        assert orders[0] != orders[1] and orders[0] == orders[2]
    with Loader(numbered, 4, 4, backend="cpu", seed=2, workers=workers) as other:
        assert [i for x, _ in run_epoch(other, 0) for i in ids(x)] != orders[0]


def test_drop_last_and_eval_batches(numbered):
    with Loader(numbered, 5, 4, backend="cpu", workers=0) as loader:
        batches = run_epoch(loader, 0)
        assert loader.batches_per_epoch == 4 and [len(x) for x, _ in batches] == [5] * 4
    with Loader(numbered, 5, 4, backend="cpu", train=False, workers=1) as loader:
        batches = run_epoch(loader, 3)
        assert [len(x) for x, _ in batches] == [5, 5, 5, 5, 4]
        assert [i for x, _ in batches for i in ids(x)] == list(range(24))   # file order


def test_training_batches_equal_the_reference_augmentation(textured):
    loader = Loader(textured, 3, 8, backend="reference", seed=4, workers=1)
    with H5Dataset(textured) as ds, loader:
        order = epoch_order(10, 4, 2)
        for b, (x, labels) in enumerate(loader.epoch(2)):
            idx = order[b * 3:(b + 1) * 3]
            draws = train_draws(3, 12, 8, ds.eigval, ds.eigvec, seed=4, epoch=2, batch=b)
            expected = np.zeros((3, 3, 8, 8), np.float32)
            cpu_augment(expected, ds.read(idx), *draws, ds.mean)
            np.testing.assert_allclose(x, expected, rtol=0, atol=1e-4)
            np.testing.assert_array_equal(labels, ds.labels[idx])
        assert b == 2


def test_resuming_mid_epoch_gives_the_remaining_batches(textured):
    with Loader(textured, 2, 8, backend="cpu", seed=9, workers=2) as loader:
        full = run_epoch(loader, 5)
        partial = loader.epoch(5)
        next(partial)                             # abandoned after one batch
        resumed = run_epoch(loader, 5, start=3)
    assert len(full) == 5 and len(resumed) == 2
    for (xa, la), (xb, lb) in zip(full[3:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(la, lb)


def expected_views(image, mean, crop):
    """The paper's 10 views of one HWC image, NCHW: 4 corners, centre, then their mirrors."""
    s = image.shape[0]
    far, mid = s - crop, (s - crop) // 2
    centred = image.astype(np.float32) - mean
    corners = ((0, 0), (0, far), (far, 0), (far, far), (mid, mid))
    views = [centred[y:y + crop, x:x + crop] for y, x in corners]
    views += [v[:, ::-1] for v in views]
    return np.stack([v.transpose(2, 0, 1) for v in views])


def test_center_and_ten_crop_views(textured):
    with H5Dataset(textured) as ds:
        images, mean = ds.read(np.arange(10)), ds.mean
    with Loader(textured, 4, 8, backend="cpu", train=False, view="ten", workers=0) as loader:
        batches = run_epoch(loader, 0)
    assert [x.shape for x, _ in batches] == [(40, 3, 8, 8), (40, 3, 8, 8), (20, 3, 8, 8)]
    x = np.concatenate([b for b, _ in batches])
    for i in range(10):
        np.testing.assert_allclose(x[i * 10:(i + 1) * 10], expected_views(images[i], mean, 8),
                                   atol=1e-4)
    with Loader(textured, 4, 8, backend="cpu", train=False, workers=0) as loader:
        x = np.concatenate([b for b, _ in run_epoch(loader, 0)])
    centres = np.stack([expected_views(im, mean, 8)[4] for im in images])
    np.testing.assert_allclose(x, centres, atol=1e-4)


def test_cuda_loader_equals_the_cpu_loader(textured):
    """Double-buffered device batches under the simulator: 2 images 12x12 cropped to 8."""
    with Loader(textured, 2, 8, backend="cpu", seed=3, workers=0) as cpu_loader:
        expected = run_epoch(cpu_loader, 1)
    with Loader(textured, 2, 8, backend="cuda", seed=3, workers=1) as loader:
        got = [(x.copy_to_host(), labels) for x, labels in loader.epoch(1, start_batch=2)]
    assert len(got) == 3
    for (xa, la), (xb, lb) in zip(expected[2:], got):
        np.testing.assert_allclose(xb, xa, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(la, lb)


def test_cuda_ten_crop_with_a_short_last_batch(textured):
    with Loader(textured, 4, 4, backend="cpu", train=False, view="ten", workers=0) as cpu_loader:
        expected = run_epoch(cpu_loader, 0)[-1]
    with Loader(textured, 4, 4, backend="cuda", train=False, view="ten", workers=0) as loader:
        (x, labels), = loader.epoch(0, start_batch=2)         # the last batch only: 2 images
        got = x.copy_to_host()
    assert got.shape == (20, 3, 4, 4)
    np.testing.assert_allclose(got, expected[0], atol=1e-4)
    np.testing.assert_array_equal(labels, expected[1])


def test_bad_arguments_are_refused(textured, numbered):
    with pytest.raises(ValueError, match="crop size"):
        Loader(textured, 2, 13, backend="cpu", workers=0)
    with pytest.raises(DataError, match="fewer than one batch"):
        Loader(textured, 11, 8, backend="cpu", workers=0)
    with Loader(numbered, 4, 4, backend="cpu", workers=0) as loader:
        with pytest.raises(ValueError, match="start_batch"):
            loader.epoch(0, start_batch=7)
