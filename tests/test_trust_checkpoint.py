"""Checkpoints are checked: checksums, an attribute digest, finite parameters, file mode."""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from nbalex import checkpoint
from nbalex.model import Net

TINY = str(Path(__file__).parent / "configs" / "tiny.toml")


@pytest.fixture
def saved(tmp_path):
    net = Net(TINY, backend="reference", batch_size=1, seed=0)
    path = checkpoint.save(tmp_path / "ck.h5", net, epoch=1, step=2, lr=0.01, seed=0,
                           loader_state={"order": np.arange(5)}, extra={"note": "hi"})
    return net, path


def _flip_bytes_inside(path, dataset, count=64):
    """XOR ``count`` bytes in the middle of ``dataset``'s first chunk, in the file itself."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        at = info.byte_offset + max(0, (info.size - count) // 2)
        raw.seek(at)
        block = bytearray(raw.read(count))
        raw.seek(at)
        raw.write(bytes(b ^ 0xFF for b in block))


def test_every_dataset_has_a_fletcher32_checksum_and_the_attributes_a_digest(saved):
    _, path = saved
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert any(n.startswith("params/") for n in names) and "loader_state/order" in names
        assert all(f[n].fletcher32 for n in names), [n for n in names if not f[n].fletcher32]
        assert f.attrs["format"] == 2 and len(str(f.attrs["digest"])) == 64


def test_flipped_bytes_inside_a_parameter_are_refused_with_one_line(saved):
    _, path = saved
    _flip_bytes_inside(path, "params/fc7.weight")
    for read in (checkpoint.load, checkpoint.load_params):
        with pytest.raises(checkpoint.DamagedCheckpoint) as err:
            read(path)
        message = str(err.value)
        assert "\n" not in message and "params/fc7.weight fails its checksum" in message


def test_a_changed_run_state_attribute_is_refused(saved):
    _, path = saved
    with h5py.File(path, "r+") as f:
        f.attrs["epoch"] = 7
    with pytest.raises(checkpoint.DamagedCheckpoint, match="does not match its digest"):
        checkpoint.load(path)


def test_an_older_checkpoint_without_checksums_is_read_with_a_warning(saved, tmp_path):
    net, _ = saved
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:           # format 1: plain datasets, no digest
        f.attrs.update({"format": 1, "config": net.config_text, "model": net.name,
                        "epoch": 1, "step": 0, "lr": 0.01, "seed": 0})
        for group, arrays in (("params", net.params()), ("momentum", net.momentum())):
            for name, value in arrays.items():
                f.create_dataset(f"{group}/{name}", data=value)
    warnings = []
    state = checkpoint.load(old, warn=warnings.append)
    assert len(warnings) == 1 and "without checksums" in warnings[0]
    for name, value in net.params().items():
        np.testing.assert_array_equal(state["params"][name], value)


def test_non_finite_parameters_are_never_saved_nor_used(saved, tmp_path):
    net, path = saved
    params = net.params()
    params["conv2.weight"][0, 0, 0, 0] = np.nan
    net.load_params(params)
    with pytest.raises(checkpoint.NonFiniteParameters, match="params/conv2.weight holds NaN"):
        checkpoint.save(tmp_path / "bad.h5", net, epoch=1, step=0, lr=0.01, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5"]   # nothing written
    with h5py.File(path, "r+") as f:        # rewritten through HDF5: the checksum still holds
        f["momentum/fc7.bias"][0] = np.inf
    with pytest.raises(checkpoint.NonFiniteParameters, match="momentum/fc7.bias") as err:
        checkpoint.load(path)
    assert "\n" not in str(err.value)


def test_a_checkpoint_gets_the_mode_the_umask_gives_other_files(tmp_path):
    net = Net(TINY, backend="reference", batch_size=1, seed=0)
    before = os.umask(0o027)
    try:
        path = checkpoint.save(tmp_path / "ck.h5", net, epoch=0, step=0, lr=0.01, seed=0)
        other = tmp_path / "other.txt"
        other.write_text("x")
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == other.stat().st_mode & 0o777 == 0o640
