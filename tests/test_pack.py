"""Packing folders of images into HDF5: formats, bad files, statistics, labels, atomic output."""

import os
from concurrent.futures.process import BrokenProcessPool

import h5py
import numpy as np
import pytest
from PIL import Image

from nbalex.io import pack as pack_module
from nbalex.io.dataset import H5Dataset
from nbalex.io.errors import DataError
from nbalex.io.pack import load_and_resize, pack
from nbalex.io.synth import synth

SIZE = 16


def pil_resize(path, size):
    """The packer's pipeline spelled out with PIL calls: draft for large JPEGs, alpha over
    white, centre square of the shorter side, Lanczos with reducing_gap 3."""
    img = Image.open(path)
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    if img.format == "JPEG" and side >= 2 * size:
        _, (_, _, dw, dh) = img.draft("RGB", (size, size))
        box = (box[0] * dw / w, box[1] * dh / h, box[2] * dw / w, box[3] * dh / h)
    if img.mode in ("RGBA", "LA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0))


def smooth_rgb(rng, w, h):
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two classes of good images in many formats, plus four bad files."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("mixed")
    for name in ("bird", "cat"):
        (root / name).mkdir()
    smooth_rgb(rng, 90, 60).save(root / "bird" / "big.jpg", quality=90)           # draft mode
    smooth_rgb(rng, 30, 44).convert("L").save(root / "bird" / "grey.jpg")
    smooth_rgb(rng, 40, 36).convert("CMYK").save(root / "bird" / "cmyk.jpg")
    rgba = smooth_rgb(rng, 25, 20).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (20, 25), dtype=np.uint8)))
    rgba.save(root / "cat" / "alpha.png")
    palette = smooth_rgb(rng, 33, 33).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "cat" / "palette.png")
    smooth_rgb(rng, 5, 3).save(root / "cat" / "tiny.png")
    smooth_rgb(rng, 50, 20).save(root / "cat" / "wide.bmp")
    good_jpeg = (root / "bird" / "big.jpg").read_bytes()
    (root / "bird" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "cat" / "corrupt.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("not an image\n")
    out = root.parent / f"{root.name}.h5"
    summary = pack(root, out, size=SIZE, workers=2, progress=False)
    return root, out, summary


def test_bad_files_are_skipped_counted_and_listed(mixed):
    root, out, summary = mixed
    bad = {"truncated.jpg", "corrupt.jpg", "empty.png", "notes.txt"}
    assert summary["skipped"] == 4 and summary["images"] == 7
    with H5Dataset(out) as ds:
        assert ds.skipped == 4 and ds.num_images == 7
        assert {os.path.basename(s.split(":")[0]) for s in ds.skipped_files} == bad
        assert all(": " in s for s in ds.skipped_files)          # each with its reason
        assert not bad & {os.path.basename(f) for f in ds.files}


def test_good_images_are_exactly_as_pil_resizes_them(mixed):
    root, out, _ = mixed
    with H5Dataset(out) as ds:
        images = ds.read(np.arange(ds.num_images))
        assert images.dtype == np.uint8 and images.shape == (7, SIZE, SIZE, 3)
        assert [os.path.basename(f) for f in ds.files] == [
            "big.jpg", "cmyk.jpg", "grey.jpg", "alpha.png", "palette.png", "tiny.png", "wide.bmp"]
        assert list(ds.labels) == [0, 0, 0, 1, 1, 1, 1] and ds.classes == ["bird", "cat"]
        for image, path in zip(images, ds.files):
            np.testing.assert_array_equal(image, pil_resize(path, SIZE), err_msg=path)
            np.testing.assert_array_equal(image, load_and_resize(path, SIZE), err_msg=path)
        grey = images[ds.files.index(str(root / "bird" / "grey.jpg"))]
        assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_draft_decoding_stays_close_to_a_full_decode(tmp_path):
    """Draft mode changes pixels a little, never the geometry: compare with a full-size decode."""
    yy, xx = np.mgrid[0:240, 0:320]
    picture = np.stack([xx * 255 // 319, yy * 255 // 239, (xx + yy) % 256 // 2], -1)
    picture = picture.astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "ramp.jpg", quality=95)
    full = np.asarray(Image.open(tmp_path / "ramp.jpg").convert("RGB").crop((40, 0, 280, 240))
                      .resize((32, 32), Image.Resampling.LANCZOS), np.float64)
    drafted = load_and_resize(tmp_path / "ramp.jpg", 32).astype(np.float64)
    assert np.abs(drafted - full).mean() < 2.0


def test_centre_crop_of_the_shorter_side(tmp_path):
    """A 3:1 strip of three colour bands keeps only the middle band."""
    strip = np.zeros((20, 60, 3), np.uint8)
    strip[:, :20] = (255, 0, 0)
    strip[:, 20:40] = (0, 200, 0)
    strip[:, 40:] = (0, 0, 255)
    Image.fromarray(strip).save(tmp_path / "strip.png")
    image = load_and_resize(tmp_path / "strip.png", 10)
    assert image.shape == (10, 10, 3)
    # Lanczos reaches a pixel or two past the box, as resizing first and cropping after would
    green = np.broadcast_to(np.array([0, 200, 0], np.uint8), (10, 4, 3))
    np.testing.assert_array_equal(image[:, 3:-3], green)
    assert image[..., 0].max() < 30 and image[..., 2].max() < 30 and image[..., 1].min() > 170
    np.testing.assert_array_equal(image, image[:, ::-1, ::-1])   # centred: red edge mirrors blue


def test_mean_and_pca_match_numpy(mixed):
    _, out, _ = mixed
    with H5Dataset(out) as ds:
        images = ds.read(np.arange(ds.num_images)).astype(np.float64)
        np.testing.assert_allclose(ds.mean, images.mean(axis=0), rtol=1e-5, atol=1e-3)
        cov = np.cov(images.reshape(-1, 3).T, bias=True)
        rebuilt = ds.eigvec @ np.diag(ds.eigval) @ ds.eigvec.T
        np.testing.assert_allclose(rebuilt, cov, rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(ds.eigval, np.sort(np.linalg.eigvalsh(cov))[::-1], rtol=1e-9)
        np.testing.assert_allclose(ds.eigvec.T @ ds.eigvec, np.eye(3), atol=1e-9)
        assert (np.diff(ds.eigval) <= 0).all()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth(root, classes=3, train_per_class=4, val_per_class=2, seed=5)
    return root


def test_classes_from_keeps_the_training_numbering(synthetic, tmp_path):
    train = tmp_path / "train.h5"
    pack(synthetic / "train", train, size=SIZE, workers=1, progress=False)
    val = synthetic / "val"
    for name in sorted(os.listdir(val))[:1]:         # validation lacks the first class
        for f in (val / name).iterdir():
            f.unlink()
        (val / name).rmdir()
    pack(val, tmp_path / "val.h5", size=SIZE, workers=1, progress=False, classes_from=train)
    with H5Dataset(train) as tr, H5Dataset(tmp_path / "val.h5") as va:
        assert va.classes == tr.classes and len(tr.classes) == 3
        assert sorted(set(va.labels)) == [1, 2]
        for f, label in zip(va.files, va.labels):
            assert os.path.basename(os.path.dirname(f)) == tr.classes[label]
    (val / "zz_unknown").mkdir()
    with pytest.raises(DataError, match="not in"):
        pack(val, tmp_path / "bad.h5", size=SIZE, workers=1, progress=False, classes_from=train)


def test_missing_empty_and_unreadable_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        pack(tmp_path / "nowhere", tmp_path / "a.h5", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        pack(tmp_path / "empty", tmp_path / "a.h5", progress=False)
    (tmp_path / "empty" / "dog").mkdir()
    with pytest.raises(DataError, match="no files"):
        pack(tmp_path / "empty", tmp_path / "a.h5", progress=False)
    (tmp_path / "empty" / "dog" / "x.jpg").write_bytes(b"\xff\xd8 nothing")
    with pytest.raises(DataError, match="could be read"):
        pack(tmp_path / "empty", tmp_path / "a.h5", workers=1, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["empty"]       # no output, no temporary file


def test_dataset_rejects_files_it_cannot_use(tmp_path):
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DataError, match="not a readable HDF5"):
        H5Dataset(tmp_path / "text.h5")
    with h5py.File(tmp_path / "partial.h5", "w") as f:
        f["images"] = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(DataError, match="missing labels"):
        H5Dataset(tmp_path / "partial.h5")


def _raise_on_third(real):
    def load(path, size, notes=None):
        if os.path.basename(str(path)).endswith("_00002.jpg"):
            raise MemoryError("simulated worker failure")
        return real(path, size, notes)
    return load


def _exit_on_third(real):
    def load(path, size, notes=None):
        if os.path.basename(str(path)).endswith("_00002.jpg"):
            os._exit(3)                                       # a worker killed mid-way
        return real(path, size, notes)
    return load


@pytest.mark.parametrize("failure, error", [(_raise_on_third, MemoryError),
                                            (_exit_on_third, BrokenProcessPool)])
def test_interrupted_pack_leaves_nothing_behind(synthetic, tmp_path, monkeypatch, failure, error):
    monkeypatch.setattr(pack_module, "START_METHOD", "fork")      # workers see the patch
    monkeypatch.setattr(pack_module, "CHUNK", 2)
    monkeypatch.setattr(pack_module, "load_and_resize", failure(load_and_resize))
    out = tmp_path / "out" / "train.h5"
    with pytest.raises(error):
        pack(synthetic / "train", out, size=SIZE, workers=2, progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_synth_is_deterministic_and_varied(tmp_path):
    a = synth(tmp_path / "a", classes=4, train_per_class=3, val_per_class=1, seed=2)
    synth(tmp_path / "b", classes=4, train_per_class=3, val_per_class=1, seed=2)
    synth(tmp_path / "c", classes=4, train_per_class=3, val_per_class=1, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 16 and a["classes"] == sorted(a["classes"])
    assert sorted(os.listdir(tmp_path / "a" / "train")) == a["classes"]
    same = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files]
    other = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes() for f in files]
    assert all(same) and not any(other)
    sizes = {Image.open(tmp_path / "a" / f).size for f in files}
    assert len(sizes) > 8 and all(48 <= w <= 96 and 48 <= h <= 96 for w, h in sizes)
