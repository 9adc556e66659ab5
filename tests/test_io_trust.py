"""Data that can be trusted: workers die with their parent, no temporary file outlives a dead
packer, nothing is overwritten by accident, photos are upright, bad files are named."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from nbalex.cli import cli
from nbalex.io import children
from nbalex.io.errors import DataError
from nbalex.io.image import image_files, load_and_resize
from nbalex.io.pack import pack
from nbalex.io.synth import synth

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
TINY = str(Path(__file__).parent / "configs" / "cli-tiny.toml")


def nbalex(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="nbalex")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    synth(root / "images", classes=3, train_per_class=8, val_per_class=4, seed=5)
    return root / "images"


@pytest.fixture(scope="module")
def packed(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "train.h5"
    pack(images / "train", out, size=24, workers=1, progress=False)
    return out


# ------------------------------------------------------------------- worker start-up
def _sleep_as_worker(parent_pid, ready=None):
    children.worker_init(parent_pid)
    if ready is not None:
        ready.set()
    time.sleep(60)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_ignore_the_parents_signals_and_terminate_kills_them(method):
    ctx = children.context(method)
    ready = ctx.Event()
    proc = ctx.Process(target=_sleep_as_worker, args=(os.getpid(), ready))
    proc.start()
    try:
        assert ready.wait(60)                             # worker_init has run
        for sig in children.PARENT_SIGNALS:
            os.kill(proc.pid, sig)
        time.sleep(0.3)
        assert proc.is_alive()
    finally:
        proc.terminate()              # SIGKILL: a worker that ignores SIGTERM still stops
        proc.join(5)
    assert proc.exitcode == -signal.SIGKILL


def test_a_worker_whose_parent_already_died_exits_at_once():
    proc = children.context().Process(target=_sleep_as_worker, args=(os.getpid() + 10**6,))
    proc.start()
    proc.join(10)
    assert proc.exitcode == 1


# ------------------------------------------------------------------- kill -9 of the parent
def _children_of(pid):
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _running(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _python(code):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _slow_pack(src, out):
    """``nbalex pack SRC OUT --workers 2`` in a new session, 1 s per image: the tests stop it
    early, and at 0.3 s a busy machine let it finish before the test's signal was sent."""
    return _python(f"""
        import sys, time
        from nbalex.io import pack
        real = pack.load_and_resize
        def slow(path, size, notes=None):          # decoders inherit this by fork
            time.sleep(1.0)
            return real(path, size, notes)
        pack.load_and_resize = slow
        from nbalex.cli import main
        sys.argv = ["nbalex", "pack", {str(src)!r}, {str(out)!r}, "--size", "24",
                    "--workers", "2"]
        main()
    """)


@linux_only
def test_kill9_of_pack_ends_its_decoders_and_the_next_pack_cleans_up(images, tmp_path):
    out = tmp_path / "train.h5"
    proc = _slow_pack(images / "train", out)
    try:
        _wait_for(lambda: len(_children_of(proc.pid)) >= 2 and list(tmp_path.glob(".*.tmp-*")),
                  60, "two decoder processes and the temporary file")
        decoders = _children_of(proc.pid)
        with pytest.raises(DataError, match="being written by another"):   # a live packer
            pack(images / "train", out, size=24, workers=1, progress=False)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _wait_for(lambda: not any(_running(pid) for pid in decoders), 5, "decoders to end")
    finally:                          # the whole session: nothing outlives a failed test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    junk = sorted(p.name for p in tmp_path.iterdir())
    assert any(".tmp-" in name for name in junk), junk          # what kill -9 leaves ...
    summary = pack(images / "train", out, size=24, workers=1, progress=False)
    assert summary["images"] == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.h5"]   # ... the next pack clears


@linux_only
def test_sigterm_to_the_group_stops_pack_cleanly(images, tmp_path):
    proc = _slow_pack(images / "train", tmp_path / "train.h5")
    try:
        _wait_for(lambda: len(_children_of(proc.pid)) >= 2 and list(tmp_path.glob(".*.tmp-*")),
                  60, "two decoder processes and the temporary file")
        decoders = _children_of(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)          # as timeout, Slurm and docker stop do
        assert proc.wait(30) == 128 + signal.SIGTERM
        _wait_for(lambda: not any(_running(pid) for pid in decoders), 5, "decoders to end")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert "Stopped: stopped by SIGTERM" in err, err
    assert os.listdir(tmp_path) == []                # no temporary file, no lock, no OUT


