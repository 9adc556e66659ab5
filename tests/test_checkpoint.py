"""Checkpoints (atomic HDF5, exact resume) and learning-rate schedules."""

from pathlib import Path

import numpy as np
import pytest

from nbalex import checkpoint
from nbalex.model import Net
from nbalex.optim import ReduceOnPlateau, StepSchedule, schedule_from_state

TINY = str(Path(__file__).parent / "configs" / "tiny.toml")


def data(step, n=4):
    rng = np.random.default_rng(step)
    return rng.normal(size=(n, 3, 12, 12)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


def train(net, steps, lr=0.05):
    for step in steps:
        x, y = data(step)
        net.forward_backward(x, y, seed=step)
        net.sgd_step(lr)


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    net = Net(TINY, backend="reference", batch_size=4, seed=1)
    train(net, range(2))
    schedule = ReduceOnPlateau(lr=0.05)
    schedule.step(0.9)
    order = np.random.default_rng(0).permutation(10)
    path = checkpoint.save(tmp_path / "run" / "ck.h5", net, epoch=3, step=2, lr=0.05, seed=1,
                           loader_state={"order": order, "position": np.int64(7)},
                           extra={"schedule": schedule.state_dict(), "note": "hi"})
    assert [p.name for p in path.parent.iterdir()] == ["ck.h5"]   # no temporary file left
    train(net, range(2, 4))
    expected = net.params()

    state = checkpoint.load(path)
    assert (state["epoch"], state["step"], state["lr"], state["seed"]) == (3, 2, 0.05, 1)
    np.testing.assert_array_equal(state["loader_state"]["order"], order)
    assert state["loader_state"]["position"] == 7 and state["extra"]["note"] == "hi"
    assert schedule_from_state(state["extra"]["schedule"]).best == 0.9
    assert state["config_text"] == net.config_text and state["model"] == "tiny"
    assert list(state["params"]) == net.param_names()

    resumed = Net(state["config_text"], backend="reference", batch_size=4, seed=99)
    checkpoint.restore(path, resumed)
    train(resumed, range(2, 4))
    for name, value in resumed.params().items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_load_params_returns_named_arrays_in_network_order(tmp_path):
    net = Net(TINY, backend="reference", batch_size=1)
    checkpoint.save(tmp_path / "a.h5", net, epoch=0, step=0, lr=0.01, seed=0)
    params = checkpoint.load_params(tmp_path / "a.h5")
    assert list(params) == net.param_names()
    for name, value in net.params().items():
        np.testing.assert_array_equal(params[name], value)


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path):
    net = Net(TINY, backend="reference", batch_size=1, seed=0)
    path = checkpoint.save(tmp_path / "ck.h5", net, epoch=1, step=10, lr=0.01, seed=0)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        checkpoint.save(path, net, epoch=2, step=20, lr=0.01, seed=0, extra={"bad": object()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.h5"]
    assert checkpoint.load(path)["epoch"] == 1


def test_a_checkpoint_of_another_model_gives_a_one_line_error(tmp_path):
    net = Net(TINY, backend="reference", batch_size=1)
    checkpoint.save(tmp_path / "tiny.h5", net, epoch=0, step=0, lr=0.01, seed=0)
    mini = Net("alexnet-mini", backend="reference", batch_size=1)
    with pytest.raises(ValueError) as err:
        mini.load_params(checkpoint.load_params(tmp_path / "tiny.h5"))
    assert "\n" not in str(err.value) and "alexnet-mini" in str(err.value)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "missing.h5")


def test_reduce_on_plateau_divides_by_ten_at_most_three_times():
    s = ReduceOnPlateau(lr=0.01, patience=2)
    rates = [s.step(e) for e in (0.5, 0.4, 0.45, 0.41)]    # two stale epochs -> / 10
    assert rates == [0.01, 0.01, 0.01, pytest.approx(0.001)]
    assert s.step(0.3) == pytest.approx(0.001) and s.best == 0.3
    for _ in range(4):
        s.step(0.35)
    assert s.reductions == 3 and s.lr == pytest.approx(1e-5) and not s.finished
    copy = schedule_from_state(s.state_dict())
    for _ in range(2):
        s.step(0.35)
        copy.step(0.35)
    assert s.finished and copy.finished and s.lr == copy.lr == pytest.approx(1e-5)


def test_step_schedule():
    s = StepSchedule(0.01, milestones=(2, 4))
    assert [s.lr_at(e) for e in range(6)] == pytest.approx([0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4])
    s.step()
    s.step()
    copy = schedule_from_state(s.state_dict())
    assert copy.lr == s.lr == pytest.approx(0.001)
