"""Bad input to the CLI gets one line before any work: NaN/inf floats, --gpus on a host
backend, a damaged or diverged checkpoint; ``info --classes`` sizes the output layer."""

import shutil

import h5py
import numpy as np
import pytest

from test_cli import TINY, data, nbalex, ok, run, train_args  # noqa: F401  (fixtures)
from test_trust_checkpoint import _flip_bytes_inside


def _one_error_line(result, code):
    assert result.exit_code == code, (result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("option", ["--lr", "--momentum", "--weight-decay"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_nan_and_inf_floats_are_usage_errors_before_any_work(option, value, data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = [a for a in train_args(data, out) if a not in ("--lr", 0.005)]
    line = _one_error_line(nbalex(*args, option, value), 2)
    assert option in line and "is not a finite number" in line
    assert not out.exists()


def test_gpus_with_a_host_backend_is_refused(data, tmp_path):  # noqa: F811
    line = _one_error_line(nbalex(*train_args(data, tmp_path / "r", "--gpus", "0,1")), 2)
    assert "--gpus" in line and "backend reference runs on the host" in line
    assert not (tmp_path / "r").exists()


def test_a_damaged_checkpoint_is_refused_by_eval_and_resume(data, run, tmp_path):  # noqa: F811
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _flip_bytes_inside(copy / "checkpoint.h5", "params/fc2.weight")
    line = _one_error_line(nbalex("eval", "--checkpoint", copy / "checkpoint.h5", "--data",
                                  data["val"], "--backend", "reference", "--workers", 0), 1)
    assert "is damaged: params/fc2.weight fails its checksum" in line
    line = _one_error_line(nbalex(*train_args(data, copy, "--epochs", 3, "--resume")), 1)
    assert "fails its checksum" in line


def test_a_checkpoint_holding_nan_is_refused_by_eval(data, run, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.h5"
    shutil.copy(run / "checkpoint.h5", bad)
    with h5py.File(bad, "r+") as f:
        f["params/conv1.weight"][0, 0, 0, 0] = np.nan
    line = _one_error_line(nbalex("eval", "--checkpoint", bad, "--data", data["val"],
                                  "--backend", "reference", "--workers", 0), 1)
    assert "params/conv1.weight holds NaN or infinite values" in line


def test_info_sizes_the_output_layer_with_classes():
    table = ok("info", "--model", "alexnet-mini", "--classes", 10).stdout
    fc8 = next(line for line in table.splitlines() if line.startswith("fc8"))
    assert fc8.split()[2] == "10" and f"{10 * 256 + 10:,}" in fc8
    line = _one_error_line(nbalex("info", "--model", TINY, "--classes", 10), 2)
    assert 'outputs = \\"classes\\"' in line or 'outputs = "classes"' in line