@linux_only
def test_kill9_of_a_loader_process_ends_its_readers(packed):
    proc = _python(f"""
        import time
        from nbalex.io.loader import Loader
        loader = Loader({str(packed)!r}, 4, 20, backend="reference", workers=2)
        next(iter(loader.epoch(0)))
        print(" ".join(str(p.pid) for p in loader._readers.procs), flush=True)
        time.sleep(60)
    """)
    try:
        readers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(readers) == 2 and all(_running(pid) for pid in readers), proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _wait_for(lambda: not any(_running(pid) for pid in readers), 5, "readers to end")
    finally:                          # the whole session: nothing outlives a failed test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


# ------------------------------------------------------------------- nothing overwritten
def test_pack_refuses_an_existing_out_unless_forced(images, packed, tmp_path):
    out = tmp_path / "val.h5"
    out.write_bytes(b"precious")
    result = nbalex("pack", images / "val", out, "--size", 24, "--workers", 1,
                    "--classes-from", packed)
    assert result.exit_code != 0 and "already exists" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious" and os.listdir(tmp_path) == ["val.h5"]
    result = nbalex("pack", images / "val", out, "--size", 24, "--workers", 1,
                    "--classes-from", packed, "--force")
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


def test_pack_never_writes_over_its_classes_from_file(images, packed, tmp_path):
    before = packed.read_bytes()
    link = tmp_path / "link.h5"
    link.symlink_to(packed)
    for out in (packed, link):
        with pytest.raises(DataError, match="is the --classes-from file"):
            pack(images / "val", out, size=24, workers=1, progress=False,
                 classes_from=packed, force=True)
    result = nbalex("pack", images / "val", link, "--size", 24, "--classes-from", packed,
                    "--force")
    assert result.exit_code != 0 and "--classes-from file" in result.stderr
    assert packed.read_bytes() == before


# ------------------------------------------------------------------- synth
def test_synth_refuses_a_non_empty_folder_and_force_clears_stale_classes(tmp_path):
    out = tmp_path / "images"
    assert nbalex("synth", out, "--classes", 4, "--train-per-class", 2,
                  "--val-per-class", 1).exit_code == 0
    again = nbalex("synth", out, "--classes", 2, "--train-per-class", 2, "--val-per-class", 1)
    assert again.exit_code != 0 and "--force" in again.stderr
    assert len(os.listdir(out / "train")) == 4                  # nothing touched
    forced = nbalex("synth", out, "--classes", 2, "--train-per-class", 2, "--val-per-class", 1,
                    "--force")
    assert forced.exit_code == 0, forced.stderr
    assert sorted(os.listdir(out / "train")) == ["00_disc", "01_square"]
    assert sorted(os.listdir(out / "val")) == ["00_disc", "01_square"]
    (out / "train" / "dogs").mkdir()                            # not synth's: never removed
    refused = nbalex("synth", out, "--classes", 2, "--force")
    assert refused.exit_code != 0 and "did not write" in refused.stderr
    assert (out / "train" / "dogs").is_dir() and (out / "train" / "00_disc").is_dir()


def test_synth_classes_shows_and_checks_its_real_range(tmp_path):
    from nbalex.io.synth import SHAPES
    shown = nbalex("synth", "--help").stdout
    assert f"1 to {len(SHAPES)}" in shown
    result = nbalex("synth", tmp_path / "x", "--classes", len(SHAPES) + 1)
    assert result.exit_code == 2
    assert f"choose 1 to {len(SHAPES)} classes, got {len(SHAPES) + 1}" in result.stderr
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------- upright photos
def _portrait(width=32, height=64):
    """Top half red, bottom half blue: an upright portrait."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, :, 0] = 255
    a[height // 2:, :, 2] = 255
    return Image.fromarray(a)


# orientation tag -> how the camera stored the upright picture (exif_transpose undoes it)
STORED = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("tag", [6, 8])
@pytest.mark.parametrize("side", [64, 400])           # 400: JPEG draft mode is used at size 16
def test_exif_orientation_is_applied(tmp_path, tag, side):
    upright = _portrait(side // 2, side)
    exif = Image.Exif()
    exif[0x0112] = tag
    path = tmp_path / "phone.jpg"
    upright.transpose(STORED[tag]).save(path, quality=95, exif=exif)
    assert Image.open(path).size == (side, side // 2)       # stored sideways
    image = load_and_resize(path, 16).astype(np.int32)
    top, bottom = image[2:6].mean(axis=(0, 1)), image[10:14].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, top                # red above
    assert bottom[2] > 200 and bottom[0] < 60, bottom       # blue below
    plain = tmp_path / "upright.jpg"
    upright.save(plain, quality=95)
    assert np.abs(image - load_and_resize(plain, 16).astype(np.int32)).max() <= 12


def test_pack_stores_photos_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "src" / "phone").mkdir(parents=True)
    _portrait().transpose(STORED[6]).save(tmp_path / "src" / "phone" / "a.jpg", exif=exif)
    pack(tmp_path / "src", tmp_path / "out.h5", size=16, workers=1, progress=False)
    import h5py
    with h5py.File(tmp_path / "out.h5", "r") as f:
        image = f["images"][0].astype(np.int32)
    assert image[:6, :, 0].mean() > 200 and image[10:, :, 2].mean() > 200


# ------------------------------------------------------------------- pack's report
def test_pack_reports_empty_classes_long_skip_lists_and_bombs(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for name in ("a", "b", "c"):
        (src / name).mkdir(parents=True)
    _portrait(40, 30).save(src / "a" / "big.png")               # 1200 pixels: over the limit below
    _portrait(8, 8).save(src / "a" / "small.png")
    for i in range(13):
        (src / "b" / f"bad{i:02d}.jpg").write_bytes(b"not an image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)        # forked decoders inherit it
    result = nbalex("pack", src, tmp_path / "out.h5", "--size", 8, "--workers", 1)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1 and "big.png" in notes[0] and "kept" in notes[0]
    assert "Warning" not in result.stderr                       # no raw warning
    assert sum(line.startswith("  skipped ") for line in lines) == 10
    assert "  ... and 3 more (all listed in the file's skipped_files)" in lines
    empty = [line for line in lines if line.startswith("warning: ")]
    assert len(empty) == 2 and "class b" in empty[0] and "class c" in empty[1]
    assert "packed 2 images of 3 classes" in result.stdout


# ------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def checkpoint(images, packed, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    val = root / "val.h5"
    pack(images / "val", val, size=24, workers=1, progress=False, classes_from=packed)
    result = nbalex("train", "--data", packed, "--val", val, "--model", TINY, "--epochs", 1,
                    "--batch-size", 4, "--backend", "reference", "--workers", 0,
                    "--no-progress", "--out", root / "run")
    assert result.exit_code == 0, result.stderr
    return root / "run" / "checkpoint.h5"


def test_image_files_expands_folders_recursively_in_order(tmp_path):
    for rel in ("b/2.png", "a/x/1.jpg", "a/0.JPG", "a/.hidden.png", "a/notes.txt", "c.bmp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert image_files([tmp_path, tmp_path / "a" / "notes.txt"]) == [
        str(tmp_path / p) for p in ("a/0.JPG", "a/x/1.jpg", "b/2.png", "c.bmp", "a/notes.txt")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        image_files([tmp_path / "empty"])


def test_predict_answers_every_readable_image_and_names_the_others(images, checkpoint, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    good = sorted((images / "val").glob("*/*.jpg"))[:3]
    for i, path in enumerate(good):
        (folder / ("sub" if i else "") / f"{i}.jpg").write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    result = nbalex("predict", "--checkpoint", checkpoint, "--backend", "reference", "--json",
                    "--top", 2, folder)
    assert result.exit_code == 1
    answers = json.loads(result.stdout)
    expected = ["0.jpg", "broken.jpg", "sub/1.jpg", "sub/2.jpg"]
    assert [a["image"] for a in answers] == [str(folder / e) for e in expected]
    assert "error" in answers[1] and "top" not in answers[1]
    assert all(len(a["top"]) == 2 for i, a in enumerate(answers) if i != 1)
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("Error: cannot read ")
    assert "broken.jpg" in errors[0]
    text = nbalex("predict", "--checkpoint", checkpoint, "--backend", "reference",
                  folder / "broken.jpg", folder / "0.jpg")
    assert text.exit_code == 1 and str(folder / "0.jpg") in text.stdout
    assert "broken.jpg" not in text.stdout and "broken.jpg" in text.stderr
    clean = nbalex("predict", "--checkpoint", checkpoint, "--backend", "reference", folder / "sub")
    assert clean.exit_code == 0 and clean.stderr == ""


def test_a_decompression_bomb_is_one_note_not_a_warning(tmp_path, monkeypatch):
    import warnings
    _portrait(40, 30).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # any warning would raise here
        image = load_and_resize(tmp_path / "big.png", 8, notes)
    assert image.shape == (8, 8, 3)
    assert notes == [f"{tmp_path / 'big.png'}: 40x30 = 1,200 pixels is over PIL's "
                     f"decompression-bomb limit of 1,000; kept"]
